"""eraser.plots: every figure from synthetic saved results, skips on missing input, annotated numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eraser import plots

STRENGTHS = [-0.05, -0.1, -0.2, -0.5, -1.0, -2.0]
METRICS = ("cls_acc", "cloze_acc", "gen_rougeL", "refusal_rate", "gibberish_rate")
TIMING = {
    "vanilla": {"fit_s": 0.0, "infer_s": 3.0},
    "mllmeraser": {"fit_s": 2.5, "infer_s": 3.4, "pgd_s": 1.0, "select_s": 0.8},
    "ga": {"fit_s": 40.0, "infer_s": 3.1},
    "npo": {"fit_s": 55.0, "infer_s": 3.0},
    "steer_static": {"fit_s": 1.25, "infer_s": 3.3},
}


def _split(rng, acc, refusal):
    return {"cls_acc": acc, "cloze_acc": acc * 0.9, "gen_rougeL": 0.4, "refusal_rate": refusal,
            "gibberish_rate": float(rng.uniform(0, 0.02))}


def _results(rng) -> dict:
    methods = {m: {s: _split(rng, float(rng.uniform(0.3, 0.9)), float(rng.uniform(0, 0.5)))
                   for s in ("forget", "test", "retain", "celebrity")} for m in TIMING}
    methods["vanilla"]["forget"].update(cls_acc=0.9, refusal_rate=0.0)  # consistent with tradeoff.json's strength 0
    methods["vanilla"]["retain"].update(cls_acc=0.8, refusal_rate=0.0)
    vanilla_val = {"forget": {"cls_acc": 0.9, "refusal_rate": 0.0, "gibberish_rate": 0.0},
                   "retain": {"cls_acc": 0.8, "refusal_rate": 0.0, "gibberish_rate": 0.0}}
    selection = {}
    for m, slope in (("mllmeraser", 1.0), ("steer_static", 0.6)):
        cands = []
        for s in STRENGTHS:
            k = min(1.0, abs(s) * slope)
            retain_acc = 0.8 - 0.1 * k ** 2
            cands.append({"strength": s, "forget": {"cls_acc": 0.9 - 0.7 * k, "refusal_rate": k, "gibberish_rate": 0.0},
                          "retain": {"cls_acc": retain_acc, "refusal_rate": 0.01, "gibberish_rate": 0.0},
                          "feasible": retain_acc >= 0.78})
        best = max((c for c in cands if c["feasible"]), key=lambda c: c["forget"]["refusal_rate"])
        selection[m] = {"strength": best["strength"], "vanilla": vanilla_val, "candidates": cands,
                        "tolerance": 0.02, "validation": "fresh-questions", "reason": "test"}
    selection["ga"] = None  # a baseline without selection
    return {"config": {"arch": "llava", "seed": 0, "selection": selection}, "methods": methods,
            "timing": TIMING, "checks": {}}


def _tradeoff() -> dict:
    out = {}
    for m, slope in (("mllmeraser", 1.0), ("steer_static", 0.5)):
        rows = [{"strength": 0.0, "forget": {"cls_acc": 0.9, "refusal_rate": 0.0},
                 "retain": {"cls_acc": 0.8, "refusal_rate": 0.0}, "celebrity": {"cls_acc": 0.85}}]
        for s in STRENGTHS:
            k = min(1.0, abs(s) * slope)
            rows.append({"strength": s, "forget": {"cls_acc": 0.9 - 0.8 * k, "refusal_rate": k},
                         "retain": {"cls_acc": 0.8 - 0.15 * k ** 2, "refusal_rate": 0.02 * k},
                         "celebrity": {"cls_acc": 0.85 - 0.1 * k}})
        out[m] = rows
    return out


def _gates(rng) -> dict:
    layers = [2, 4, 6, 8, 10]
    sets = {}
    for name, centre, n in (("forget", 0.85, 40), ("retain", 0.08, 60), ("test", 0.7, 30)):
        gate = np.clip(rng.normal(centre, 0.08, (n, len(layers))), 0, 1)
        before = rng.normal(3.0 if name != "retain" else 0.2, 0.5, (n, len(layers)))
        after = before - gate * 4.0
        sets[name] = {"gate": gate.tolist(), "proj_before": before.tolist(), "proj_after": after.tolist()}
    return {"layers": layers, "sets": sets}


def _sweep_lines() -> list[str]:
    lines = []
    for layer in [0, 2, 4, 6, -1]:
        for s in [0.0, *STRENGTHS]:
            k = min(1.0, abs(s) * (1.5 if layer in (4, -1) else 0.6))
            lines.append(json.dumps({"setting": {"layer": layer, "strength": s},
                                     "result": {"forget_refusal_rate": k, "forget_cls_acc": 0.9 - 0.5 * k,
                                                "retain_cls_acc": 0.8 - 0.2 * k ** 2 * (layer == -1) - 0.02 * k}}))
    return lines


def write_run(d: Path, *, tradeoff: bool = True, gates: bool = True, sweep: bool = True) -> Path:
    """A synthetic run folder in the saved-result formats."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(_results(rng), indent=1))
    if tradeoff:
        (d / "tradeoff.json").write_text(json.dumps(_tradeoff()))
    if gates:
        (d / "gates.json").write_text(json.dumps(_gates(rng)))
    if sweep:
        (d / "sweep.jsonl").write_text("\n".join(_sweep_lines()) + "\n")
    return d


def assert_png(path: Path | None, min_w: int = 400, min_h: int = 250) -> None:
    assert path is not None and path.is_file()
    assert path.stat().st_size > 5 * 1024, path.stat().st_size
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= min_w and h >= min_h, (w, h)
        dpi = im.info.get("dpi")
        assert dpi is None or round(dpi[0]) == plots.DPI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("run"))


def test_make_all_writes_every_figure(run_dir, tmp_path):
    made = plots.make_all(run_dir, tmp_path)
    assert [p.name for p in made] == ["tradeoff.png", "gates.png", "timing.png", "heatmap.png"]
    for p in made:
        assert_png(p)
    with Image.open(tmp_path / "gates.png") as im:  # 12 x 3.6 in at 120 dpi
        assert im.size == (1440, 432)


def test_make_all_skips_missing_inputs(tmp_path, capsys):
    d = write_run(tmp_path / "run", tradeoff=False, gates=False, sweep=False)
    results = json.loads((d / "results.json").read_text())
    del results["config"]["selection"]
    (d / "results.json").write_text(json.dumps(results))
    made = plots.make_all(d)
    assert [p.name for p in made] == ["timing.png"]
    err = capsys.readouterr().err
    for name in ("tradeoff", "gates", "heatmap"):
        assert f"skipping {name}" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plots.make_all(empty) == []
    for fn in (plots.plot_tradeoff, plots.plot_gates, plots.plot_timing, plots.plot_heatmap):
        assert fn(empty, tmp_path / "x.png") is None
        assert fn(None, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(FileNotFoundError):
        plots.make_all(tmp_path / "nope")


def test_timing_ratios_annotated(run_dir, tmp_path):
    expect = {m: TIMING[m]["fit_s"] / TIMING["mllmeraser"]["fit_s"] for m in ("ga", "npo", "steer_static")}
    assert plots.timing_ratios(TIMING) == pytest.approx(expect)
    p = plots.plot_timing(run_dir, tmp_path / "timing.png")
    assert_png(p)
    notes = plots.png_annotations(p)
    assert notes["ratios"] == pytest.approx(expect)  # exactly what the figure annotated, incl. 16.0x, 22.0x, 0.50x
    assert notes["eraser"] == "mllmeraser"
    assert plots.timing_ratios({"vanilla": {"fit_s": 0.0}, "ga": {"fit_s": 1.0}}) == {}  # no eraser -> no ratios
    # the timing dict alone works too
    assert plots.plot_timing(TIMING, tmp_path / "t2.png") is not None


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


def test_gates_summary_and_layer_choice(run_dir, tmp_path):
    gates = json.loads((run_dir / "gates.json").read_text())
    s = plots.gate_summary(gates)
    for name in ("forget", "retain", "test"):
        np.testing.assert_allclose(s["mean"][name], np.mean(gates["sets"][name]["gate"], axis=0))
    assert s["n"] == {"forget": 40, "retain": 60, "test": 30}
    p = plots.plot_gates(gates, tmp_path / "g.png")
    assert plots.png_annotations(p)["layer"] == 6  # middle of [2, 4, 6, 8, 10]
    p = plots.plot_gates(gates, tmp_path / "g2.png", layer=10)
    assert_png(p)
    assert plots.png_annotations(p)["layer"] == 10
    with pytest.raises(ValueError, match="not a steered layer"):
        plots.plot_gates(gates, tmp_path / "g3.png", layer=3)
    # no projections, one layer, constant gates: still a figure
    flat = {"layers": [5], "sets": {"forget": {"gate": [[1.0]] * 5}, "retain": {"gate": [[1.0]] * 5}}}
    assert_png(plots.plot_gates(flat, tmp_path / "g4.png"))


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


def test_scripts_run_from_a_folder(run_dir, tmp_path):
    from figures import figure_main

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "figs"
    r = subprocess.run([sys.executable, "-m", "figures.make_all", "--from", str(run_dir), "--out", str(out),
                        "--only", "timing", "gates"], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gates.png", "timing.png"]
    assert figure_main("heatmap", ["--from", str(run_dir), "--out", str(out)]) == 0
    assert_png(out / "heatmap.png")
    assert figure_main("gates", ["--from", str(tmp_path), "--out", str(out / "none")]) == 1  # no data: skipped
