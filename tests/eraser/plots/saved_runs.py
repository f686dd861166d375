"""Synthetic saved results (results.json, tradeoff.json, gates.json, sweep.jsonl) that every figure test draws from."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
