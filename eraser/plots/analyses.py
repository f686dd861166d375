"""Figures of the analysis scripts, from their saved JSON: data in, PNG out, nothing recomputed.

Same conventions as the other figures (:mod:`eraser.plots.canvas`: its style, Agg canvas, atomic PNG
writes, 120 dpi): each ``plot_*`` takes the loaded data, the JSON file or
the run folder holding it, writes one PNG and returns its path, or prints
why it skipped and returns ``None`` when the input is absent.

===================  =============  ===========================================
figure               input          shows
===================  =============  ===========================================
probe_accuracy.png   probing.json   probe accuracy by layer, before vs after steering
patching_heatmap.png patching.json  information flow (image patching) and steering patching
leakage_bars.png     leakage.json   each attack's success rate, vanilla vs steered
heads_heatmap.png    heads.json     per-head patching; attention to the image, vanilla vs steered
pgd_budget.png       pgd_budget.json the PGD budget: attack loss, direction cosines, validation numbers
answer_shift.png     answer_shift.json  the projection on the erasure direction along the answer, vanilla vs steered
attribution.png      attribution.json   attribution patching vs activation patching: effects, position maps
===================  =============  ===========================================

>>> from eraser.plots import plot_leakage
>>> plot_leakage("runs/leakage", "runs/leakage/leakage_bars.png")   # doctest: +SKIP
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import matplotlib
import numpy as np
from matplotlib.colors import TwoSlopeNorm

from .canvas import STYLE, PathLike, new_figure, read_json, save_png, say_skipped

__all__ = ["plot_probe_accuracy", "plot_patching_heatmap", "plot_leakage", "plot_heads_heatmap", "plot_pgd_budget",
           "plot_answer_shift", "plot_attribution", "FIGURES"]

_COND = (  # (probe, run, label, colour)
    ("vanilla_probe", "vanilla", "vanilla probe / vanilla run", "#1f77b4"),
    ("vanilla_probe", "steered", "vanilla probe / steered run", "#d62728"),
    ("steered_probe", "steered", "steered probe / steered run", "#2ca02c"),
)


def _f(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None else math.nan


# -- probing ------------------------------------------------------------------------------------------------
def plot_probe_accuracy(source: Any, out_path: PathLike) -> Path | None:
    """Probe accuracy by layer (vision blocks, then LM blocks), one row per task and one column per LM position.

    Solid lines: all held-out queries (balanced accuracy for forget-vs-retain);
    dashed: the forget profiles' queries only.  Colours: vanilla probe on the
    vanilla run, the same probe on the steered run, a probe trained on the
    steered run.  Dotted grey: chance (for identity and birthplace, of the forget
    queries' accuracy: a random guess with the training labels' frequencies); dash-dot: the majority class's
    share of all held-out queries.
    """
    data, path = read_json(source, "probing.json")
    if not data or not data.get("tasks"):
        say_skipped("probe_accuracy", f"no probing results ({path or 'no data'})")
        return None
    sites = data["sites"]
    vision = [s for s in sites if s["tower"] == "vision"]
    positions = [p for p in data.get("positions", []) if any(s["position"] == p and s["tower"] == "lm" for s in sites)]
    tasks = [t for t in data["tasks"] if "sites" in data["tasks"][t]]  # skipped tasks have none
    if not tasks:
        say_skipped("probe_accuracy", "every probing task was skipped")
        return None
    with matplotlib.rc_context(STYLE):
        fig = new_figure(3.4 * len(positions) + 1.6, 2.4 * len(tasks) + 0.6)
        axes = fig.subplots(len(tasks), len(positions), squeeze=False, sharey=True)
        for i, task in enumerate(tasks):
            t = data["tasks"][task]
            main = "balanced_acc" if task == "forget" else "acc"
            for j, pos in enumerate(positions):
                ax = axes[i][j]
                col_sites = vision + sorted((s for s in sites if s["tower"] == "lm" and s["position"] == pos),
                                            key=lambda s: s["layer"])
                x = np.arange(len(col_sites))
                for probe, run, label, colour in _COND:
                    for metric, ls in ((main, "-"), ("forget_acc", "--")):
                        y = [_f(t["sites"][s["key"]][probe][run].get(metric)) for s in col_sites]
                        ax.plot(x, y, ls, marker="o" if ls == "-" else None, ms=3, color=colour, lw=1.2,
                                label=f"{label} ({'all' if ls == '-' else 'forget queries'})" if i == j == 0 else None)
                if task == "forget":
                    ax.axhline(t["balanced_chance"], color="grey", ls=":", lw=1, label="chance" if i == j == 0 else None)
                elif "majority_chance" in t:  # chance: of forget queries' accuracy; majority: of all queries'
                    ax.axhline(_f(t["majority_chance"]), color="grey", ls="-.", lw=0.8,
                               label="majority class (all)" if i == j == 0 else None)
                    ax.axhline(_f(t["chance"]), color="grey", ls=":", lw=1,
                               label="chance (forget queries)" if i == j == 0 else None)
                else:  # a probing.json from before the forget queries had their own chance level
                    ax.axhline(_f(t["chance"]), color="grey", ls=":", lw=1, label="chance" if i == j == 0 else None)
                if vision:
                    ax.axvspan(-0.5, len(vision) - 0.5, color="#eeeeee", zorder=0)
                ax.set_xticks(x, [f"v{s['layer']}" if s["tower"] == "vision" else str(s["layer"]) for s in col_sites])
                ax.set_ylim(-0.03, 1.03)
                if i == 0:
                    ax.set_title(f"LM position: {pos.replace('_', ' ')}")
                if i == len(tasks) - 1:
                    ax.set_xlabel("block (v = vision tower, image mean)")
                if j == 0:
                    ax.set_ylabel(f"{t.get('label', task)}\n{'balanced ' if task == 'forget' else ''}accuracy")
        fig.legend(loc="outside lower center", ncol=4, frameon=False)
        strength = ((data.get("config") or {}).get("eraser") or {}).get("strength")
        fig.suptitle(f"Linear probes before vs after MLLMEraser (λ={strength})")
        return save_png(fig, out_path, {"summary": data.get("summary", {})})


# -- patching -----------------------------------------------------------------------------------------------
def _panel(ax, fig, grid: Mapping[str, Any], title: str, xlabel: str) -> None:
    vals = np.array([[_f(v) for v in row] for row in grid["values"]], dtype=float)
    finite = vals[np.isfinite(vals)]
    lim = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    cm = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cm, norm=TwoSlopeNorm(0.0, -lim, lim), aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.85, label="normalised effect")
    ax.set_xticks(range(len(grid["cols"])), [str(c) for c in grid["cols"]])
    ax.set_yticks(range(len(grid["rows"])), grid["rows"])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    for (r, c), v in np.ndenumerate(vals):
        if np.isfinite(v):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(v) > 0.6 * lim else "black")


def plot_patching_heatmap(source: Any, out_path: PathLike) -> Path | None:
    """Normalised patching effects: image clean->corrupted flow (vision tower + projector, LM image/last positions)
    and, when present, the steered->vanilla patching per layer."""
    data, path = read_json(source, "patching.json")
    if not data or "flow" not in data:
        say_skipped("patching_heatmap", f"no patching results ({path or 'no data'})")
        return None
    flow = data["flow"]
    panels = [(flow["vision_grid"], "Vision tower + projector (all patches)", "vision block"),
              (flow["lm_grid"], "Language model (image positions / answer position)", "LM block (resid_pre)")]
    if data.get("steering") and data["steering"].get("grid"):
        panels.append((data["steering"]["grid"], "Steered → vanilla (refusal vs answer)", "LM block"))
    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        widths = [max(2.0, 0.55 * len(p[0]["cols"]) + 1.6) for p in panels]
        fig = new_figure(sum(widths) + 1.0, 2.9)
        axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=widths)[0]
        for ax, (grid, title, xlabel) in zip(axes, panels):
            _panel(ax, fig, grid, title, xlabel)
        title = (f"Image patching over {flow.get('n_pairs', '?')} profile pairs: name-token logit diff, "
                 f"clean {_f(flow.get('clean')):.2f} / corrupted {_f(flow.get('corrupted')):.2f}")
        st = data.get("steering") or {}
        if st.get("grid"):
            title += (f"; steering: refusal − answer log-prob, vanilla {_f(st.get('vanilla')):.2f} / "
                      f"steered {_f(st.get('steered')):.2f}")
        fig.suptitle(title)
        return save_png(fig, out_path, {"lm_grid": flow["lm_grid"], "vision_grid": flow["vision_grid"]})


# -- heads --------------------------------------------------------------------------------------------------
def plot_heads_heatmap(source: Any, out_path: PathLike) -> Path | None:
    """Per-head patching effects (layer x head, all positions and the answer position), the last token's
    attention on image tokens by layer, vanilla vs steered, for the forget and retain questions, and the
    components whose direct share of the refusal logit the steering changes most."""
    data, path = read_json(source, "heads.json")
    if not data or "flow" not in data:
        say_skipped("heads_heatmap", f"no per-head results ({path or 'no data'})")
        return None
    flow, att = data["flow"], data.get("attention") or {}
    grids = [({"rows": [str(l) for l in flow["layers"]], "cols": flow["heads"], "values": flow["effects"][part]},
              title) for part, title in (("all", "Head output patched, all positions"),
                                          ("answer", "Head output patched, answer position"))]
    writers = data.get("writers") or {}
    inputs = flow.get("inputs") or {}
    second = [({"rows": [str(l) for l in flow["layers"]], "cols": list(range(len(inputs[c][0]))), "values": inputs[c]},
               title) for c, title in (("q", "Query patched"), ("k", "Key patched"), ("v", "Value patched"))
              if inputs.get(c)]
    if flow.get("vision"):
        second.append(({"rows": [str(l) for l in range(len(flow["vision"]))], "cols": list(range(len(flow["vision"][0]))),
                        "values": flow["vision"]}, "Vision-tower head patched"))
    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        n_panels = len(grids) + bool(att) + bool(writers.get("top_change"))
        n_cols = max(n_panels, len(second))
        fig = new_figure(4.0 * n_cols, 3.0 * (1 + bool(second)))
        every = fig.subplots(1 + bool(second), n_cols, squeeze=False)
        axes = every[0][:n_panels]
        for ax in every[0][n_panels:]:
            ax.set_axis_off()
        for ax, (grid, title) in zip(every[1] if second else [], second):
            _panel(ax, fig, grid, title + " (all positions)", "head")
            ax.set_ylabel("vision layer" if title.startswith("Vision") else "LM layer")
        for ax in (every[1][len(second):] if second else []):
            ax.set_axis_off()
        for ax, (grid, title) in zip(axes, grids):
            _panel(ax, fig, grid, title, "head")
            ax.set_ylabel("LM layer")
        if writers.get("top_change"):
            ax = axes[-1]
            top = writers["top_change"]
            y = np.arange(len(top))
            ax.barh(y - 0.2, [t["vanilla"] for t in top], 0.4, color="#4c72b0", label="vanilla")
            ax.barh(y + 0.2, [t["steered"] for t in top], 0.4, color="#dd8452", label="steered")
            ax.set_yticks(y, [t["component"] for t in top])
            ax.invert_yaxis()
            ax.axvline(0, color="grey", lw=0.8)
            ax.set_xlabel("direct share of refusal − answer logit")
            ax.set_title("Who writes the refusal (forget questions)")
            ax.legend(fontsize=6, frameon=False)
        if att:
            ax = axes[len(grids)]
            for (split, d), colour in zip(att.items(), ("#d62728", "#1f77b4", "#2ca02c")):
                x = np.arange(len(d["vanilla_by_layer"]))
                ax.plot(x, d["vanilla_by_layer"], "-o", ms=3, color=colour, label=f"{split}, vanilla")
                ax.plot(x, d["steered_by_layer"], "--s", ms=3, color=colour, label=f"{split}, steered")
                ax.set_xticks(x, [str(i) for i in x])
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("LM layer")
            ax.set_ylabel("attention on image tokens")
            ax.set_title("Last prompt token → image (mean over heads)")
            ax.legend(fontsize=6, frameon=False)
        fig.suptitle(f"Per-head patching over {flow.get('n_pairs', '?')} profile pairs: name-token logit diff, "
                     f"clean {_f(flow.get('clean')):.2f} / corrupted {_f(flow.get('corrupted')):.2f}")
        return save_png(fig, out_path, {"top_answer": flow.get("top_answer", [])})


# -- leakage ------------------------------------------------------------------------------------------------
def _paired_bars(ax, labels: list[str], vanilla: np.ndarray, steered: np.ndarray, ylabel: str, title: str) -> None:
    """Vanilla and steered rates side by side per label, each bar annotated ("–" where missing)."""
    x = np.arange(len(labels))
    w = 0.38
    ax.bar(x - w / 2, np.nan_to_num(vanilla), w, color="#4c72b0", label="vanilla")
    ax.bar(x + w / 2, np.nan_to_num(steered), w, color="#dd8452", label="steered (MLLMEraser)")
    for xi, (a, b) in enumerate(zip(vanilla, steered)):
        for off, v in ((-w / 2, a), (w / 2, b)):
            ax.text(xi + off, (v if np.isfinite(v) else 0) + 0.01, f"{v:.2f}" if np.isfinite(v) else "–",
                    ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1.28)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def plot_leakage(source: Any, out_path: PathLike) -> Path | None:
    """Success rate of each extraction attack on the vanilla and the steered model (plus collateral damage)."""
    data, path = read_json(source, "leakage.json")
    if not data or not data.get("attacks"):
        say_skipped("leakage_bars", f"no leakage results ({path or 'no data'})")
        return None
    attacks = data["attacks"]
    names = list(attacks)
    van = np.array([_f(attacks[a]["vanilla"]) for a in names])
    ste = np.array([_f(attacks[a]["steered"]) for a in names])
    coll = data.get("collateral") or {}
    with matplotlib.rc_context(STYLE):
        ncols = 2 if coll else 1
        fig = new_figure(max(5.0, 0.55 * len(names) + 2.0) + (3.0 if coll else 0), 3.6)
        axes = fig.subplots(1, ncols, squeeze=False, width_ratios=[max(3.0, 0.55 * len(names)), 2.2][:ncols])[0]
        _paired_bars(axes[0], [attacks[a].get("label", a) for a in names], van, ste,
                     "attack success rate (forget facts extracted)", "Extracting forget-set knowledge")
        axes[0].legend(frameon=False, loc="upper center", ncol=2)
        if coll:
            cn = list(coll)
            _paired_bars(axes[1], [coll[c].get("label", c) for c in cn], np.array([_f(coll[c]["vanilla"]) for c in cn]),
                         np.array([_f(coll[c]["steered"]) for c in cn]), "retain facts answered correctly ↑",
                         "Collateral damage")
        eraser = (data.get("config") or {}).get("eraser") or {}
        which = ", ".join(x for x in (eraser.get("variant"), None if eraser.get("strength") is None
                                      else f"λ={eraser['strength']}") if x)
        fig.suptitle("Leakage under an API threat model (the steering hook cannot be removed)"
                     + (f": {which}" if which else ""))
        rates = {a: {"vanilla": attacks[a]["vanilla"], "steered": attacks[a]["steered"]} for a in names}
        return save_png(fig, out_path, {"attacks": rates, "eraser": which})


def plot_pgd_budget(source: Any, out_path: PathLike) -> Path | None:
    """Per PGD budget: the recall answer's loss (clean vs attacked), the direction's cosine with the clean
    images' and with the eraser's own (smallest over the steered layers), and the validation numbers of the
    eraser rebuilt with that direction at the eraser's strength."""
    data, path = read_json(source, "pgd_budget.json")
    if not data or not data.get("budgets"):
        say_skipped("pgd_budget", f"no PGD budget results ({path or 'no data'})")
        return None
    budgets = sorted(data["budgets"], key=lambda b: _f(b.get("eps_255")))
    eps = np.array([_f(b.get("eps_255")) for b in budgets])
    with matplotlib.rc_context(STYLE):
        fig = new_figure(11.0, 3.4)
        ax_loss, ax_cos, ax_val = fig.subplots(1, 3)
        for key, label, ls in (("clean", "clean images", ":"), ("attacked", "after the attack", "-")):
            y = np.array([_f((b.get("target_loss") or {}).get(key)) for b in budgets])
            ax_loss.plot(eps, np.clip(y, 1e-12, None), ls, marker="o", ms=3, label=label)
        ax_loss.set_yscale("log")
        ax_loss.set(xlabel="PGD eps (/255)", ylabel="recall answer loss (mean)", title="The attack")
        ax_loss.legend(frameon=False)
        lowest = 1.0
        for key, label in (("cosine_to_clean", "vs clean images' direction"), ("cosine_to_eraser", "vs the eraser's"),
                           ("answer_cosine_to_eraser", "answer direction vs the eraser's")):
            y = np.array([min(b[key]) if b.get(key) else math.nan for b in budgets], dtype=float)
            if np.isfinite(y).any():
                ax_cos.plot(eps, y, marker="o", ms=3, label=label)
                lowest = min(lowest, float(np.nanmin(y)))
        # never zoomed past 0.9: a change in the fourth decimal must look like one, not like a crossing
        ax_cos.set_ylim(min(0.9, lowest - 0.02), 1.005)
        ax_cos.set(xlabel="PGD eps (/255)", ylabel="cosine (smallest over layers)", title="The erasure direction")
        ax_cos.legend(frameon=False)
        own = [(b.get("validation") or {}).get("at_own_strength") or {} for b in budgets]
        # distinct markers and dashes: lines that coincide (forget refused and retain kept, both 1) stay visible
        for (key, label), style in zip((("forget_refusal", "forget refused"), ("forget_cls", "forget multiple choice"),
                                        ("retain_cls", "retain multiple choice"),
                                        ("answerable_refusal", "answerable refused")),
                                       (("o", "-", 7), ("s", "--", 5), ("^", ":", 4), ("x", "-.", 6))):
            marker, ls, ms = style
            ax_val.plot(eps, [_f(o.get(key)) for o in own], marker=marker, ls=ls, ms=ms, mfc="none", label=label)
        strength = ((data.get("config") or {}).get("eraser") or {}).get("strength")
        ax_val.set(xlabel="PGD eps (/255)", ylim=(-0.03, 1.03), ylabel="rate (validation split)",
                   title="Gate held fixed" + (f", λ={strength:g}" if isinstance(strength, (int, float)) else ""))
        ax_val.legend(frameon=False, fontsize="small")
        return save_png(fig, out_path, {"eps_255": eps.tolist()})


def plot_answer_shift(source: Any, out_path: PathLike) -> Path | None:
    """Per split (columns: forget, retain) and direction (rows: the erasure direction, and the answer direction
    when the eraser has answer steps): the mean projection at each answer position ``t`` (0: the last prompt
    token), vanilla (dashed) and steered (solid), one colour per steered layer; the shaded span is where the
    eraser pushes (the prompt and its answer steps)."""
    data, path = read_json(source, "answer_shift.json")
    if not data or not data.get("splits"):
        say_skipped("answer_shift", f"no answer-shift results ({path or 'no data'})")
        return None
    splits = data["splits"]
    config = data.get("config") or {}
    k = config.get("steered_steps") or 0
    keys = list(config.get("directions") or ["erasure"])
    with matplotlib.rc_context(STYLE):
        fig = new_figure(5.0 * len(splits), 3.2 * len(keys))
        axes = np.array(fig.subplots(len(keys), len(splits), squeeze=False))
        for col, (split, entry) in enumerate(splits.items()):
            refused = {m: (entry.get(m) or {}).get("refusal_rate") for m in ("vanilla", "steered")}
            for row, key in enumerate(keys):
                ax = axes[row, col]
                per_layer = ((entry.get("vanilla") or {}).get("directions") or {}).get(key) or {}
                for i, layer in enumerate(sorted(per_layer, key=int)):
                    for model, ls in (("vanilla", "--"), ("steered", "-")):
                        got = ((entry.get(model) or {}).get("directions") or {}).get(key) or {}
                        y = np.array([_f(v) for v in (got.get(layer) or {}).get("mean") or []], dtype=float)
                        ax.plot(np.arange(len(y)), y, ls, color=f"C{i}", marker="o", ms=2.5,
                                label=f"layer {layer}, {model}")
                if not config.get("every_step"):
                    ax.axvspan(-0.5, k + 0.5, color="0.9", zorder=0)
                ax.set(xlabel="answer position t (0: last prompt token)", ylabel=f"projection on the {key} direction",
                       title=f"{split}: refused {_pct(refused['vanilla'])} vanilla, {_pct(refused['steered'])} steered")
                ax.legend(frameon=False, fontsize="x-small")
        return save_png(fig, out_path, {"steered_steps": k, "splits": list(splits), "directions": keys})


# -- attribution patching -----------------------------------------------------------------------------------
_ATTRIBUTION_PARTS = (("vision", "vision + projector", "o"), ("lm_image", "LM, image positions", "s"),
                      ("lm_answer", "LM, answer position", "^"), ("heads", "heads", "x"),
                      ("positions", "resid_pre x image token", "."))


def plot_attribution(source: Any, out_path: PathLike) -> Path | None:
    """Attribution patching against activation patching: every cell's normalised effect by patching (x) and by
    each estimate (y; one marker per experiment, the diagonal is agreement), the layer x image-token map by each
    method, and the steering experiment's per-layer effects by each."""
    data, path = read_json(source, "attribution.json")
    if not data or not (data.get("name") or {}).get("parts"):
        say_skipped("attribution", f"no attribution results ({path or 'no data'})")
        return None
    name, st = data["name"], data.get("steering") or {}
    grid = name.get("positions_grid") or {}
    estimates = [m for m in ("attribution", "integrated") if m in grid]
    titles = {"patching": "patched", "attribution": "first-order estimate",
              "integrated": f"integrated estimate ({name.get('steps', '?')} steps)"}
    with matplotlib.rc_context(STYLE):
        fig = new_figure(17.0, 7.2)
        grid_axes = fig.subplots(2, len(estimates) + 2, squeeze=False)
        # top: the scatters, steering, the portrait's patches; bottom: the three position maps
        top, bottom = list(grid_axes[0]), list(grid_axes[1][:len(estimates) + 1])
        grid_axes[1][-1].set_axis_off()
        for ax, m in zip(top, estimates):
            lim = 1.0
            for key, label, marker in _ATTRIBUTION_PARTS:
                part = name["parts"].get(key)
                if not part or m not in part:
                    continue
                x = np.array([_f(v) for v in part["patching"]])
                y = np.array([_f(v) for v in part[m]])
                ok = np.isfinite(x) & np.isfinite(y)
                if ok.any():
                    lim = max(lim, float(np.abs(x[ok]).max()), float(np.abs(y[ok]).max()))
                r = _f(((part.get("agreement") or {}).get(m) or {}).get("pearson_r"))
                ax.scatter(x, y, marker=marker, s=14, label=f"{label} (r = {r:.2f})")
            ax.plot([-lim, lim], [-lim, lim], color="0.5", lw=0.8, ls="--")
            ax.set(xlabel="activation patching (normalised effect)", ylabel=titles[m], title=f"Every cell: {titles[m]}")
            ax.legend(frameon=False, fontsize="x-small")
        for ax, m in zip(bottom, ["patching"] + estimates):
            vals = grid.get(m) or []
            _panel(ax, fig, {"rows": [str(l) for l in grid.get("layers", [])],
                             "cols": list(range(len(vals[0]) if vals else 0)), "values": vals},
                   f"resid_pre at one image token: {titles[m]}", "image token (raster order)")
            ax.set_ylabel("LM layer")
            for t in ax.texts[:]:  # too many cells for numbers
                t.remove()
        ax = top[-1]
        patches = (name.get("patch_grid") or {}).get("integrated")
        if patches:
            _panel(ax, fig, {"rows": list(range(len(patches))), "cols": list(range(len(patches[0]))), "values": patches},
                   f"Portrait patches at {name['patch_grid'].get('site', '?')}: integrated", "patch column")
            ax.set_ylabel("patch row")
        else:
            ax.set_axis_off()
        ax = top[-2]
        if st.get("sites"):
            x = np.arange(len(st["sites"]))
            methods = ["patching"] + [m for m in estimates if m in st]
            w = 0.8 / len(methods)
            for i, m in enumerate(methods):
                ax.bar(x + (i - (len(methods) - 1) / 2) * w, [_f(v) for v in st[m]], w, label=titles[m])
            ax.set_xticks(x, [s.split(".")[1] for s in st["sites"]])
            ax.set(xlabel="LM layer (resid_pre)", ylabel="normalised effect", title="Steered → vanilla")
            ax.legend(frameon=False, fontsize="x-small")
        else:
            ax.set_axis_off()
        fig.suptitle(f"Attribution vs activation patching over {name.get('n_pairs', '?')} profile pairs "
                     f"(name-token logit diff, clean {_f(name.get('clean')):.2f} / corrupted "
                     f"{_f(name.get('corrupted')):.2f})")
        summary = {k: part.get("agreement") for k, part in name["parts"].items()}
        return save_png(fig, out_path, {"parts": summary})


_CIRCUIT_STYLE = {"patching": ("patched", "-"), "attribution": ("first order (EAP)", "--"),
                  "integrated": ("integrated (EAP-IG)", "-."), "random": ("random order", ":")}


def plot_circuit(source: Any, out_path: PathLike) -> Path | None:
    """Edges of the name question: every edge's normalised effect by patching (x) and by each estimate (y), and
    circuit faithfulness against the number of top edges kept, per ranking (``analyses/circuit.py``)."""
    data, path = read_json(source, "circuit.json")
    if not data or not data.get("faithfulness"):
        say_skipped("circuit", f"no circuit results ({path or 'no data'})")
        return None
    effects, counts = data["effects"], data["counts"]
    with matplotlib.rc_context(STYLE):
        fig = new_figure(13.0, 9.5)
        (ax_scatter, ax_grid), curve_axes = fig.subplots(2, 2)
        exact = (data.get("scores") or {}).get("patching")
        if exact:
            from interp.edges import EdgeScores

            scores = EdgeScores.from_dict(exact)
            _panel(ax_grid, fig, {"rows": scores.upstream, "cols": scores.downstream, "values": scores.effects.tolist()},
                   "Each edge patched alone (writer -> reader)", "reader")
            for t in ax_grid.texts[:]:  # too many cells for numbers
                t.remove()
            many = len(scores.downstream) > 20  # the graph split per head: a column per query, key and value
            ax_grid.tick_params(axis="x", labelrotation=90 if many else 45, labelsize=5 if many else None)
            ax_grid.tick_params(axis="y", labelsize=6)
        else:
            ax_grid.set_axis_off()
        x = np.array([_f(v) for v in effects["patching"]])
        lo, hi = 0.0, 0.1
        for m in ("attribution", "integrated"):
            y = np.array([_f(v) for v in effects.get(m, [])])
            if len(y) != len(x):
                continue
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                lo = min(lo, float(x[ok].min()), float(y[ok].min()))
                hi = max(hi, float(x[ok].max()), float(y[ok].max()))
            r = _f(((data.get("agreement") or {}).get(m) or {}).get("pearson_r"))
            ax_scatter.scatter(x, y, s=12, label=f"{_CIRCUIT_STYLE[m][0]} (r = {r:.2f})")
        pad = 0.05 * (hi - lo)
        ax_scatter.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=0.8, ls="--")
        ax_scatter.set(xlabel="edge patched alone (normalised effect)", ylabel="estimate",
                       title=f"{data.get('n_edges', '?')} edges: estimate vs patching")
        ax_scatter.legend(frameon=False, fontsize="x-small")
        titles = {"top": "Circuits: the top k edges", "greedy": "Circuits: k edges grown from the logits"}
        for ax_curve, build in zip(curve_axes, ("top", "greedy")):
            for r, f in (data["faithfulness"].get(build) or {}).items():
                label, ls = _CIRCUIT_STYLE.get(r, (r, "-"))
                ax_curve.plot(counts, [_f(v) for v in f], ls=ls, marker="o", ms=3, label=label)
            ax_curve.axhline(1.0, color="0.5", lw=0.8)
            ax_curve.axhline(0.8, color="0.7", lw=0.8, ls="--")
            ax_curve.set_xscale("log")
            ax_curve.set(xlabel="edges kept", ylabel="faithfulness (clean = 1, corrupted = 0)", title=titles[build])
            ax_curve.legend(frameon=False, fontsize="x-small")
        fig.suptitle(f"The name question's edges over {data.get('n_pairs', '?')} profile pairs (name-token logit diff, "
                     f"clean {_f(data.get('clean')):.2f} / corrupted {_f(data.get('corrupted')):.2f})")
        return save_png(fig, out_path, {"agreement": data.get("agreement"),
                                        "fewest_for_80pct": data.get("fewest_for_80pct")})


def plot_gate_attribution(source: Any, out_path: PathLike) -> Path | None:
    """What the eraser's gate reads: per gate row, the mean share of each component family (the image, the text,
    each block's heads and MLP) of the raw gate value, one bar per split and modality
    (``analyses/gate_attribution.py``)."""
    data, path = read_json(source, "gate_attribution.json")
    if not data or not data.get("rows"):
        say_skipped("gate_attribution", f"no gate attribution results ({path or 'no data'})")
        return None
    rows = data["rows"]
    with matplotlib.rc_context(STYLE):
        has_ablation = any(r.get("ablation") for r in rows)
        per_row = 2 if has_ablation else 1
        fig = new_figure(max(7.0, 2.0 + 0.9 * len(next(iter(rows[0]["groups"].values()))["families"])),
                         3.6 * len(rows) * per_row)
        axes = np.array(fig.subplots(len(rows) * per_row, 1, squeeze=False)).reshape(len(rows), per_row)
        for ax, row in zip(axes[:, 1] if has_ablation else [], rows):
            ablation = row.get("ablation") or {}
            fams = list(ablation)
            keys = [k for k in ("forget/vqa", "forget/qa", "retain/vqa", "retain/qa")
                    if fams and k in ablation[fams[0]]]
            x = np.arange(len(fams))
            w = 0.8 / max(len(keys), 1)
            for i, k in enumerate(keys):
                pos = x + (i - (len(keys) - 1) / 2) * w
                ax.bar(pos, [_f(ablation[f][k]["total"]) for f in fams], w, label=f"{k}: total")
                ax.scatter(pos, [_f(ablation[f][k]["direct"]) for f in fams], marker="_", s=80, color="black",
                           linewidths=1.5)
            ax.axhline(0.0, color="0.5", lw=0.8)
            ax.set_xticks(x, fams, rotation=30, ha="right")
            ax.set(ylabel="change of the raw gate", title="Each family mean-ablated: total (bars), direct share (ticks)")
            ax.legend(frameon=False, fontsize="x-small", ncol=2)
        for ax, row in zip(axes[:, 0], rows):
            groups = row["groups"]
            keys = list(groups)
            fams = [f for f in next(iter(groups.values()))["families"] if f != "other"]
            x = np.arange(len(fams))
            w = 0.8 / max(len(keys), 1)
            for i, k in enumerate(keys):
                ax.bar(x + (i - (len(keys) - 1) / 2) * w, [_f(groups[k]["families"].get(f)) for f in fams], w,
                       label=f"{k} (gate {_f(groups[k]['gate']):.2f})")
            ax.axhline(0.0, color="0.5", lw=0.8)
            ax.set_xticks(x, fams, rotation=30, ha="right")
            ax.set(ylabel="share of the raw gate", title=f"Gate over {', '.join(row['sites'])}")
            ax.legend(frameon=False, fontsize="x-small", ncol=2)
        fig.suptitle(f"What the gate reads ({data.get('n_items', '?')} questions, read: {data.get('read')})")
        return save_png(fig, out_path, {"rows": [{"sites": r["sites"], "max_abs_gap": r.get("max_abs_gap")}
                                                 for r in rows]})


def _pct(v: Any) -> str:
    return "n/a" if not isinstance(v, (int, float)) else f"{100 * v:.0f} %"


#: figure name -> (plot function taking (run_dir or data, out_path), output file name, input file name)
FIGURES = {
    "probe_accuracy": (plot_probe_accuracy, "probe_accuracy.png", "probing.json"),
    "patching_heatmap": (plot_patching_heatmap, "patching_heatmap.png", "patching.json"),
    "leakage_bars": (plot_leakage, "leakage_bars.png", "leakage.json"),
    "heads_heatmap": (plot_heads_heatmap, "heads_heatmap.png", "heads.json"),
    "pgd_budget": (plot_pgd_budget, "pgd_budget.png", "pgd_budget.json"),
    "answer_shift": (plot_answer_shift, "answer_shift.png", "answer_shift.json"),
    "attribution": (plot_attribution, "attribution.png", "attribution.json"),
    "circuit": (plot_circuit, "circuit.png", "circuit.json"),
    "gate_attribution": (plot_gate_attribution, "gate_attribution.png", "gate_attribution.json"),
}
