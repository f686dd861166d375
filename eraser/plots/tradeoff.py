"""Fig. 3: forgetting against retain utility over steering strength, one curve per method.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np

from .canvas import (STYLE, PathLike, as_number, fmt_strength, looks_like_results, new_figure, read_json,
                     save_png, say_skipped)


@dataclass
class Curve:
    """One method's evaluation over steering strengths, sorted gentle to strong (by |strength|)."""

    method: str
    strengths: list[float]
    rows: list[dict[str, Any]]
    source: str  # "tradeoff.json" (full evaluation) or "validation" (autotune candidates)
    chosen: float | None = None
    vanilla: dict[str, Any] | None = None
    tolerance: float | None = None
    feasible: list[bool | None] = field(default_factory=list)

    def values(self, split: str, metric: str) -> np.ndarray:
        return np.array([_metric(r.get(split), metric) for r in self.rows], dtype=float)


def _metric(split_metrics: Mapping[str, Any] | None, metric: str) -> float:
    """``metric`` of one split; ``forget_error`` is ``1 - cls_acc`` (the paper's forgetting axis)."""
    if not split_metrics:
        return math.nan
    if metric == "forget_error":
        return 1.0 - as_number(split_metrics.get("cls_acc"))
    return as_number(split_metrics.get(metric))


def tradeoff_curves(results: Mapping[str, Any] | None = None,
                    tradeoff: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> dict[str, Curve]:
    """Per-method curves: from ``tradeoff`` (full evaluation per strength) where given, else ``results``' selection.

    The vanilla point is ``results["methods"]["vanilla"]`` for full-evaluation
    curves (falling back to a strength-0 row) and the selection's own vanilla
    validation numbers for selection curves; the chosen strength comes from
    ``results["config"]["selection"][method]["strength"]``.
    """
    selection = ((results or {}).get("config") or {}).get("selection") or {}
    full_vanilla = ((results or {}).get("methods") or {}).get("vanilla")
    curves: dict[str, Curve] = {}
    for method, rows in (tradeoff or {}).items():
        rows = sorted((dict(r) for r in rows if r.get("strength") is not None), key=lambda r: abs(r["strength"]))
        zero = [r for r in rows if r["strength"] == 0]
        steered = [r for r in rows if r["strength"] != 0]
        sel = selection.get(method) or {}
        if not steered:
            continue
        curves[method] = Curve(method, [float(r["strength"]) for r in steered], steered, "tradeoff.json",
                               chosen=sel.get("strength"), vanilla=full_vanilla or (zero[0] if zero else None),
                               tolerance=sel.get("tolerance"), feasible=[r.get("feasible") for r in steered])
    for method, sel in selection.items():
        if method in curves or not sel or not sel.get("candidates"):
            continue
        rows = sorted((dict(c) for c in sel["candidates"] if c.get("strength") is not None),
                      key=lambda r: abs(r["strength"]))
        curves[method] = Curve(method, [float(r["strength"]) for r in rows], rows, "validation",
                               chosen=sel.get("strength"), vanilla=sel.get("vanilla"),
                               tolerance=sel.get("tolerance"), feasible=[r.get("feasible") for r in rows])
    return curves


def label_offset(curve: int, last: bool, y: float) -> tuple[int, int]:
    """Offset in points of a curve's strength label at its first or ``last`` point, at retain accuracy ``y``.

    Why: labels of successive curves are stacked 8 points apart so they do not overprint; stacked upwards from a
    point near the top of the axes (where the weak strengths sit, retain ~1) nine curves' labels ran over the
    title, so they stack away from the nearer edge: downwards from high points, upwards from low ones.
    """
    up = y < (0.5 if last else 0.2)
    return (-34 if last else 5, 5 + 8 * curve if up else -10 - 8 * curve)


def _load_tradeoff_inputs(source: Any, tradeoff: Any) -> tuple[dict | None, dict | None]:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            results, _ = read_json(p, "results.json")
            if tradeoff is None:
                tradeoff, _ = read_json(p, "tradeoff.json")
        else:
            data, _ = read_json(p, "")
            results, tradeoff2 = (data, None) if looks_like_results(data) else (None, data)
            tradeoff = tradeoff if tradeoff is not None else tradeoff2
            if results is None and p.parent.is_dir():
                results, _ = read_json(p.parent, "results.json")
        return results, read_json(tradeoff, "tradeoff.json")[0]
    if looks_like_results(source):
        return source, read_json(tradeoff, "tradeoff.json")[0]
    return None, source if source is not None else read_json(tradeoff, "tradeoff.json")[0]


def plot_tradeoff(source: Any, out_path: PathLike, *, tradeoff: Any = None,
                  forget_metrics: Sequence[str] = ("refusal_rate", "forget_error")) -> Path | None:
    """Forgetting vs retain utility over the steering strength, one line per method (paper Fig. 3).

    ``source`` is results.json's content, tradeoff.json's content, either
    file, or the run folder (which supplies both).  One panel per forget
    metric (``refusal_rate``, ``forget_error`` = 1 - forget cls acc) against
    retain classification accuracy; the vanilla model is a star, the chosen
    strength a ring, candidates the autotuner ruled infeasible are hollow, and
    the dotted line is vanilla retain accuracy minus the selection tolerance.
    """
    results, trade = _load_tradeoff_inputs(source, tradeoff)
    # methods without a strength axis (training baselines select lr/epochs instead) have no curve to draw
    curves = {k: c for k, c in tradeoff_curves(results, trade).items() if len(c.strengths)}
    if not curves:
        say_skipped("tradeoff", "no tradeoff.json and no selection candidates in results.json")
        return None
    metrics = [m for m in forget_metrics
               if any(np.isfinite(c.values("forget", m)).any() for c in curves.values())]
    if not metrics or not any(np.isfinite(c.values("retain", "cls_acc")).any() for c in curves.values()):
        say_skipped("tradeoff", "no forget metric or retain cls_acc in the curves")
        return None
    labels = {"refusal_rate": "forget refusal rate ↑", "forget_error": "forget error (1 − cls acc) ↑"}
    with matplotlib.rc_context(STYLE):
        fig = new_figure(4.2 * len(metrics) + 0.8, 3.6)
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        colors = matplotlib.colormaps["tab10"]
        for ax, metric in zip(axes, metrics):
            seen_vanilla: set[tuple[float, float]] = set()
            seen_tol: set[float] = set()
            for i, (name, c) in enumerate(curves.items()):
                col = colors(i % 10)
                x, y = c.values("forget", metric), c.values("retain", "cls_acc")
                ax.plot(x, y, "-", color=col, lw=1.2, alpha=0.8, label=f"{name} ({c.source})")
                feas = np.array([f is not False for f in c.feasible] if c.feasible else [True] * len(x), dtype=bool)
                ax.scatter(x[feas], y[feas], s=16, color=col, zorder=3)
                ax.scatter(x[~feas], y[~feas], s=16, facecolors="white", edgecolors=col, zorder=3)
                for j in sorted({0, len(x) - 1}):  # strength labels at both ends; stacked per curve
                    if np.isfinite(x[j]) and np.isfinite(y[j]):
                        ax.annotate(f"λ={fmt_strength(c.strengths[j])}", (x[j], y[j]), textcoords="offset points",
                                    xytext=label_offset(i, bool(j), float(y[j])), fontsize=6, color=col)
                if c.chosen is not None:
                    k = int(np.argmin([abs(s - c.chosen) for s in c.strengths]))
                    if math.isclose(c.strengths[k], c.chosen, abs_tol=1e-9) and np.isfinite([x[k], y[k]]).all():
                        ax.scatter([x[k]], [y[k]], s=120, facecolors="none", edgecolors=col, linewidths=1.8,
                                   zorder=4, label=f"chosen λ={fmt_strength(c.chosen)} ({name})")
                if c.vanilla:
                    vx, vy = _metric(c.vanilla.get("forget"), metric), _metric(c.vanilla.get("retain"), "cls_acc")
                    key = (round(vx, 6), round(vy, 6))
                    if np.isfinite([vx, vy]).all() and key not in seen_vanilla:
                        ax.scatter([vx], [vy], marker="*", s=140, color="black", zorder=5,
                                   label="vanilla" if not seen_vanilla else None)
                        seen_vanilla.add(key)
                    if c.tolerance is not None and np.isfinite(vy) and round(vy - c.tolerance, 6) not in seen_tol:
                        ax.axhline(vy - c.tolerance, color="grey", ls=":", lw=1,
                                   label="vanilla retain − tolerance" if not seen_tol else None)
                        seen_tol.add(round(vy - c.tolerance, 6))
            ax.set_xlabel(labels.get(metric, f"forget {metric}"))
            ax.set_ylabel("retain classification accuracy ↑")
            ax.set_title(f"{labels.get(metric, metric).rstrip(' ↑')} vs retain utility")
        handles, names = axes[0].get_legend_handles_labels()
        for ax in axes[1:]:
            for h, n in zip(*ax.get_legend_handles_labels()):
                if n not in names:
                    handles.append(h)
                    names.append(n)
        fig.legend(handles, names, loc="outside right center", frameon=False)
        fig.suptitle("Forgetting vs retain utility over steering strength (hollow: infeasible)")
        return save_png(fig, out_path, {"chosen": {n: c.chosen for n, c in curves.items()}})
