"""``mllmeraser demo --quick`` end to end: the JSON structure, the sanity of its numbers, and determinism.

The demo is run twice with the same seed (the second time into a fresh
folder); every number in ``results.json`` except wall times must be equal.
Both runs share the cached quick model, so this costs two demo runs (a few
minutes), which is the point: it is the job ``make demo`` runs.
"""
from __future__ import annotations

import json
import math

import pytest

from eraser.cli import main

BASELINES = ("ga", "grad_diff", "kl_min", "npo", "prompt")
ERASERS = ("mllmeraser", "mllmeraser_no_nullspace", "steer_static", "mllmeraser_text_only", "mllmeraser_mean_gate",
           "mllmeraser_window_gate", "mllmeraser_concept_gate", "mllmeraser_stacked_gate")
SPLITS = ("forget", "test", "retain", "celebrity")
METRICS = ("cls_acc", "cloze_acc", "gen_rougeL", "gen_bleu", "refusal_rate", "gibberish_rate")
FIGURES = ("tradeoff.png", "gates.png", "timing.png", "heatmap.png")


def _run(out) -> dict:
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--threads", "2"]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("demo_a"), tmp_path_factory.mktemp("demo_b")
    return (a, _run(a)), (b, _run(b))


def test_demo_writes_every_file_and_method(runs):
    (out, res), _ = runs
    for name in ("results.json", "results.md", "gates.json", "sweep.jsonl", "eraser.safetensors", *FIGURES):
        assert (out / name).stat().st_size > 0, name
    assert set(res) >= {"config", "methods", "timing", "checks"}
    assert set(res["methods"]) == {"vanilla", *ERASERS, *BASELINES}
    for method, splits in res["methods"].items():
        assert set(splits) >= set(SPLITS), method
        for split in SPLITS:
            for metric in METRICS:
                v = splits[split][metric]
                assert 0.0 <= v <= 1.0 and not math.isnan(v), (method, split, metric, v)
    for method, t in res["timing"].items():
        assert t["infer_s"] > 0 and t["fit_s"] >= 0, method
    md = (out / "results.md").read_text()
    for method in ("vanilla", "mllmeraser", "ga", "npo"):
        assert method in md


def test_demo_numbers_are_sane(runs):
    """The vanilla model knows its facts, and unlearning moves forget more than retain."""
    (_, res), _ = runs
    m = res["methods"]
    van = m["vanilla"]
    assert van["forget"]["gen_rougeL"] >= 0.7 and van["retain"]["gen_rougeL"] >= 0.7
    assert res["checks"]["refusal"]["vanilla"]["forbidden_refusal_rate"] >= 0.9
    assert res["checks"]["refusal"]["vanilla"]["answerable_refusal_rate"] <= 0.05
    ours = m["mllmeraser"]
    # Forgetting (generation ROUGE-L on forget) drops by more than retain utility does.
    drop_forget = van["forget"]["gen_rougeL"] - ours["forget"]["gen_rougeL"]
    drop_retain = van["retain"]["gen_rougeL"] - ours["retain"]["gen_rougeL"]
    assert drop_forget > 0.2 and drop_forget > 2 * max(drop_retain, 0.0)
    assert ours["forget"]["refusal_rate"] > ours["retain"]["refusal_rate"]
    # The mean-over-prompt gate (an extension) forgets generation at no retain cost.  Measured on the quick model:
    # forget ROUGE-L 1.0 -> 0.0 and cls 1.0 -> 0.18 (28-epoch quick model, earlier machines); 1.0 -> 0.61 and
    # 1.0 -> 0.91 (36-epoch quick model, AMD EPYC): how far it goes depends on the model, so only the direction
    # and the retain cost are asserted.
    mean = m["mllmeraser_mean_gate"]
    assert van["forget"]["gen_rougeL"] - mean["forget"]["gen_rougeL"] > 0.2
    assert van["retain"]["cls_acc"] - mean["retain"]["cls_acc"] <= 0.03
    # The window and per-concept gates are extensions, not the method issue's resolution (that is the stacked gate,
    # held to the whole bar below); like `mllmeraser` and the mean gate above, they are held to what they do on the
    # quick model whichever CPU trained it: forget generation in full, forget and Test multiple choice to <= 0.2,
    # within the retain tolerance.  Measured: on the quick model an AMD EPYC trains, forget / Test cls 0 / 0, refusal
    # 81.8 % / 72.7 % (window / concept); on the one an Intel Xeon trains, forget and Test cls 0.091 / 0.182 (one and
    # two of 11 forget questions answered), refusal 97.0 % / 87.9 %.  Why: the only forget person at 5 % (Ben Brandt)
    # shares his surname with a celebrity (Oscar Brandt), and a single mean-read gate does not separate them there
    # (forget gate 0.667, the celebrity's highest 0.643, window 0.42-0.85).  Tried: every gamma / null-space
    # candidate, three ramps, hard-negative retain weights (analyses/hard_negatives.py: weight 10 met the bar on the
    # Intel model and cost the AMD model's concept gate one celebrity question); none is robust, so the full bar is
    # not claimed for these two.  (At default scale they miss it too: forget cls 74.5 / 3.6, README.)
    for name in ("mllmeraser_window_gate", "mllmeraser_concept_gate"):
        ours = m[name]
        assert ours["forget"]["gen_rougeL"] <= 0.2 and ours["forget"]["refusal_rate"] >= 0.5, name
        assert ours["forget"]["cls_acc"] <= 0.2 and ours["test"]["cls_acc"] <= 0.2, name
        for split in ("retain", "celebrity"):
            assert van[split]["cls_acc"] - ours[split]["cls_acc"] <= 0.03, (name, split)
            assert ours[split]["gibberish_rate"] <= 0.02, (name, split)
    assert res["config"]["selection"]["mllmeraser_window_gate"]["gate"]["window"] is not None
    assert res["checks"]["refusal"]["mllmeraser_concept_gate"]["answerable_refusal_rate"] <= 0.05
    # The stacked gate with answer steering meets the method issue's whole bar (measured 100 % refusal here).
    _assert_meets_method_bar(van, m["mllmeraser_stacked_gate"])
    assert res["checks"]["refusal"]["mllmeraser_stacked_gate"]["answerable_refusal_rate"] <= 0.05
    # The eraser is a test-time method: no training, so fit time is only PGD + statistics.
    assert res["timing"]["mllmeraser"]["fit_s"] > 0
    sweep = [json.loads(line) for line in (runs[0][0] / "sweep.jsonl").read_text().splitlines() if line.strip()]
    assert len(sweep) >= 5


def _assert_meets_method_bar(van: dict, ours: dict, refusal_min: float = 0.9) -> None:
    """The method issue's bar, written out here rather than read from the demo's own checks."""
    assert ours["forget"]["cls_acc"] <= 0.05 and ours["forget"]["gen_rougeL"] <= 0.2
    assert ours["forget"]["refusal_rate"] >= refusal_min and ours["test"]["cls_acc"] <= 0.15
    for split in ("retain", "celebrity"):
        assert van[split]["cls_acc"] - ours[split]["cls_acc"] <= 0.03, split
        assert ours[split]["gibberish_rate"] <= 0.02, split


def _strip_times(obj):
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items()
                if not (k.endswith("_s") or k in ("seconds", "total_s", "timing"))}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


def test_same_seed_gives_identical_results(runs):
    (_, a), (_, b) = runs
    assert _strip_times(a["methods"]) == _strip_times(b["methods"])
    assert _strip_times(a["checks"]) == _strip_times(b["checks"])
    assert _strip_times(a["config"]) == _strip_times(b["config"])


def test_eval_of_the_saved_artifact_reproduces_the_demos_numbers(runs, tmp_path):
    """``eval --artifact`` evaluates the demo's saved eraser as it is (no refit, no new choice of strength): its
    every metric equals what the demo measured for that variant."""
    (out, res), _ = runs
    assert main(["eval", "--quick", "--no-oracle", "--no-progress", "--threads", "2", "--artifact", str(out),
                 "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert set(again["methods"]) == {"vanilla", "mllmeraser (artifact)"}
    for split in SPLITS:
        for metric in METRICS:
            assert again["methods"]["mllmeraser (artifact)"][split][metric] == \
                res["methods"]["mllmeraser"][split][metric], (split, metric)
            assert again["methods"]["vanilla"][split][metric] == res["methods"]["vanilla"][split][metric]
    assert again["timing"]["mllmeraser (artifact)"]["fit_s"] == 0.0
    assert 0.0 < again["methods"]["vanilla"]["forget"]["answer_prob"] <= 1.0
