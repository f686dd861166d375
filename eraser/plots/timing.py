"""Fig. 5: fit and inference time per method, with each method's ratio to MLLMEraser's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib
import numpy as np

from .canvas import ERASER, STYLE, PathLike, as_number, looks_like_results, new_figure, read_json, save_png, say_skipped


def timing_ratios(timing: Mapping[str, Mapping[str, Any]], eraser: str = ERASER) -> dict[str, float]:
    """``{method: fit_s(method) / fit_s(eraser)}`` for every other method with a positive fit time."""
    base = as_number((timing.get(eraser) or {}).get("fit_s"))
    if not (base > 0):
        return {}
    out = {}
    for m, t in timing.items():
        f = as_number((t or {}).get("fit_s"))
        if m != eraser and f > 0:
            out[m] = f / base
    return out


def plot_timing(source: Any, out_path: PathLike, *, eraser: str = ERASER) -> Path | None:
    """Fit and inference wall time per method on a log axis, with each method's fit time relative to ``eraser``.

    ``source`` is results.json's content (or its ``timing`` dict), the file,
    or the run folder.  The annotated ratios are :func:`timing_ratios` of the
    input and are also stored in the PNG (``png_annotations(path)["ratios"]``).
    Zero times (vanilla's fit) cannot sit on a log axis and are written as "0".
    """
    data, path = read_json(source, "results.json")
    timing = (data.get("timing") if looks_like_results(data) else data) if isinstance(data, Mapping) else None
    if not timing:
        say_skipped("timing", f"no timing in results ({path or 'no data'})")
        return None
    methods = [eraser] if eraser in timing else []
    methods += [m for m in timing if m not in (eraser, "vanilla")] + (["vanilla"] if "vanilla" in timing else [])
    fit = np.array([as_number((timing[m] or {}).get("fit_s")) for m in methods])
    inf = np.array([as_number((timing[m] or {}).get("infer_s")) for m in methods])
    pos_vals = np.concatenate([fit[fit > 0], inf[inf > 0]])
    if not pos_vals.size:
        say_skipped("timing", "no positive fit_s / infer_s values")
        return None
    ratios = timing_ratios(timing, eraser)
    floor = float(pos_vals.min()) / 3
    with matplotlib.rc_context(STYLE):
        fig = new_figure(max(5.0, 0.9 * len(methods) + 2.5), 3.6)
        ax = fig.subplots()
        x = np.arange(len(methods))
        w = 0.38
        for off, vals, label, color in ((-w / 2, fit, "fit (choice of settings excluded)", "#4c72b0"),
                                        (w / 2, inf, "inference (full evaluation)", "#dd8452")):
            ok = vals > 0
            ax.bar(x[ok] + off, vals[ok], w, label=label, color=color)
            for xi in x[~ok]:
                ax.text(xi + off, floor * 1.1, "0" if vals[xi] == 0 else "–", ha="center", va="bottom", fontsize=7)
        for i, m in enumerate(methods):
            if m in ratios:
                ax.annotate(_fmt_ratio(ratios[m]), (x[i] - w / 2, fit[i]), textcoords="offset points",
                            xytext=(0, 2), ha="center", va="bottom", fontsize=7, fontweight="bold")
            elif m == eraser and fit[i] > 0:
                ax.annotate("1×", (x[i] - w / 2, fit[i]), textcoords="offset points", xytext=(0, 2),
                            ha="center", va="bottom", fontsize=7, fontweight="bold")
        ax.set_yscale("log")
        ax.set_ylim(floor, float(pos_vals.max()) * 4)
        ax.set_xticks(x, methods, rotation=25, ha="right")
        ax.set_ylabel("wall time (s, log scale)")
        ax.set_title(f"Fit and inference time; bold: fit time relative to {eraser}")
        ax.legend(frameon=False, loc="upper right")
        return save_png(fig, out_path, {"ratios": ratios, "eraser": eraser})


def _fmt_ratio(r: float) -> str:
    return f"{r:.0f}×" if r >= 100 else f"{r:.1f}×" if r >= 1 else f"{r:.2f}×"
