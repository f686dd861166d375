"""Attribution patching: every site's (and every head's, every position's) patching effect from one backward pass.

Why: activation patching (:mod:`interp.patching`) runs the corrupted input once per site, head or position.
At 7B sizes a layer x position map over a prompt with 576 image tokens is ~18k forward passes.  Attribution
patching (Nanda 2023; Syed et al. 2023, "AtP") replaces each of them by the first-order Taylor term of the
metric around the corrupted run:

    patched(site) - corrupted  ~=  sum over the patched entries of (clean - corrupted) * d metric / d act

with the gradient taken once, in the corrupted run, for all sites together: two forward passes and one
backward pass in all.  The results are the same value objects as patching's
(:class:`~interp.patching.PatchResult`, :class:`~interp.head_patching.HeadPatchResult`; ``meta["method"]`` says
``"attribution"``), so grids, heatmaps and saved files work unchanged, with ``patched`` holding the estimate.

It is an approximation.  It is exact where the metric is linear in the site (``ln_final.hook_normalized``
with :func:`~interp.patching.logit_diff`), close for small clean - corrupted differences, and can be far off,
even in sign, where the swap saturates a nonlinearity: on the quick zoo model, swapping one person's portrait
for another's moves the name logit difference from about +11 to -11, and the first-order estimate of patching
all image positions of block 0 (an effect of exactly 1) is 0.12 over 8 pairs of people and -0.28 over the 2
pairs the tests use (``analyses/attribution.py``; the README has the whole comparison).

``steps=K`` integrates instead of taking one gradient (integrated gradients along the straight path in input
space, as in EAP-IG): ``K + 1`` differentiated runs from the corrupted inputs to the clean ones, and per
site ``sum_j (g_j + g_{j+1}) / 2 * (a_{j+1} - a_j)`` (:func:`path_terms`).  Summed over a complete cut (one
residual stream at every position where the runs differ) these terms add up to the whole clean - corrupted
change, up to the trapezoid rule's error; per site, position and head they are an attribution, not a
patching effect, but one that saturation no longer turns around.  Use either to find the few sites worth
patching for real, and check those with :func:`~interp.patching.patch_sites`;
``tests/interp/test_attribution_patching.py`` measures both regimes.

>>> from interp.tiny import tiny_vlm
>>> from PIL import Image
>>> from interp.patching import logit_diff
>>> model = tiny_vlm("llava", n_layers=2)
>>> clean = model.encode(images=[Image.new("RGB", (32, 32), "red")], prompts=["who is this"])
>>> corrupt = model.encode(images=[Image.new("RGB", (32, 32), "blue")], prompts=["who is this"])
>>> res = attribution_patch(model, clean, corrupt, ["ln_final.hook_normalized"], logit_diff(5, 6))
>>> round(res.effects["ln_final.hook_normalized"], 4)   # the logits are linear in it: exact
1.0
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .cache import ActivationCache
from .gradients import GradRun, run_with_grads
from .head_patching import HeadPatchResult, check_layers, component_heads, head_names
from .hooks import HookContext, HookFn, HookSpec, expand_hooks
from .inputs import VLMInputs
from .names import NameFilter, is_vision_side
from .patching import (Metric, PatchResult, PositionSpec, _mean, _patch_mask, _position_label, check_aligned,
                       check_source, patchable_names)

if TYPE_CHECKING:
    from .model import HookedVLM

METHOD = "attribution"


def reduce_terms(terms: Float[Tensor, "..."], mask: Optional[Bool[Tensor, "batch pos"]] = None, keep: int = 2
                 ) -> Float[Tensor, "..."]:
    """Per-entry attribution terms zeroed outside ``mask`` and summed over every dimension after the first
    ``keep``: ``keep=2`` gives one term per ``[batch, pos]`` (per image and patch on the vision side),
    ``keep=3`` one per ``[batch, pos, head]`` for ``attn.hook_z``."""
    if mask is not None:
        m = mask.to(terms.device).reshape(*mask.shape, *([1] * (terms.dim() - mask.dim())))
        terms = terms * m
    return terms.flatten(keep).sum(-1) if terms.dim() > keep else terms


def path_terms(acts: Sequence[Float[Tensor, "..."]], grads: Sequence[Float[Tensor, "..."]]) -> Float[Tensor, "..."]:
    """The path integral of ``grad . d(act)`` by the trapezoid rule, per entry: ``sum_j (g_j + g_{j+1}) / 2 *
    (a_{j+1} - a_j)`` over the activations ``a_j`` and gradients ``g_j`` at the path's points.

    Why: summed over a complete cut of the model (every position of one residual stream), these terms add up to
    the metric's change along the path, whatever the nonlinearities (the fundamental theorem of calculus), up
    to the trapezoid rule's error, which falls as the square of the step.
    """
    if len(acts) != len(grads) or len(acts) < 2:
        raise ValueError(f"need the same number (>= 2) of activations and gradients, got {len(acts)} and {len(grads)}")
    out = torch.zeros(acts[0].shape, dtype=torch.float32, device=acts[0].device)
    for j in range(len(acts) - 1):
        out += 0.5 * (grads[j].float() + grads[j + 1].float()) * (acts[j + 1].float() - acts[j].float())
    return out


@dataclass
class Terms:
    """What every estimate is made of: the corrupted run's metric per row, the end point's (the clean or hooked
    run's, None for a first-order estimate from a cache), and each site's per-entry terms."""

    base: list[float]
    end: Optional[list[float]]
    products: dict[str, Tensor]


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0 (0: the gradient at the corrupted run; K: integrated "
                         f"along the path in K segments), got {steps!r}")
    return steps


def _rows(values: Tensor) -> list[float]:
    return [float(v) for v in values.detach().float().cpu()]


def first_order_terms(model: "HookedVLM", target_inputs: VLMInputs, source_cache: ActivationCache,
                      names: Sequence[str], metric: Metric) -> Terms:
    """``(source - target) * grad`` per entry at each site (float32), the gradient taken once in the target run."""
    run = run_with_grads(model, target_inputs, names, metric)
    products = {}
    for n in names:
        delta = source_cache[n].to(run.acts[n].device).float() - run.acts[n].float()
        if delta.shape != run.grads[n].shape:
            raise ValueError(f"{n!r}: the source activation {tuple(delta.shape)} and the target's "
                             f"{tuple(run.grads[n].shape)} differ in shape")
        products[n] = delta * run.grads[n].float()
    return Terms(_rows(run.values), None, products)


def integrated_terms(names: Sequence[str], steps: int, run_at: Callable[[float], GradRun]) -> Terms:
    """:func:`path_terms` at each site along ``alpha = 0, 1/steps, ..., 1``; ``run_at(alpha)`` is the
    differentiated run at that point of the path (``run_at(0)`` the corrupted run, ``run_at(1)`` the clean one).
    Only two points are held at a time."""
    products: dict[str, Tensor] = {}
    prev: Optional[GradRun] = None
    base: list[float] = []
    for j in range(steps + 1):
        run = run_at(j / steps)
        if prev is None:
            base = _rows(run.values)
        else:
            for n in names:
                part = path_terms([prev.acts[n], run.acts[n]], [prev.grads[n], run.grads[n]])
                products[n] = part if n not in products else products[n] + part
        prev = run
    return Terms(base, _rows(prev.values), products)


def interpolated_inputs(clean: VLMInputs, corrupted: VLMInputs, alpha: float) -> VLMInputs:
    """``corrupted`` with every floating-point image input (pixel values) moved ``alpha`` of the way to
    ``clean``'s (the runs must line up: :func:`interp.patching.check_aligned`)."""
    kwargs = {}
    for k, v in corrupted.image_kwargs.items():
        c = clean.image_kwargs.get(k)
        if v.is_floating_point():
            if c is None or c.shape != v.shape:
                raise ValueError(f"clean and corrupted image input {k!r} differ in shape "
                                 f"({None if c is None else tuple(c.shape)} vs {tuple(v.shape)}); cannot interpolate")
            v = v + alpha * (c.to(v) - v)
        kwargs[k] = v
    return dataclasses.replace(corrupted, image_kwargs=kwargs)


def _text_path(clean_embed: Tensor, alpha: float) -> HookFn:
    """At ``hook_embed``: move the text positions' embeddings ``alpha`` of the way to the clean run's (image
    positions come from the interpolated pixels, so every path through the vision tower is kept)."""

    def hook(x: Tensor, ctx: HookContext) -> Tensor:
        m = ctx.text_mask.to(x.device).unsqueeze(-1)
        return torch.where(m, x + alpha * (clean_embed.to(x) - x), x)

    return hook


def _scaled(fn: HookFn, alpha: float) -> HookFn:
    """A hook moved ``alpha`` of the way from doing nothing to ``fn``: ``x + alpha * (fn(x) - x)``."""

    def hook(x: Tensor, ctx: HookContext) -> Tensor:
        new = fn(x, ctx)
        return x if new is None else x + alpha * (new - x)

    return hook


def check_path_end(terms: Terms, clean_rows: Optional[list[float]]) -> None:
    """Raise if an integrated path did not end at the clean (or hooked) run: its terms would then add up to the
    difference to some other run.  Only a bug, or an input the path does not move, can cause it."""
    if terms.end is None or clean_rows is None:
        return
    gap = max(abs(c - b) for c, b in zip(clean_rows, terms.base))
    off = max(abs(e - c) for e, c in zip(terms.end, clean_rows))
    if off > 1e-2 * (1.0 + gap):
        raise RuntimeError(f"the integrated path ended {off:.3g} away from the clean run's metric (clean - corrupted: "
                           f"{gap:.3g}): the two runs differ in an input the path does not interpolate")


def _result(names: Sequence[str], terms: Terms, masks: dict, positions: PositionSpec,
            clean_rows: Optional[list[float]], steps: int) -> PatchResult:
    check_path_end(terms, clean_rows)
    base = terms.base
    b = len(base)
    rows: dict[str, list[float]] = {"corrupted": base}
    if clean_rows is not None:
        rows["clean"] = clean_rows
    patched: dict[str, float] = {}
    for n in names:
        reduced = reduce_terms(terms.products[n], masks[n])
        if is_vision_side(n):  # leading dims are images or patches, not rows; the batch mean is still exact
            patched[n] = _mean(base) + float(reduced.sum()) / b
        else:
            rows[n] = [x + float(t) for x, t in zip(base, reduced.reshape(b, -1).sum(-1).cpu())]
            patched[n] = _mean(rows[n])
    return PatchResult(names=list(names), patched=patched,
                       clean=_mean(clean_rows) if clean_rows is not None else float("nan"),
                       corrupted=_mean(base), positions=_position_label(positions), rows=rows,
                       meta={"method": METHOD, "steps": steps})


def swap_path(model: "HookedVLM", clean: VLMInputs, corrupted: VLMInputs, names: Sequence[str], metric: Metric,
              steps: int, reads: Sequence[str] = ()) -> tuple[Callable[[float], GradRun], ActivationCache, list[float]]:
    """What every clean -> corrupted estimate starts from: ``run_at(alpha)``, the differentiated run ``alpha`` of
    the way along the straight path from the corrupted inputs (0) to the clean ones (1), pixels and, for
    ``steps > 0`` where the prompts differ, text embeddings, with gradients at ``names`` and activations at
    ``names`` and ``reads``; the clean run's cache of both; and the clean run's metric per row."""
    text_differs = steps > 0 and not torch.equal(clean.input_ids, corrupted.input_ids)
    wanted = list(dict.fromkeys(list(names) + list(reads)))
    wanted += ["hook_embed"] if text_differs and "hook_embed" not in wanted else []
    clean_logits, cache = model.run_with_cache(clean, names=wanted)
    clean_rows = _rows(torch.as_tensor(metric(clean_logits, corrupted)))
    del clean_logits

    def run_at(alpha: float) -> GradRun:
        hooks = [("hook_embed", _text_path(cache["hook_embed"], alpha))] if text_differs else []
        return run_with_grads(model, interpolated_inputs(clean, corrupted, alpha), names, metric, hooks=hooks,
                              reads=reads)

    return run_at, cache, clean_rows


def _swap_terms(model: "HookedVLM", clean: VLMInputs, corrupted: VLMInputs, names: Sequence[str], metric: Metric,
                steps: int) -> tuple[Terms, list[float]]:
    """The terms of a clean -> corrupted estimate, and the clean run's metric per row."""
    run_at, cache, clean_rows = swap_path(model, clean, corrupted, names, metric, steps)
    if steps == 0:
        return first_order_terms(model, corrupted, cache, names, metric), clean_rows
    return integrated_terms(names, steps, run_at), clean_rows


def attribution_from_run(
    model: "HookedVLM",
    target_inputs: VLMInputs,
    source_cache: ActivationCache,
    names: NameFilter,
    metric: Metric,
    positions: PositionSpec = "all",
    source_logits: Optional[Float[Tensor, "batch pos vocab"]] = None,
) -> PatchResult:
    """:func:`interp.patching.patch_from_run`, estimated to first order: the effect of patching each site of
    ``source_cache`` alone into a plain run of ``target_inputs``, from one differentiated run of the target.

    Arguments as in ``patch_from_run`` (``max_rows`` is not needed: there is one forward pass).  ``rows`` holds
    per-row estimates at language-model sites; at vision-side sites only the batch mean is estimated.  A cache
    gives no path between the runs, so there is no ``steps`` here (:func:`attribution_patch` and
    :func:`attribution_hooks` have one).
    """
    resolved = patchable_names(model, names)
    check_source(source_cache, target_inputs, resolved)
    masks = {n: _patch_mask(positions, n, target_inputs) for n in resolved}  # validate before any forward pass
    clean_rows = None
    if source_logits is not None:
        clean_rows = _rows(torch.as_tensor(metric(source_logits, target_inputs)))
    terms = first_order_terms(model, target_inputs, source_cache, resolved, metric)
    return _result(resolved, terms, masks, positions, clean_rows, 0)


def attribution_patch(
    model: "HookedVLM",
    clean_inputs: VLMInputs,
    corrupted_inputs: VLMInputs,
    names: NameFilter,
    metric: Metric,
    positions: PositionSpec = "all",
    steps: int = 0,
) -> PatchResult:
    """:func:`interp.patching.patch_sites`, estimated: clean -> corrupted at each site in ``names`` (list, glob
    or predicate), at ``positions``.

    ``steps=0``: attribution patching, the gradient taken once in the corrupted run (one clean forward pass,
    one differentiated corrupted pass).  ``steps=K``: integrated along the straight path in input space from
    the corrupted inputs to the clean ones (pixel values, and text embeddings where the prompts differ), in
    ``K`` trapezoid segments (``K + 1`` differentiated passes): exact, up to the trapezoid's error, for sites
    that form a complete cut (a residual stream at every position where the runs differ), and far closer than
    ``steps=0`` where the swap saturates the metric (module docstring).
    """
    check_steps(steps)
    check_aligned(clean_inputs, corrupted_inputs)
    resolved = patchable_names(model, names)
    masks = {n: _patch_mask(positions, n, corrupted_inputs) for n in resolved}
    terms, clean_rows = _swap_terms(model, clean_inputs, corrupted_inputs, resolved, metric, steps)
    return _result(resolved, terms, masks, positions, clean_rows, steps)


def attribution_hooks(
    model: "HookedVLM",
    inputs: VLMInputs,
    hooks: HookSpec,
    names: NameFilter,
    metric: Metric,
    positions: PositionSpec = "all",
    steps: int = 0,
) -> PatchResult:
    """:func:`interp.patching.patch_hooks`, estimated: which site's hooked (e.g. steered) activations, patched
    alone into the vanilla run, would reproduce the hooked behaviour.  ``steps=K`` integrates along the path
    that moves every hook from doing nothing to its full effect (``x + alpha * (fn(x) - x)``)."""
    check_steps(steps)
    resolved = patchable_names(model, names)
    masks = {n: _patch_mask(positions, n, inputs) for n in resolved}
    hook_list = [(n, fn) for n, fns in expand_hooks(hooks, model.hook_names()).items() for fn in fns]
    source_logits, cache = model.run_with_cache(inputs, names=resolved, hooks=hooks)
    clean_rows = _rows(torch.as_tensor(metric(source_logits, inputs)))
    del source_logits
    if steps == 0:
        terms = first_order_terms(model, inputs, cache, resolved, metric)
    else:
        terms = integrated_terms(resolved, steps, lambda alpha: run_with_grads(
            model, inputs, resolved, metric, hooks=[(n, _scaled(fn, alpha)) for n, fn in hook_list]))
    return _result(resolved, terms, masks, positions, clean_rows, steps)


def attribution_map(
    model: "HookedVLM",
    clean_inputs: VLMInputs,
    corrupted_inputs: VLMInputs,
    names: NameFilter,
    metric: Metric,
    steps: int = 0,
) -> dict[str, Float[Tensor, "batch pos"]]:
    """Per-position attribution at each language-model site: ``map[name][b, p]`` estimates how much patching
    position ``p`` of ``name`` alone (clean -> corrupted) changes row ``b``'s metric (unnormalised; summing a row
    over the positions gives the ``positions="all"`` estimate).  The layer x position picture of which image
    and text tokens carry the difference, for the cost of one backward pass (``steps`` as in
    :func:`attribution_patch`).  Vision-side sites are refused: they have no prompt positions (use
    :func:`attribution_patch` with ``positions="image"``)."""
    check_steps(steps)
    check_aligned(clean_inputs, corrupted_inputs)
    resolved = patchable_names(model, names)
    vision = [n for n in resolved if is_vision_side(n)]
    if vision:
        raise ValueError(f"{vision[:3]} are vision-side sites: they have no prompt positions to map; "
                         "use attribution_patch(..., positions='image') for their totals")
    terms, clean_rows = _swap_terms(model, clean_inputs, corrupted_inputs, resolved, metric, steps)
    check_path_end(terms, clean_rows)
    return {n: reduce_terms(terms.products[n]).cpu() for n in resolved}


def attribution_vision_maps(
    model: "HookedVLM",
    clean_inputs: VLMInputs,
    corrupted_inputs: VLMInputs,
    names: NameFilter,
    metric: Metric,
    steps: int = 0,
) -> dict[str, list[Float[Tensor, "h w"]]]:
    """Per-patch attribution at vision-side sites: ``maps[name][i]`` is image ``i``'s ``[h, w]`` patch grid in
    raster order (:func:`interp.vision.vision_maps`: CLIP's CLS row left out, Qwen2.5-VL's windows and merge
    blocks undone), each cell the estimated change of the metric from patching that patch alone (unnormalised;
    ``steps`` as in :func:`attribution_patch`).  Which parts of the picture carry the difference, inside the
    vision tower, for the cost of one backward pass.  Language-model sites are refused (use
    :func:`attribution_map`)."""
    from .vision import vision_maps

    check_steps(steps)
    check_aligned(clean_inputs, corrupted_inputs)
    resolved = patchable_names(model, names)
    lm = [n for n in resolved if not is_vision_side(n)]
    if lm:
        raise ValueError(f"{lm[:3]} are language-model sites: use attribution_map for their positions")
    if not corrupted_inputs.has_images:
        raise ValueError("the batch has no images")
    terms, clean_rows = _swap_terms(model, clean_inputs, corrupted_inputs, resolved, metric, steps)
    check_path_end(terms, clean_rows)
    return {n: [m[..., 0].cpu() for m in vision_maps(model, corrupted_inputs, n,
                                                      terms.products[n].sum(-1, keepdim=True))]
            for n in resolved}


def attribution_heads(
    model: "HookedVLM",
    clean_inputs: VLMInputs,
    corrupted_inputs: VLMInputs,
    metric: Metric,
    layers: Optional[Sequence[int]] = None,
    positions: PositionSpec = "all",
    steps: int = 0,
    component: str = "z",
    tower: str = "lm",
) -> HeadPatchResult:
    """:func:`interp.head_patching.patch_heads`, estimated: every (layer, head) at once from the gradient at
    ``blocks.{l}.attn.hook_z`` (or the ``component``'s site: query, key, value; or the vision tower's heads,
    ``tower``), instead of ``n_layers x n_heads`` patched runs (``steps`` as in :func:`attribution_patch`).  On
    the vision tower only the batch mean is estimated (its positions are images and patches, not prompt rows), so
    ``rows`` holds just ``"clean"`` and ``"corrupted"`` there."""
    check_steps(steps)
    check_aligned(clean_inputs, corrupted_inputs)
    if tower == "vision" and not corrupted_inputs.has_images:
        raise ValueError("the batch has no images: there are no vision-tower heads to estimate")
    by_layer = head_names(model, check_layers(model, layers, tower), component, tower)
    layers, names = list(by_layer), list(by_layer.values())
    mask = _patch_mask(positions, names[0], corrupted_inputs)  # validate before any forward pass
    terms, clean_rows = _swap_terms(model, clean_inputs, corrupted_inputs, names, metric, steps)
    check_path_end(terms, clean_rows)
    base = terms.base
    rows: dict[str, list[float]] = {"clean": clean_rows, "corrupted": base}
    n_heads = component_heads(model, component, tower)
    patched = np.full((len(layers), n_heads), np.nan)
    for i, (l, n) in enumerate(zip(layers, names)):
        if tower == "vision":  # [..., head, d_head] in the tower's layout: one total per head, over the batch
            per_head = terms.products[n].float().movedim(-2, 0).flatten(1).sum(1).cpu()
            patched[i] = _mean(base) + per_head.numpy() / len(base)
            continue
        per_head = reduce_terms(terms.products[n], mask, keep=3).sum(1).cpu()  # [batch, head]
        for h in range(n_heads):
            rows[f"L{l}H{h}"] = [x + float(t) for x, t in zip(base, per_head[:, h])]
            patched[i, h] = _mean(rows[f"L{l}H{h}"])
    meta = {"method": METHOD, "steps": steps, "component": component} | ({"tower": tower} if tower != "lm" else {})
    return HeadPatchResult(layers=layers, patched=patched, clean=_mean(clean_rows), corrupted=_mean(base),
                           positions=_position_label(positions), rows=rows, meta=meta)
