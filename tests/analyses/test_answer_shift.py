"""analyses/answer_shift.py on the quick model: the projection on the erasure direction along generated answers."""
from __future__ import annotations

import pytest
import torch

from analyses import answer_shift
from eraser.plots import make_all, plot_answer_shift

from . import in_unit, is_png, one_thread, quick_eraser, read_json, script_args  # noqa: F401


@pytest.fixture(scope="module")
def run(quick_eraser, tmp_path_factory):
    out = tmp_path_factory.mktemp("answer_shift")
    with one_thread():
        res = answer_shift.main(script_args(out, quick_eraser, 2, "--max-new-tokens", "8"))
    return out, res


def test_projections_refusals_and_shift(run):
    out, res = run
    data = read_json(out / "answer_shift.json")
    assert data["question"].startswith("Does the steering hold")
    layers = [str(l) for l in data["config"]["eraser"]["layers"]]
    k = data["config"]["steered_steps"]
    forget, retain = data["splits"]["forget"], data["splits"]["retain"]
    keys = data["config"]["directions"]
    assert keys == (["erasure", "answer"] if k else ["erasure"])
    for entry in (forget, retain):
        assert entry["n_queries"] > 0
        for model in ("vanilla", "steered"):
            assert in_unit(entry[model]["refusal_rate"])
            for key in keys:
                for layer in layers:
                    got = entry[model]["directions"][key][layer]
                    assert len(got["mean"]) == len(got["n"]) == 8
                    assert got["n"][0] == entry["n_queries"]  # every row has its last prompt token
                    assert all(a >= b for a, b in zip(got["n"], got["n"][1:]))  # rows only drop out (at EOS)
        for key in keys:
            for layer in layers:
                v, st = (entry[m]["directions"][key][layer]["mean"] for m in ("vanilla", "steered"))
                for t, s in enumerate(entry["shift"][key][layer]):
                    assert s is None or s == pytest.approx(st[t] - v[t])
    # the quick model's eraser forgets: it refuses forget questions it answered, and leaves retain ones alone
    assert forget["vanilla"]["refusal_rate"] == 0.0 and forget["steered"]["refusal_rate"] >= 0.9
    assert retain["steered"]["refusal_rate"] <= 0.1
    # the steering pushes along -direction on forget questions where it acts (the prompt's last token) ...
    strength = data["config"]["eraser"]["strength"]
    shift = forget["shift"]["erasure"]
    assert strength < 0 and all(shift[l][0] < 0 for l in layers)
    # ... and hardly on retain ones (the gate is ~0 there)
    assert all(abs(retain["shift"]["erasure"][l][0]) < 0.25 * abs(shift[l][0]) for l in layers)
    if k:  # the answer steps push along -answer direction at t = 1..k, on forget questions
        assert all(forget["shift"]["answer"][l][1] < 0 for l in layers)
    assert k == data["config"]["eraser"]["answer_steps"]


def test_projections_equal_a_hand_computation(quick_eraser):
    """Row 0 by hand: t = 0 from a plain forward pass on the prompt, t = 1 from one over the prompt and the first
    answer token (teacher forcing, which a vanilla generation equals), each dotted with the unit vectors."""
    import argparse

    from analyses.common import Context
    from eraser import MLLMEraser
    from eraser.pipeline import load_setup

    with one_thread():
        setup = load_setup(quick=True, progress=False)
        eraser = MLLMEraser.load(quick_eraser, setup.model)
        ctx = Context(setup, eraser, eraser.config.strength, "test", None, argparse.Namespace(no_progress=True))
        q = answer_shift.generation_queries(setup.bench.forget[:1])[:2]
        got, texts = answer_shift.projections(ctx, q, 3, steered=False)
        model, layer = setup.model, eraser.direction.layers[0]
        name = eraser.direction.hook_name(layer)
        first = model.generate(model.encode(images=[q[0][0]], prompts=[q[0][1]]), max_new_tokens=1).texts[0]
        forced = model.encode(images=[q[0][0]], prompts=[q[0][1]], answers=[first])
        _, cache = model.run_with_cache(forced, name)
        p = int(forced.last_index[0])
        for key, vec in (("erasure", eraser.direction.vectors[0]), ("answer", eraser.direction.answer[0])):
            want = cache[name][0, p:p + 2] @ (vec / vec.norm()).float()  # the last prompt token, the first answer one
            torch.testing.assert_close(torch.tensor(got[key][layer][0][:2]), want, atol=1e-4, rtol=1e-5)
    assert len(texts) == 2 and len(got["erasure"][layer]) == 2


def test_figure_from_the_run_and_from_saved_json(run, tmp_path):
    out, _ = run
    assert is_png(out / "answer_shift.png")
    again = plot_answer_shift(out, tmp_path / "again.png")
    assert again is not None and is_png(again)
    assert [p.name for p in make_all(out, tmp_path, only=["answer_shift"])] == ["answer_shift.png"]
    assert plot_answer_shift(tmp_path / "missing", tmp_path / "none.png") is None


def test_bad_arguments_fail_at_parse_time(capsys):
    for argv in (["--max-new-tokens", "0"], ["--max-new-tokens", "1"], ["--max-new-tokens", "x"]):
        with pytest.raises(SystemExit) as e:
            answer_shift.main(argv)
        assert e.value.code == 2
