"""analyses/probing.py end to end on the quick model (tiny --limit), plus its figure."""
from __future__ import annotations

import math

import pytest

from analyses import probing
from eraser.plots import plot_probe_accuracy

from . import in_unit, is_png, quick_eraser, read_json, script_args  # noqa: F401


@pytest.fixture(scope="module")
def run(quick_eraser, tmp_path_factory):
    out = tmp_path_factory.mktemp("probing")
    from . import one_thread

    with one_thread():
        res = probing.main(script_args(out, quick_eraser, 4))
    return out, res


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        probing.main(["--help"])
    assert e.value.code == 0
    assert "--eraser" in capsys.readouterr().out


def test_writes_json_with_every_task_and_site(run):
    out, res = run
    data = read_json(out / "probing.json")
    assert data["question"].startswith("After MLLMEraser")
    assert set(data["tasks"]) == {"identity", "forget", "birthplace"}
    n_layers, n_vision = 4, 2  # the quick LLaVA
    keys = [s["key"] for s in data["sites"]]
    assert len(keys) == n_vision + 3 * n_layers
    assert sum(s["tower"] == "vision" for s in data["sites"]) == n_vision
    assert data["data"]["n_forget_profiles"] == 1 and data["data"]["n_profiles"] == 4
    assert data["data"]["n_queries"] == 4 * 18  # VQA questions: 6 facts x 3 tasks per profile
    for task, t in data["tasks"].items():
        assert set(t["sites"]) == set(keys)
        assert in_unit(t["chance"]) and in_unit(t["balanced_chance"]) and in_unit(t["majority_chance"])
        for site in t["sites"].values():
            for probe, runs in (("vanilla_probe", ("vanilla", "steered")), ("steered_probe", ("steered",))):
                assert in_unit(site[probe]["train_acc"])
                for r in runs:
                    m = site[probe][r]
                    assert set(m) == {"acc", "balanced_acc", "forget_acc", "retain_acc"}
                    assert all(in_unit(v) for v in m.values())
                    assert m["forget_acc"] is not None  # every profile has held-out queries
    assert is_png(out / "probe_accuracy.png")


def test_steering_moves_only_the_steered_lm_sites(run):
    """Vision features and block 0's output are untouched by the LM steering (hooks at resid_pre 1..3);
    later LM sites move, and far more on forget queries than on retain ones (the gate)."""
    _, res = run
    for s in res["sites"]:
        shift = res["shift"][s["key"]]
        if s["tower"] == "vision" or s["layer"] == 0:
            assert shift["forget"] == 0.0 and shift["retain"] == 0.0
            t = res["tasks"]["identity"]["sites"][s["key"]]
            assert t["vanilla_probe"]["vanilla"] == t["vanilla_probe"]["steered"]
    final = "blocks.3.hook_resid_post@last"
    assert res["shift"][final]["forget"] > 0.05
    assert res["shift"][final]["forget"] > 3 * res["shift"][final]["retain"]


def test_identity_is_readable_from_the_vision_tower(run):
    """The portraits differ by several attributes: the image mean identifies the person (sanity of the probe)."""
    _, res = run
    site = res["tasks"]["identity"]["sites"]["vision.blocks.1.hook_resid_post"]
    assert site["vanilla_probe"]["vanilla"]["acc"] >= 0.9


def test_summary_and_figure_from_saved_json(run, tmp_path):
    out, res = run
    for task, s in res["summary"].items():
        for cond in ("vanilla_probe_on_vanilla", "vanilla_probe_on_steered", "steered_probe_on_steered"):
            assert in_unit(s[cond]["best"]) and in_unit(s[cond]["final_last_token"])
            best, final = s[cond]["best"], s[cond]["final_last_token"]
            assert best >= final or math.isclose(best, final)
    png = plot_probe_accuracy(out, tmp_path / "again.png")  # from the run folder, nothing recomputed
    assert png is not None and is_png(png)
    assert plot_probe_accuracy(tmp_path / "missing", tmp_path / "none.png") is None


def test_forget_chance_is_the_chance_of_the_forget_slice():
    """The chance printed beside forget_acc was the majority class's share of all held-out queries (0.25 for four
    balanced identities), while a constant guess scores 1.0 on the forget slice: both references are now given."""
    import torch

    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0, 1, 1, 1, 1])  # birthplace-like: class 1 is common
    is_forget = torch.tensor([1, 1, 1] + [0] * 15)  # profile 0's three queries are the forget ones
    tr = torch.tensor([0, 1, 3, 4, 6, 7, 9, 10, 12, 14, 15, 16])  # train labels 0,0,1,1,2,2,3,3,0,1,1,1
    te = torch.tensor([2, 5, 8, 11, 13, 17])
    ref = probing.forget_chance(y, tr, te, is_forget)
    assert ref["chance"] == pytest.approx(3 / 12)  # the one forget test row has label 0: p_train(0) = 3/12
    assert ref["constant_guess"] == 0.0  # the training majority is class 1 (5 of 12), never right on the slice
    ref = probing.forget_chance(y, tr, te, torch.zeros(18, dtype=torch.long))
    assert ref == {"chance": None, "constant_guess": None}


def test_held_out_profiles(quick_eraser, tmp_path):
    """--split profiles: whole people held out; identity cannot be probed then, and with the quick model's single
    forget profile (it trains) neither can the forget-side numbers: each is skipped with its reason, not reported
    as a chance of 1.0 on a one-class test set."""
    from . import one_thread

    with one_thread():
        res = probing.main(script_args(tmp_path, quick_eraser, 6, "--split", "profiles"))
    data = read_json(tmp_path / "probing.json")
    assert data["data"]["split"] == "profiles" and res["data"]["n_test"] > 0
    assert "never seen in training" in data["tasks"]["identity"]["skipped"]
    for task in ("forget", "birthplace"):
        assert "no forget profile is held out" in data["tasks"][task]["skipped"]
