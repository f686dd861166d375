"""Fig. 4: gate values and projections on the erasure direction, forget vs retain, before and after steering.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib
import numpy as np

from .canvas import SET_COLORS, SET_ORDER, STYLE, PathLike, new_figure, read_json, save_png, say_skipped


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
    names = [s for s in SET_ORDER if s in sets] + [s for s in sets if s not in SET_ORDER]
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
    gates, path = read_json(source, "gates.json")
    if not gates or not any(_as_2d(d.get("gate")).size for _, d in _ordered_sets(gates)):
        say_skipped("gates", f"no gate values ({path or 'no data'})")
        return None
    summary = gate_summary(gates)
    sets = [(n, d) for n, d in _ordered_sets(gates) if n in summary["mean"]]
    n_cols = max(_as_2d(d.get("gate")).shape[1] for _, d in sets)
    layers = summary["layers"] or list(range(n_cols))
    col = _layer_column(layers, layer, n_cols)
    lname = layers[col] if col < len(layers) else col
    with matplotlib.rc_context(STYLE):
        fig = new_figure(12, 3.6)
        ax_h, ax_p, ax_l = fig.subplots(1, 3, width_ratios=[1.1, 1.2, 1.0])
        allg = np.concatenate([_as_2d(d["gate"])[:, min(col, _as_2d(d["gate"]).shape[1] - 1)] for _, d in sets])
        lo, hi = float(np.nanmin(allg)), float(np.nanmax(allg))
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 26)
        for name, d in sets:
            g = _as_2d(d["gate"])
            v = g[:, min(col, g.shape[1] - 1)]
            c = SET_COLORS.get(name)
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
                c = SET_COLORS.get(name, "grey")
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
            c = SET_COLORS.get(name)
            ax_l.plot(xs[:len(m)], m, "-o", ms=3, color=c, label=name)
            ax_l.fill_between(xs[:len(m)], m - s, m + s, color=c, alpha=0.15, lw=0)
        ax_l.axvline(col, color="grey", ls=":", lw=1)
        ax_l.set_xticks(xs, [str(layers[i]) if i < len(layers) else str(i) for i in xs])
        ax_l.set_xlabel("steered layer")
        ax_l.set_ylabel("mean gate (± std)")
        ax_l.set_title("Mean gate per layer")
        ax_l.legend(frameon=False)
        fig.suptitle("Null-space gate: forget vs retain vs test")
        return save_png(fig, out_path, {"layer": lname, "mean_gate": summary["mean"]})
