"""analyses/heads.py end to end on the quick model (tiny --limit), plus its figure."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analyses import heads
from eraser.plots import plot_heads_heatmap

from . import in_unit, is_png, quick_eraser, read_json, script_args  # noqa: F401

N_LAYERS, N_HEADS = 4, 4  # the quick LLaVA


@pytest.fixture(scope="module")
def run(quick_eraser, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads")
    from . import one_thread

    with one_thread():
        res = heads.main(script_args(out, quick_eraser, 3, "--pairs", "3"))
    return out, res


def test_help_and_bad_pairs(capsys):
    with pytest.raises(SystemExit) as e:
        heads.main(["--help"])
    assert e.value.code == 0 and "--pairs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        heads.main(["--pairs", "0"])
    assert e.value.code == 2


def test_json_shapes_and_the_trained_model_names_the_person(run):
    out, _ = run
    data = read_json(out / "heads.json")
    flow = data["flow"]
    assert flow["n_pairs"] == 3 and flow["layers"] == list(range(N_LAYERS)) and flow["heads"] == list(range(N_HEADS))
    for part in ("all", "answer"):
        assert np.array(flow["effects"][part], dtype=float).shape == (N_LAYERS, N_HEADS)
    assert flow["clean"] > 0 > flow["corrupted"]  # clean prefers its own person's name, corrupted the other's
    assert len(flow["top_answer"]) == 5 and all(math.isfinite(t["effect"]) for t in flow["top_answer"])
    assert is_png(out / "heads_heatmap.png")


def test_some_head_carries_the_identity(run):
    """Not vacuous: one head patched alone moves the name logit difference by a visible share of the gap."""
    _, res = run
    effects = np.array(res["flow"]["effects"]["all"], dtype=float)
    assert np.nanmax(np.abs(effects)) > 0.05


def test_the_identity_head_matters_for_what_it_moves(run):
    """Each head's query, key and value patched alone: the strongest head's value carries most of its output's
    effect, its query and key almost none (measured, quick LLaVA, 8 pairs: L1H1 output 0.32, value 0.28, query
    0.01, key 0.00)."""
    _, res = run
    flow = res["flow"]
    for c in ("q", "k", "v"):
        assert np.array(flow["inputs"][c], dtype=float).shape == (N_LAYERS, N_HEADS)  # LLaVA: no grouped keys
    out = np.array(flow["effects"]["all"], dtype=float)
    l, h = np.unravel_index(np.nanargmax(out), out.shape)
    v, q, k = (np.array(flow["inputs"][c], dtype=float)[l, h] for c in ("v", "q", "k"))
    assert v > 0.5 * out[l, h] and abs(q) < 0.25 * v and abs(k) < 0.25 * v
    vision = np.array(flow["vision"], dtype=float)  # the quick model's vision tower: 2 blocks of 2 heads
    assert vision.shape == (2, 2) and np.nanmax(np.abs(vision)) > 0.05  # some vision head carries the identity
    # ... and reads it: that head's query or value carries part of it (measured, 8 pairs: block 0 head 0 output
    # 0.39, query 0.30, value 0.22, key 0.12)
    vl, vh = np.unravel_index(np.nanargmax(vision), vision.shape)
    reads = {c: np.array(res["flow"]["vision_inputs"][c], dtype=float) for c in ("q", "k", "v")}
    assert all(r.shape == (2, 2) for r in reads.values())
    assert max(reads["q"][vl, vh], reads["v"][vl, vh]) > 0.25 * vision[vl, vh]
    # the vision tower's edges: 21 on the quick LLaVA (2 blocks of 2 heads, the projector reads the last); the
    # patch embeddings into block 0's attention carry the most (measured, 8 pairs: 0.68)
    edges = res["flow"]["vision_edges"]
    assert edges["n_edges"] == 21 and list(edges["into_projector"])[0] == "patches"
    assert edges["top"][0]["writer"] == "patches" and edges["top"][0]["effect"] > 0.3
    assert abs(edges["top"][0]["effect"]) >= abs(edges["top"][-1]["effect"])
    assert edges["split_edges"] == 46 and set(edges["split_by_input"]) == {"q", "k", "v", "mlp_in", "projector"}


def test_steering_leaves_attention_before_the_first_steered_layer_alone(run):
    """The eraser's hooks write at its steered layers only (reading the gate changes nothing), so the attention of
    every earlier layer is bit-for-bit the vanilla one; the shares are attention masses in [0, 1]."""
    _, res = run
    first = min(res["steered_layers"])
    assert first >= 1
    for split in ("forget", "retain"):
        d = res["attention"][split]
        v, s = np.array(d["vanilla"]), np.array(d["steered"])
        assert v.shape == s.shape == (N_LAYERS, N_HEADS)
        assert np.abs(v[:first] - s[:first]).max() == 0.0
        assert all(in_unit(x) for x in v.ravel().tolist() + s.ravel().tolist())
        assert v.max() > 0.0  # the last token does attend to the image somewhere
    assert res["attention"]["forget"]["max_abs_change"] > 0.0  # the forget questions are steered


def test_figure_from_saved_json(run, tmp_path):
    out, _ = run
    assert is_png(plot_heads_heatmap(out, tmp_path / "again.png"))
    assert plot_heads_heatmap(tmp_path, tmp_path / "none.png") is None


def test_refusal_writers_add_up(run):
    """The direct shares are exact: their sums are the mean logit differences, and steering raises the refusal."""
    _, res = run
    w = res["writers"]
    assert len(w["labels"]) == len(w["vanilla"]) == len(w["steered"]) == 1 + N_LAYERS * (N_HEADS + 1) + 1
    assert w["labels"][-1] == "other" and abs(w["vanilla"][-1]) < 1e-3  # vanilla: no hook writes anything
    assert math.isclose(sum(w["vanilla"]), w["total"]["vanilla"], abs_tol=1e-3)
    assert w["total"]["steered"] > w["total"]["vanilla"]
    assert len(w["top_change"]) == 8


def test_the_steering_acts_mostly_straight_on_the_logits(run):
    """The steering's write given to one reader at a time: every reader at once is the steered run (the same
    logit difference the attribution sums to); the direct path to the logits carries most of it (measured, quick
    LLaVA, all 22 forget queries: logits 0.78, block 3's MLP 0.10, its attention 0.05)."""
    _, res = run
    w, p = res["writers"], res["writers"]["paths"]
    assert p["readers"][-1] == "logits" and p["readers"][0] == f"L{res['steered_layers'][0]}.attn_in"
    assert p["all_readers"] == pytest.approx(p["hooked"], abs=1e-3)
    assert p["hooked"] == pytest.approx(w["total"]["steered"], abs=1e-3)
    assert p["plain"] == pytest.approx(w["total"]["vanilla"], abs=1e-3)
    eff = dict(zip(p["readers"], p["effects"]))
    assert eff["logits"] > 0.5 and eff["logits"] == max(eff.values())
    # the write at the last prompt token alone does almost all of it, the image positions' write nothing
    # (measured: last 0.96, text 1.00, image -0.01)
    by = {k: (q["all_readers"] - q["plain"]) / (q["hooked"] - q["plain"]) for k, q in w["paths_by_position"].items()}
    assert by["last"] > 0.8 and abs(by["image"]) < 0.1


def test_the_answer_steps_are_traced_with_the_answer_so_far_teacher_forced(run):
    """Each answer step the eraser steers is traced: every reader given the recorded writes is the steered
    generation; the answer token's own write carries most of the refusal's next token, the prompt's write (read
    through attention) little (measured, quick LLaVA, 22 forget queries, step 1: answer tokens 0.96, prompt 0.14,
    straight on the logits 0.77)."""
    _, res = run
    steps = res["writers"]["answer_steps"]
    assert list(steps) == [str(t) for t in range(1, res["config"]["eraser"]["answer_steps"] + 1)]
    assert steps, "the quick model's stacked gate steers at least one answer token"
    for d in steps.values():
        p = d["paths"]
        assert p["all_readers"] == pytest.approx(p["hooked"], abs=1e-3) and p["hooked"] > p["plain"]
        share = {k: (q["all_readers"] - q["plain"]) / (q["hooked"] - q["plain"]) for k, q in d["by_position"].items()}
        assert share["answer"] > 0.5 > share["prompt"]
        assert d["n_queries"] + d["left_out"] > 0 and d["n_queries"] > 0
