"""The layer x strength sweep as a heatmap (from the sweep's resumable JSONL).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.colors import TwoSlopeNorm

from .canvas import STYLE, PathLike, as_number, fmt_strength, new_figure, read_json, run_folder, save_png, say_skipped


def _load_records(source: Any) -> tuple[list[dict], Path | None]:
    if source is None:
        return [], None
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            p = p / "sweep.jsonl"
        if not p.is_file():
            return [], p
        from interp.sweep import SweepResult

        return list(SweepResult.load(p).records), p
    if hasattr(source, "records"):
        return list(source.records), None
    return list(source), None


def sweep_grid(records: Sequence[Mapping[str, Any]], metric: str, row_key: str = "layer",
               col_key: str = "strength") -> tuple[list, list, np.ndarray]:
    """``(layers, strengths, values[i, j])`` of ``metric``; NaN where missing; a repeated setting keeps its last record.

    Layers ascend with ``-1`` (all layers) last; strengths go gentle to strong (by |strength|).
    """
    cells: dict[tuple, float] = {}
    for rec in records:
        s, r = rec.get("setting") or {}, rec.get("result") or {}
        if row_key in s and col_key in s and metric in r:
            cells[(s[row_key], s[col_key])] = as_number(r[metric])
    rows = sorted({k[0] for k in cells}, key=lambda v: (v == -1, v))
    cols = sorted({k[1] for k in cells}, key=lambda v: (abs(v), v))
    vals = np.full((len(rows), len(cols)), np.nan)
    for (a, b), v in cells.items():
        vals[rows.index(a), cols.index(b)] = v
    return rows, cols, vals


def plot_heatmap(source: Any, out_path: PathLike, *, vanilla_retain: float | None = None,
                 results: Any = None) -> Path | None:
    """Layer x strength heatmaps of forget refusal rate and retain accuracy drop (from a sweep journal).

    ``source`` is sweep.jsonl, a run folder, a ``SweepResult`` or a list of
    ``{"setting", "result"}`` records.  The drop is relative to
    ``vanilla_retain``, else the mean retain accuracy of strength-0 records,
    else ``results`` (or the folder's results.json) vanilla retain cls_acc;
    without any of those the second panel shows retain accuracy itself.
    """
    records, path = _load_records(source)
    layers, strengths, refusal = sweep_grid(records, "forget_refusal_rate")
    if not records or not np.isfinite(refusal).any():
        say_skipped("heatmap", f"no sweep records with forget_refusal_rate ({path or 'no data'})")
        return None
    retain = _align(records, "retain_cls_acc", layers, strengths)
    if vanilla_retain is None:
        zero = [as_number(r["result"].get("retain_cls_acc")) for r in records
                if (r.get("setting") or {}).get("strength") == 0 and "retain_cls_acc" in (r.get("result") or {})]
        zero = [z for z in zero if np.isfinite(z)]
        if zero:
            vanilla_retain = float(np.mean(zero))
    if vanilla_retain is None:
        res, _ = read_json(results if results is not None else run_folder(source), "results.json")
        v = ((((res or {}).get("methods") or {}).get("vanilla") or {}).get("retain") or {}).get("cls_acc")
        vanilla_retain = None if v is None else float(v)
    keep = [j for j, s in enumerate(strengths) if s != 0]
    strengths, refusal, retain = [strengths[j] for j in keep], refusal[:, keep], retain[:, keep]
    if not strengths:
        say_skipped("heatmap", "only strength-0 records")
        return None
    panels = [(refusal, "forget refusal rate", "viridis", None, (0.0, 1.0))]
    if np.isfinite(retain).any():
        if vanilla_retain is not None:
            drop = vanilla_retain - retain
            lim = max(0.05, float(np.nanmax(np.abs(drop))))
            panels.append((drop, f"retain accuracy drop (vanilla {vanilla_retain:.2f} − steered)", "RdBu_r",
                           TwoSlopeNorm(0.0, -lim, lim), None))
        else:
            panels.append((retain, "retain classification accuracy", "viridis", None, (0.0, 1.0)))
    ylabels = ["all" if l == -1 else str(l) for l in layers]
    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        fig = new_figure(max(4.5, 0.45 * len(strengths) + 2.2) * len(panels), max(3.0, 0.32 * len(layers) + 1.6))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (vals, title, cmap, norm, lims) in zip(axes, panels):
            cm = matplotlib.colormaps[cmap].with_extremes(bad="#dddddd")
            kw = {"norm": norm} if norm is not None else {"vmin": lims[0], "vmax": lims[1]}
            im = ax.imshow(np.ma.masked_invalid(vals), cmap=cm, aspect="auto", **kw)
            fig.colorbar(im, ax=ax, shrink=0.9)
            ax.set_xticks(range(len(strengths)), [fmt_strength(s) for s in strengths], rotation=45)
            ax.set_yticks(range(len(layers)), ylabels)
            ax.set_xlabel("steering strength λ")
            ax.set_ylabel("steered layer")
            ax.set_title(title)
            if vals.size <= 200:
                for (i, j), v in np.ndenumerate(vals):
                    if np.isfinite(v):
                        r, g, b, _ = cm(im.norm(v))
                        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if dark else "black")
        fig.suptitle("Layer × strength sweep")
        return save_png(fig, out_path, {"vanilla_retain": vanilla_retain})


def _align(records: Sequence[Mapping[str, Any]], metric: str, layers: list, strengths: list) -> np.ndarray:
    """``metric`` on the (layers, strengths) grid of another metric (NaN where absent)."""
    rows, cols, vals = sweep_grid(records, metric)
    out = np.full((len(layers), len(strengths)), np.nan)
    for i, l in enumerate(rows):
        for j, s in enumerate(cols):
            if l in layers and s in strengths:
                out[layers.index(l), strengths.index(s)] = vals[i, j]
    return out
