"""Paper-style figures from saved results: data in, PNG out, nothing recomputed.

Why a separate module of pure functions: the expensive part of a run (fitting,
evaluating, sweeping) writes JSON; every figure is a cheap, deterministic view
of those files, so a figure can be restyled or regenerated long after the run
without touching a model.  Each ``plot_*`` takes either the loaded data or a
path (the file itself or the run folder holding it), writes one PNG at 120 dpi
and returns its path, or prints why it skipped and returns ``None`` when its
input is absent.  Figures are drawn on the Agg canvas directly (no pyplot
state, no global backend switch), so they are safe in scripts, tests and
notebooks alike.

============  ==========================================  =============================
figure        input (in the run folder)                   paper
============  ==========================================  =============================
tradeoff.png  tradeoff.json, else results.json selection  Fig. 3 forgetting vs utility
gates.png     gates.json                                  Fig. 4 gate and projection
timing.png    results.json ``timing``                     Fig. 5 fit / inference cost
heatmap.png   sweep.jsonl                                 layer x strength sweep
============  ==========================================  =============================

Example::

    >>> from eraser.plots import make_all
    >>> paths = make_all("runs/demo")          # doctest: +SKIP
    >>> [p.name for p in paths]                # doctest: +SKIP
    ['tradeoff.png', 'gates.png', 'timing.png', 'heatmap.png']
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

__all__ = [
    "Curve", "DPI", "FIGURES", "gate_summary", "make_all", "plot_gates", "plot_heatmap", "plot_timing",
    "plot_tradeoff", "png_annotations", "sweep_grid", "timing_ratios", "tradeoff_curves",
]

DPI = 120
ERASER = "mllmeraser"
_STYLE = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.5, "figure.titlesize": 10,
}
_SET_COLORS = {"forget": "#d62728", "retain": "#1f77b4", "test": "#2ca02c", "celebrity": "#9467bd"}
_SET_ORDER = ("forget", "retain", "test", "celebrity")
PathLike = str | os.PathLike


# -- shared helpers -----------------------------------------------------------------------------------------
def _say(fig: str, why: str) -> None:
    print(f"[plots] skipping {fig}: {why}", file=sys.stderr)


def _read_json(src: Any, filename: str) -> tuple[Any, Path | None]:
    """``src`` is data (returned as is), a file, or a run folder holding ``filename``; missing -> ``(None, path)``."""
    if src is None:
        return None, None
    if not isinstance(src, (str, os.PathLike)):
        return src, None
    p = Path(src)
    if p.is_dir():
        p = p / filename
    if not p.is_file():
        return None, p
    return json.loads(p.read_text()), p


def _run_dir(src: Any) -> Path | None:
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        return p if p.is_dir() else p.parent
    return None


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_path: PathLike, notes: Mapping[str, Any] | None = None) -> Path:
    """Write the PNG atomically; ``notes`` go into PNG text chunks (read back with :func:`png_annotations`)."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"Software": f"eraser.plots (matplotlib {matplotlib.__version__})"}
    for k, v in (notes or {}).items():
        meta[k] = json.dumps(v, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI, format="png", metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a figure is for sharing
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def png_annotations(path: PathLike) -> dict[str, Any]:
    """The numbers a figure annotated, as stored in its PNG text chunks (e.g. ``{"ratios": {...}}``)."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    out = {}
    for k, v in text.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _fmt_strength(s: float) -> str:
    return f"{s:g}"


# -- Fig. 3: trade-off --------------------------------------------------------------------------------------
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
        return 1.0 - _num(split_metrics.get("cls_acc"))
    return _num(split_metrics.get(metric))


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


def _load_tradeoff_inputs(source: Any, tradeoff: Any) -> tuple[dict | None, dict | None]:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            results, _ = _read_json(p, "results.json")
            if tradeoff is None:
                tradeoff, _ = _read_json(p, "tradeoff.json")
        else:
            data, _ = _read_json(p, "")
            results, tradeoff2 = (data, None) if _looks_like_results(data) else (None, data)
            tradeoff = tradeoff if tradeoff is not None else tradeoff2
            if results is None and p.parent.is_dir():
                results, _ = _read_json(p.parent, "results.json")
        return results, _read_json(tradeoff, "tradeoff.json")[0]
    if _looks_like_results(source):
        return source, _read_json(tradeoff, "tradeoff.json")[0]
    return None, source if source is not None else _read_json(tradeoff, "tradeoff.json")[0]


def _looks_like_results(data: Any) -> bool:
    return isinstance(data, Mapping) and ("methods" in data or "config" in data)


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
        _say("tradeoff", "no tradeoff.json and no selection candidates in results.json")
        return None
    metrics = [m for m in forget_metrics
               if any(np.isfinite(c.values("forget", m)).any() for c in curves.values())]
    if not metrics or not any(np.isfinite(c.values("retain", "cls_acc")).any() for c in curves.values()):
        _say("tradeoff", "no forget metric or retain cls_acc in the curves")
        return None
    labels = {"refusal_rate": "forget refusal rate ↑", "forget_error": "forget error (1 − cls acc) ↑"}
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(4.2 * len(metrics) + 0.8, 3.6)
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
                        ax.annotate(f"λ={_fmt_strength(c.strengths[j])}", (x[j], y[j]), textcoords="offset points",
                                    xytext=(-34, 5 + 8 * i) if j else (5, -10 - 8 * i), fontsize=6, color=col)
                if c.chosen is not None:
                    k = int(np.argmin([abs(s - c.chosen) for s in c.strengths]))
                    if math.isclose(c.strengths[k], c.chosen, abs_tol=1e-9) and np.isfinite([x[k], y[k]]).all():
                        ax.scatter([x[k]], [y[k]], s=120, facecolors="none", edgecolors=col, linewidths=1.8,
                                   zorder=4, label=f"chosen λ={_fmt_strength(c.chosen)} ({name})")
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
        return _save(fig, out_path, {"chosen": {n: c.chosen for n, c in curves.items()}})


# -- Fig. 4: gates and projections --------------------------------------------------------------------------
def _as_2d(values: Any) -> np.ndarray:
    a = np.asarray(values if values is not None else [], dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    return a.reshape(a.shape[0], -1) if a.size else np.zeros((0, 1))


def gate_summary(gates: Mapping[str, Any]) -> dict[str, Any]:
    """``{"layers": [...], "mean": {set: [per layer]}, "std": {...}, "n": {set: n_queries}}`` of the gate values."""
    layers = list(gates.get("layers") or [])
    out: dict[str, Any] = {"layers": layers, "mean": {}, "std": {}, "n": {}}
    for name, d in _ordered_sets(gates):
        g = _as_2d(d.get("gate"))
        if not g.size:
            continue
        out["mean"][name] = np.nanmean(g, axis=0).tolist()
        out["std"][name] = np.nanstd(g, axis=0).tolist()
        out["n"][name] = int(g.shape[0])
    return out


def _ordered_sets(gates: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    sets = gates.get("sets") or {}
    names = [s for s in _SET_ORDER if s in sets] + [s for s in sets if s not in _SET_ORDER]
    return [(n, sets[n]) for n in names if isinstance(sets[n], Mapping)]


def _layer_column(layers: list, layer: Any, n_cols: int) -> int:
    if n_cols == 1:
        return 0
    if layer is None:
        return (len(layers) if layers else n_cols) // 2
    if layer not in layers:
        raise ValueError(f"layer {layer} is not a steered layer; gates.json has {layers}")
    return layers.index(layer)


def plot_gates(source: Any, out_path: PathLike, *, layer: int | None = None) -> Path | None:
    """Gate values and the erasure-direction projection for forget vs retain vs test (paper Fig. 4).

    Left: histogram of per-query gate values at ``layer`` (default: the middle
    steered layer).  Middle: the last-token projection on the erasure
    direction before (hollow) and after (filled) steering, per set.  Right:
    mean gate (± std) at every steered layer.  A working null-space gate opens
    on forget queries and stays shut on retain ones, so only forget
    projections move.
    """
    gates, path = _read_json(source, "gates.json")
    if not gates or not any(_as_2d(d.get("gate")).size for _, d in _ordered_sets(gates)):
        _say("gates", f"no gate values ({path or 'no data'})")
        return None
    summary = gate_summary(gates)
    sets = [(n, d) for n, d in _ordered_sets(gates) if n in summary["mean"]]
    n_cols = max(_as_2d(d.get("gate")).shape[1] for _, d in sets)
    layers = summary["layers"] or list(range(n_cols))
    col = _layer_column(layers, layer, n_cols)
    lname = layers[col] if col < len(layers) else col
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(12, 3.6)
        ax_h, ax_p, ax_l = fig.subplots(1, 3, width_ratios=[1.1, 1.2, 1.0])
        allg = np.concatenate([_as_2d(d["gate"])[:, min(col, _as_2d(d["gate"]).shape[1] - 1)] for _, d in sets])
        lo, hi = float(np.nanmin(allg)), float(np.nanmax(allg))
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 26)
        for name, d in sets:
            g = _as_2d(d["gate"])
            v = g[:, min(col, g.shape[1] - 1)]
            c = _SET_COLORS.get(name)
            ax_h.hist(v, bins=bins, color=c, alpha=0.35, label=f"{name} (n={len(v)})")
            ax_h.hist(v, bins=bins, color=c, histtype="step", lw=1.2)
        ax_h.set_xlabel("gate value")
        ax_h.set_ylabel("queries")
        ax_h.set_title(f"Gate at layer {lname}")
        ax_h.legend(frameon=False)

        data, pos, cols, ticks, ticklabels = [], [], [], [], []
        x = 0.0
        for name, d in sets:
            before, after = _as_2d(d.get("proj_before")), _as_2d(d.get("proj_after"))
            if not before.size and not after.size:
                continue
            for arr, kind in ((before, "before"), (after, "after")):
                if arr.size:
                    data.append(arr[:, min(col, arr.shape[1] - 1)])
                    pos.append(x + (0.0 if kind == "before" else 0.42))
                    cols.append((name, kind))
            ticks.append(x + 0.21)
            ticklabels.append(name)
            x += 1.2
        if data:
            bp = ax_p.boxplot(data, positions=pos, widths=0.36, showfliers=False, patch_artist=True)
            rng = np.random.default_rng(0)
            for patch, vals, p, (name, kind) in zip(bp["boxes"], data, pos, cols):
                c = _SET_COLORS.get(name, "grey")
                patch.set_facecolor(c if kind == "after" else "white")
                patch.set_alpha(0.45 if kind == "after" else 1.0)
                patch.set_edgecolor(c)
                ax_p.scatter(p + rng.uniform(-0.1, 0.1, len(vals)), vals, s=4, color=c, alpha=0.6, zorder=3)
            for med in bp["medians"]:
                med.set_color("black")
            ax_p.axhline(0, color="grey", lw=0.7)
            ax_p.set_xticks(ticks, ticklabels)
            ax_p.set_ylabel("projection on erasure direction")
            ax_p.set_title(f"Projection before (hollow) / after (filled), layer {lname}")
        else:
            ax_p.text(0.5, 0.5, "no projections saved", ha="center", va="center", transform=ax_p.transAxes)
            ax_p.set_axis_off()

        xs = np.arange(n_cols)
        for name, _ in sets:
            m, s = np.array(summary["mean"][name]), np.array(summary["std"][name])
            c = _SET_COLORS.get(name)
            ax_l.plot(xs[:len(m)], m, "-o", ms=3, color=c, label=name)
            ax_l.fill_between(xs[:len(m)], m - s, m + s, color=c, alpha=0.15, lw=0)
        ax_l.axvline(col, color="grey", ls=":", lw=1)
        ax_l.set_xticks(xs, [str(layers[i]) if i < len(layers) else str(i) for i in xs])
        ax_l.set_xlabel("steered layer")
        ax_l.set_ylabel("mean gate (± std)")
        ax_l.set_title("Mean gate per layer")
        ax_l.legend(frameon=False)
        fig.suptitle("Null-space gate: forget vs retain vs test")
        return _save(fig, out_path, {"layer": lname, "mean_gate": summary["mean"]})


# -- Fig. 5: timing -----------------------------------------------------------------------------------------
def timing_ratios(timing: Mapping[str, Mapping[str, Any]], eraser: str = ERASER) -> dict[str, float]:
    """``{method: fit_s(method) / fit_s(eraser)}`` for every other method with a positive fit time."""
    base = _num((timing.get(eraser) or {}).get("fit_s"))
    if not (base > 0):
        return {}
    out = {}
    for m, t in timing.items():
        f = _num((t or {}).get("fit_s"))
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
    data, path = _read_json(source, "results.json")
    timing = (data.get("timing") if _looks_like_results(data) else data) if isinstance(data, Mapping) else None
    if not timing:
        _say("timing", f"no timing in results ({path or 'no data'})")
        return None
    methods = [eraser] if eraser in timing else []
    methods += [m for m in timing if m not in (eraser, "vanilla")] + (["vanilla"] if "vanilla" in timing else [])
    fit = np.array([_num((timing[m] or {}).get("fit_s")) for m in methods])
    inf = np.array([_num((timing[m] or {}).get("infer_s")) for m in methods])
    pos_vals = np.concatenate([fit[fit > 0], inf[inf > 0]])
    if not pos_vals.size:
        _say("timing", "no positive fit_s / infer_s values")
        return None
    ratios = timing_ratios(timing, eraser)
    floor = float(pos_vals.min()) / 3
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(max(5.0, 0.9 * len(methods) + 2.5), 3.6)
        ax = fig.subplots()
        x = np.arange(len(methods))
        w = 0.38
        for off, vals, label, color in ((-w / 2, fit, "fit (incl. strength selection)", "#4c72b0"),
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
        return _save(fig, out_path, {"ratios": ratios, "eraser": eraser})


def _fmt_ratio(r: float) -> str:
    return f"{r:.0f}×" if r >= 100 else f"{r:.1f}×" if r >= 1 else f"{r:.2f}×"


# -- layer x strength heatmap -------------------------------------------------------------------------------
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
            cells[(s[row_key], s[col_key])] = _num(r[metric])
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
        _say("heatmap", f"no sweep records with forget_refusal_rate ({path or 'no data'})")
        return None
    retain = _align(records, "retain_cls_acc", layers, strengths)
    if vanilla_retain is None:
        zero = [_num(r["result"].get("retain_cls_acc")) for r in records
                if (r.get("setting") or {}).get("strength") == 0 and "retain_cls_acc" in (r.get("result") or {})]
        zero = [z for z in zero if np.isfinite(z)]
        if zero:
            vanilla_retain = float(np.mean(zero))
    if vanilla_retain is None:
        res, _ = _read_json(results if results is not None else _run_dir(source), "results.json")
        v = ((((res or {}).get("methods") or {}).get("vanilla") or {}).get("retain") or {}).get("cls_acc")
        vanilla_retain = None if v is None else float(v)
    keep = [j for j, s in enumerate(strengths) if s != 0]
    strengths, refusal, retain = [strengths[j] for j in keep], refusal[:, keep], retain[:, keep]
    if not strengths:
        _say("heatmap", "only strength-0 records")
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
    with matplotlib.rc_context({**_STYLE, "axes.grid": False}):
        fig = _new_figure(max(4.5, 0.45 * len(strengths) + 2.2) * len(panels), max(3.0, 0.32 * len(layers) + 1.6))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (vals, title, cmap, norm, lims) in zip(axes, panels):
            cm = matplotlib.colormaps[cmap].with_extremes(bad="#dddddd")
            kw = {"norm": norm} if norm is not None else {"vmin": lims[0], "vmax": lims[1]}
            im = ax.imshow(np.ma.masked_invalid(vals), cmap=cm, aspect="auto", **kw)
            fig.colorbar(im, ax=ax, shrink=0.9)
            ax.set_xticks(range(len(strengths)), [_fmt_strength(s) for s in strengths], rotation=45)
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
        return _save(fig, out_path, {"vanilla_retain": vanilla_retain})


def _align(records: Sequence[Mapping[str, Any]], metric: str, layers: list, strengths: list) -> np.ndarray:
    """``metric`` on the (layers, strengths) grid of another metric (NaN where absent)."""
    rows, cols, vals = sweep_grid(records, metric)
    out = np.full((len(layers), len(strengths)), np.nan)
    for i, l in enumerate(rows):
        for j, s in enumerate(cols):
            if l in layers and s in strengths:
                out[layers.index(l), strengths.index(s)] = vals[i, j]
    return out


# -- all figures --------------------------------------------------------------------------------------------
#: figure name -> (plot function taking (run_dir, out_path), output file name)
FIGURES: dict[str, tuple[Callable[..., Path | None], str]] = {
    "tradeoff": (plot_tradeoff, "tradeoff.png"),
    "gates": (plot_gates, "gates.png"),
    "timing": (plot_timing, "timing.png"),
    "heatmap": (plot_heatmap, "heatmap.png"),
}


def make_all(run_dir: PathLike, out_dir: PathLike | None = None,
             only: Sequence[str] | None = None) -> list[Path]:
    """Regenerate every figure whose input is in ``run_dir`` (into ``out_dir``, default ``run_dir``).

    Nothing is recomputed; figures without data are skipped with a message.
    A figure whose data is malformed does not stop the others: all are
    attempted, then the first error is re-raised.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run_dir}")
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    from .plots_analyses import FIGURES as ANALYSIS_FIGURES  # probing, patching, leakage (analyses/*.py outputs)

    figures = {**FIGURES, **{k: v[:2] for k, v in ANALYSIS_FIGURES.items()}}
    made: list[Path] = []
    errors: list[tuple[str, BaseException]] = []
    for name in only or figures:
        if name not in figures:
            raise ValueError(f"unknown figure {name!r}; choose from {sorted(figures)}")
        fn, filename = figures[name]
        try:
            p = fn(run_dir, out_dir / filename)
        except Exception as e:  # noqa: BLE001 -- report, finish the others, then re-raise
            print(f"[plots] {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            errors.append((name, e))
            continue
        if p is not None:
            made.append(p)
    if errors:
        raise RuntimeError(f"figures failed: {', '.join(n for n, _ in errors)} (made {[p.name for p in made]})") \
            from errors[0][1]
    return made
