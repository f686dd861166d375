"""eraser.plots.heatmap: the layer x strength grid, the vanilla reference, a half-written sweep line."""
from __future__ import annotations

import json

import pytest

from eraser import plots

from .saved_runs import STRENGTHS, _sweep_lines, write_run, assert_png


def test_heatmap_grid_and_drop(run_dir, tmp_path):
    records = [json.loads(l) for l in _sweep_lines()]
    layers, strengths, vals = plots.sweep_grid(records, "forget_refusal_rate")
    assert layers == [0, 2, 4, 6, -1] and strengths == [0.0, *STRENGTHS]
    assert vals[layers.index(4), strengths.index(-0.5)] == pytest.approx(0.75)
    p = plots.plot_heatmap(run_dir, tmp_path / "h.png")
    assert_png(p)
    assert plots.png_annotations(p)["vanilla_retain"] == pytest.approx(0.8)  # from the strength-0 records
    # no strength-0 records: vanilla retain from results.json in the same folder
    d = tmp_path / "run2"
    write_run(d, tradeoff=False, gates=False, sweep=False)
    (d / "sweep.jsonl").write_text("\n".join(l for l in _sweep_lines() if '"strength": 0.0' not in l) + "\n")
    results = json.loads((d / "results.json").read_text())
    results["methods"]["vanilla"]["retain"]["cls_acc"] = expect = 0.75
    (d / "results.json").write_text(json.dumps(results))
    p = plots.plot_heatmap(d, tmp_path / "h2.png")
    assert plots.png_annotations(p)["vanilla_retain"] == pytest.approx(expect)
    # a half-written last line (crashed sweep) is ignored
    (d / "sweep.jsonl").write_text("\n".join(_sweep_lines()) + '\n{"setting": {"lay')
    assert_png(plots.plot_heatmap(d, tmp_path / "h3.png"))
