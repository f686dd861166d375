"""eraser.plots.tradeoff: curves from the full evaluation, else from the selection's validation candidates."""
from __future__ import annotations

import json

import numpy as np

from eraser import plots

from .saved_runs import STRENGTHS, assert_png


def test_tradeoff_curves_prefer_full_evaluation(run_dir, tmp_path):
    results = json.loads((run_dir / "results.json").read_text())
    trade = json.loads((run_dir / "tradeoff.json").read_text())
    curves = plots.tradeoff_curves(results, trade)
    c = curves["mllmeraser"]
    assert c.source == "tradeoff.json" and c.strengths == STRENGTHS  # strength-0 row is the vanilla, not a point
    assert c.chosen == results["config"]["selection"]["mllmeraser"]["strength"]
    assert c.vanilla == results["methods"]["vanilla"]
    np.testing.assert_allclose(c.values("forget", "forget_error"),
                               [1 - r["forget"]["cls_acc"] for r in trade["mllmeraser"][1:]])
    # without tradeoff.json: selection candidates (validation), the null "ga" selection is ignored
    sel_curves = plots.tradeoff_curves(results)
    assert set(sel_curves) == {"mllmeraser", "steer_static"}
    assert sel_curves["mllmeraser"].source == "validation"
    assert sel_curves["mllmeraser"].feasible == [r["feasible"] for r in
                                                 results["config"]["selection"]["mllmeraser"]["candidates"]]
    # tradeoff only (no results): vanilla from the strength-0 row
    only = plots.tradeoff_curves(None, trade)
    assert only["steer_static"].vanilla["forget"]["refusal_rate"] == 0.0 and only["steer_static"].chosen is None
    for src, name in ((results, "sel.png"), (trade, "trade.png"), (run_dir / "tradeoff.json", "file.png")):
        p = plots.plot_tradeoff(src, tmp_path / name)
        assert_png(p)
    assert plots.png_annotations(tmp_path / "sel.png")["chosen"]["mllmeraser"] == c.chosen


def test_strength_labels_stack_away_from_the_nearer_edge():
    from eraser.plots.tradeoff import label_offset

    # near the top (weak strengths keep retain ~1): the ninth curve's label goes 74 points down, not up into the title
    assert label_offset(8, last=False, y=0.99) == (5, -74)
    assert label_offset(8, last=True, y=0.98) == (-34, -74)
    # near the bottom (strong strengths break retain): upwards, still stacked 8 points per curve
    assert label_offset(0, last=True, y=0.02) == (-34, 5) and label_offset(3, last=True, y=0.02) == (-34, 29)
    assert label_offset(2, last=False, y=0.1) == (5, 21)
