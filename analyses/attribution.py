"""Attribution patching against activation patching on the embedded model: does one backward pass find what
one patched run per site finds?

Why: at 7B sizes activation patching is paid per site, head and position, so a study starts with the
first-order estimate (:mod:`interp.attribution_patching`) and patches for real only where it points.  That
is safe only where the estimate ranks sites as patching does; this script measures it on a model that knows
its facts, on the experiments of :mod:`analyses.patching` and :mod:`analyses.heads`, with both methods on the
same pairs, and times both.

Part 1, sites.  The name question (same pairs, teacher-forced prefix and metric as ``analyses.patching``:
the logit difference between the two people's first differing name token): every vision block's output
and the projector (all patches), and every LM block's ``hook_resid_pre``, ``hook_attn_out`` and
``hook_mlp_out`` at the image positions and at the answer position.

Part 2, image positions.  ``blocks.{l}.hook_resid_pre`` at each image token alone (the patch grid in raster
order), by layer: patching runs one pass per (position, layer); the estimate is one
:func:`~interp.attribution_patching.attribution_map`.

Part 3, heads.  Each head's output (``attn.hook_z``) at every position: ``patch_heads`` vs
``attribution_heads``.

Beside them, the integrated estimate per patch of the portrait at ``projector.hook_out`` (the image as the language
model receives it; :func:`~interp.attribution_patching.attribution_vision_maps`): where in the picture the
difference is read from.  Those patches are a complete cut, so the grid adds up to about 1.

Part 4, steering.  The eraser's steered residual stream patched into the vanilla run, per layer, at all
positions (``patch_hooks`` vs ``attribution_hooks``) on the forget questions of ``analyses.patching``'s
part 2: a large intervention, where a first-order estimate is expected to miss.

Effects are normalised over all pairs (clean = 1, corrupted = 0); each part reports Pearson's r between the
two methods' effects, the largest difference, whether they rank the same site first, and the wall time of
each.  Writes ``OUT/attribution.json`` and ``OUT/attribution.png``.

Run: ``python -m analyses.attribution [--quick] [--eraser PATH] [--limit N] [--pairs N]``.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from eraser.argtypes import positive_int
from eraser.data.prompts import REFUSAL
from eraser.data.schema import Profile
from interp.attribution_patching import (attribution_heads, attribution_hooks, attribution_map, attribution_patch,
                                         attribution_vision_maps)
from interp.head_patching import patch_heads
from interp.patching import image_token, logit_diff, patch_hooks, patch_sites

from .common import Context, base_parser, limited, load_context, out_dir, save_json
from .patching import answer_tokens, n_batches, name_pairs, pair_batches, position_mask, steering_queries


class Tally:
    """Batch means of one experiment, pooled over batches by row count: ``clean``, ``corrupted`` and each cell."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n: dict[str, int] = {}

    def add(self, key: str, mean: float, n: int) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + mean * n
        self.n[key] = self.n.get(key, 0) + n

    def mean(self, key: str) -> float:
        return self.sums[key] / self.n[key]

    def effect(self, key: str) -> float:
        """``(cell - corrupted) / (clean - corrupted)`` over every batch pooled; NaN when the runs agree."""
        gap = self.mean("clean") - self.mean("corrupted")
        return (self.mean(key) - self.mean("corrupted")) / gap if gap and math.isfinite(gap) else float("nan")


def compare(patched: Sequence[float], estimated: Sequence[float], labels: Sequence[str]) -> dict[str, Any]:
    """How well ``estimated`` effects track ``patched`` ones: Pearson r, the largest absolute difference, and the
    site each ranks first by absolute effect."""
    a, b = np.asarray(patched, dtype=float), np.asarray(estimated, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b, kept = a[ok], b[ok], [l for l, k in zip(labels, ok) if k]
    r = float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else float("nan")
    top_a = kept[int(np.argmax(np.abs(a)))] if len(a) else None
    top_b = kept[int(np.argmax(np.abs(b)))] if len(b) else None
    return {"n": int(len(a)), "pearson_r": r, "max_abs_diff": float(np.abs(a - b).max()) if len(a) else float("nan"),
            "top_patched": top_a, "top_estimated": top_b, "same_top": top_a == top_b}


def _timed(clock: dict[str, float], key: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    clock[key] = clock.get(key, 0.0) + time.perf_counter() - t0
    return out


# -- parts 1-3: the name question -------------------------------------------------------------------------------
ESTIMATES = ("attribution", "integrated")


def name_question(ctx: Context, profiles: Sequence[Profile], n_pairs: int, steps: int) -> dict[str, Any]:
    model = ctx.model
    specs = name_pairs(ctx.setup, profiles, n_pairs)
    vision = [f"vision.blocks.{l}.hook_resid_post" for l in range(model.n_vision_layers)] + ["projector.hook_out"]
    lm = [f"blocks.{l}.hook_{s}" for l in range(model.n_layers) for s in ("resid_pre", "attn_out", "mlp_out")]
    resid = [f"blocks.{l}.hook_resid_pre" for l in range(model.n_layers)]
    parts = [("vision", vision, "all"), ("lm_image", lm, "image"), ("lm_answer", lm, "answer")]
    methods = ("patching",) + ESTIMATES
    tally = {(m, p): Tally() for m in methods for p in [x[0] for x in parts] + ["positions", "heads", "patches"]}
    k_of = {"attribution": 0, "integrated": steps}
    clock: dict[str, float] = {}
    bs = ctx.args.batch_size
    bar = tqdm(total=n_batches(specs), desc="attribution vs patching", disable=not ctx.progress, leave=False)
    n_image, patch_grid = None, (0, 0)
    for _, clean, corrupt, pos, metric in pair_batches(model, profiles, specs):
        b = clean.batch_size

        def add(method: str, part: str, res, cells: dict[str, float]) -> None:
            t = tally[(method, part)]
            t.add("clean", res.clean, b), t.add("corrupted", res.corrupted, b)
            for key, v in cells.items():
                t.add(key, v, b)

        swap = None  # the batch's real clean and corrupted means, for the cells estimated from maps below
        for part, names, positions in parts:
            where = position_mask(pos) if positions == "answer" else positions
            res = _timed(clock, "patching_sites", lambda: patch_sites(model, clean, corrupt, names, metric, where, bs))
            add("patching", part, res, res.patched)
            swap = swap or res
            for m in ESTIMATES:
                res = _timed(clock, f"{m}_sites", lambda: attribution_patch(model, clean, corrupt, names, metric,
                                                                            where, steps=k_of[m]))
                add(m, part, res, res.patched)
        # part 2: each image token alone, by layer
        image_idx = [row.nonzero().flatten() for row in corrupt.image_mask.cpu()]
        n_image = len(image_idx[0])
        if any(len(ix) != n_image for ix in image_idx):
            raise ValueError("rows of one batch have different numbers of image tokens")
        real: dict[str, float] = {}
        for k in range(n_image):
            res = _timed(clock, "patching_positions",
                         lambda: patch_sites(model, clean, corrupt, resid, metric, image_token(k), bs))
            real.update({f"{n}@{k}": res.patched[n] for n in resid})
        add("patching", "positions", res, real)
        for m in ESTIMATES:
            maps = _timed(clock, f"{m}_positions",
                          lambda: attribution_map(model, clean, corrupt, resid, metric, steps=k_of[m]))
            cells = {f"{n}@{k}": swap.corrupted + float(np.mean([float(maps[n][row, image_idx[row][k]])
                                                                  for row in range(b)]))
                     for n in resid for k in range(n_image)}
            add(m, "positions", swap, cells)
        # the projector's output per patch (integrated): where in the portrait the difference is read from
        vmaps = _timed(clock, "integrated_vision_map", lambda: attribution_vision_maps(
            model, clean, corrupt, ["projector.hook_out"], metric, steps=steps)["projector.hook_out"])
        per_image = torch.stack(vmaps).double()  # [image, h, w]; one image per row here
        patch_grid = tuple(per_image.shape[1:])
        cells = {f"{r},{c}": swap.corrupted + float(per_image[:, r, c].mean())
                 for r in range(patch_grid[0]) for c in range(patch_grid[1])}
        add("integrated", "patches", swap, cells)
        # part 3: heads, every position
        res = _timed(clock, "patching_heads", lambda: patch_heads(model, clean, corrupt, metric, max_rows=bs))
        add("patching", "heads", res, _head_cells(res))
        for m in ESTIMATES:
            res = _timed(clock, f"{m}_heads", lambda: attribution_heads(model, clean, corrupt, metric, steps=k_of[m]))
            add(m, "heads", res, _head_cells(res))
        bar.update(1)
    bar.close()

    out: dict[str, Any] = {"n_pairs": len(specs), "steps": steps, "clean": tally[("patching", "vision")].mean("clean"),
                           "corrupted": tally[("patching", "vision")].mean("corrupted"), "parts": {}}
    n_heads = model.head_counts["lm"][0]
    keyed = {part: names for part, names, _ in parts}
    keyed["positions"] = [f"{n}@{k}" for n in resid for k in range(n_image or 0)]
    keyed["heads"] = [f"L{l}H{h}" for l in range(model.n_layers) for h in range(n_heads)]
    for part, keys in keyed.items():
        eff = {m: [tally[(m, part)].effect(k) for k in keys] for m in methods}
        out["parts"][part] = {"sites": list(keys), **eff,
                              "agreement": {m: compare(eff["patching"], eff[m], keys) for m in ESTIMATES}}
    out["positions_grid"] = {"layers": list(range(model.n_layers)), "n_image_tokens": n_image,
                             **{m: np.reshape(out["parts"]["positions"][m], (model.n_layers, -1)).tolist()
                                for m in methods}}
    t = tally[("integrated", "patches")]
    out["patch_grid"] = {"site": "projector.hook_out", "steps": steps,
                         "integrated": [[t.effect(f"{r},{c}") for c in range(patch_grid[1])]
                                        for r in range(patch_grid[0])]}
    out["timing_s"] = clock
    return out


def _head_cells(res) -> dict[str, float]:
    return {f"L{l}H{h}": float(res.patched[i, h]) for i, l in enumerate(res.layers) for h in range(res.n_heads)}


# -- part 4: the eraser's steering ----------------------------------------------------------------------------
def steering(ctx: Context, forget: Sequence[Profile], steps: int) -> dict[str, Any]:
    model, tok = ctx.model, ctx.model.tokenizer
    items = steering_queries(forget, ctx.args.limit)
    refusal_id = answer_tokens(tok, REFUSAL)[0]
    names = [f"blocks.{l}.hook_resid_pre" for l in range(model.n_layers)]
    by_mod: dict[bool, list[int]] = {}
    for i, it in enumerate(items):
        by_mod.setdefault(it.image is None, []).append(i)
    bs = ctx.args.batch_size
    chunks = [idx[s:s + bs] for idx in by_mod.values() for s in range(0, len(idx), bs)]
    methods = ("patching",) + ESTIMATES
    tally = {m: Tally() for m in methods}
    clock: dict[str, float] = {}
    for chunk in tqdm(chunks, desc="attribution vs patching (steering)", disable=not ctx.progress, leave=False):
        inputs = model.encode([items[i].image for i in chunk], [items[i].prompt for i in chunk])
        metric = logit_diff([refusal_id] * len(chunk), [answer_tokens(tok, items[i].reference)[0] for i in chunk])
        runs = {"patching": lambda: patch_hooks(model, inputs, ctx.hooks(), names, metric, max_rows=bs),
                "attribution": lambda: attribution_hooks(model, inputs, ctx.hooks(), names, metric),
                "integrated": lambda: attribution_hooks(model, inputs, ctx.hooks(), names, metric, steps=steps)}
        for m in methods:
            res = _timed(clock, m, runs[m])
            tally[m].add("clean", res.clean, len(chunk)), tally[m].add("corrupted", res.corrupted, len(chunk))
            for n in names:
                tally[m].add(n, res.patched[n], len(chunk))
    eff = {m: [tally[m].effect(n) for n in names] for m in methods}
    return {"n_queries": len(items), "strength": ctx.strength, "steered_layers": list(ctx.eraser.layers),
            "steered": tally["patching"].mean("clean"), "vanilla": tally["patching"].mean("corrupted"),
            "sites": names, **eff, "agreement": {m: compare(eff["patching"], eff[m], names) for m in ESTIMATES},
            "timing_s": clock}


def run(ctx: Context, n_pairs: int, steps: int) -> dict[str, Any]:
    bench, limit = ctx.setup.bench, ctx.args.limit
    forget = limited(bench.forget, limit)
    profiles = forget + limited(bench.retain, None if limit is None else max(limit, 2))
    return {"config": {**ctx.config(), "steps": steps}, "name": name_question(ctx, profiles, n_pairs, steps),
            "steering": steering(ctx, forget, steps)}


def _num(v: Any, spec: str) -> str:
    """``v`` formatted, or ``--`` at the same width where it is missing (NaN is saved as null)."""
    width = spec.split(".")[0]
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else format("--", f">{width}")


def print_summary(res: dict[str, Any]) -> None:
    name, st = res["name"], res["steering"]
    print(f"\nAttribution vs activation patching, name question over {name['n_pairs']} pairs "
          f"(logit diff clean {name['clean']:.2f}, corrupted {name['corrupted']:.2f}); integrated: "
          f"{name['steps']} steps")
    print(f"  {'experiment':<32} {'cells':>5}   {'first order: r, max|d|, top':<30} integrated: r, max|d|, top")
    rows = [("vision + projector, all patches", name["parts"]["vision"]),
            ("LM sites, image positions", name["parts"]["lm_image"]),
            ("LM sites, answer position", name["parts"]["lm_answer"]),
            ("resid_pre x image token", name["parts"]["positions"]),
            ("heads, all positions", name["parts"]["heads"]), ("steering (steered -> vanilla)", st)]
    for label, part in rows:
        cols = []
        for m in ESTIMATES:
            a = part["agreement"][m]
            cols.append(f"{_num(a['pearson_r'], '6.3f')} {_num(a['max_abs_diff'], '7.3f')} "
                        f"{'same' if a['same_top'] else 'other':>5}")
        print(f"  {label:<32} {part['agreement']['attribution']['n']:>5}   {cols[0]:<30} {cols[1]}")
    t = name["timing_s"]
    for what in ("sites", "positions", "heads"):
        pt = t.get(f"patching_{what}", float("nan"))
        print(f"  time, {what:<9}: patching {pt:6.2f} s, " + ", ".join(
            f"{m} {t.get(f'{m}_{what}', float('nan')):6.2f} s" for m in ESTIMATES))
    print("  time, steering : " + ", ".join(f"{m} {st['timing_s'][m]:6.2f} s" for m in ("patching",) + ESTIMATES))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = base_parser("attribution", __doc__)
    ap.add_argument("--pairs", type=positive_int, default=8, help="profile pairs averaged in the name question")
    ap.add_argument("--steps", type=positive_int, default=8,
                    help="segments of the integrated estimate (steps + 1 differentiated passes per estimate)")
    args = ap.parse_args(argv)
    ctx = load_context(args)
    out = out_dir(args)
    n_pairs = args.pairs if args.limit is None else min(args.pairs, max(args.limit, 1))
    res = save_json(out / "attribution.json", run(ctx, n_pairs, args.steps))
    from eraser.plots import plot_attribution

    png = plot_attribution(res, out / "attribution.png")
    print_summary(res)
    print(f"  wrote {out / 'attribution.json'} and {png}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
