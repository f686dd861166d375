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
with :func:`~interp.patching.logit_diff`), close for small clean - corrupted differences, and can be far off
where a nonlinearity saturates (a softmax that flips, a LayerNorm after a large change).  Use it to find the
few sites worth patching for real, and check those with :func:`~interp.patching.patch_sites`;
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

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .cache import ActivationCache
from .gradients import GradRun, run_with_grads
from .head_patching import HeadPatchResult
from .hooks import HookSpec
from .inputs import VLMInputs
from .names import NameFilter, is_vision_side
from .patching import (Metric, PatchResult, PositionSpec, _mean, _patch_mask, _position_label, check_aligned,
                       check_source, patchable_names)

if TYPE_CHECKING:
    from .model import HookedVLM

METHOD = "attribution"


def linear_terms(delta: Float[Tensor, "..."], grad: Float[Tensor, "..."],
                 mask: Optional[Bool[Tensor, "batch pos"]] = None, keep: int = 2) -> Float[Tensor, "..."]:
    """The first-order terms ``delta * grad`` (in float32), zeroed outside ``mask`` and summed over every
    dimension after the first ``keep`` ones: ``keep=2`` gives one term per ``[batch, pos]`` (per image and patch
    on the vision side), ``keep=3`` one per ``[batch, pos, head]`` for ``attn.hook_z``."""
    if delta.shape != grad.shape:
        raise ValueError(f"delta {tuple(delta.shape)} and gradient {tuple(grad.shape)} differ in shape")
    terms = delta.float() * grad.float()
    if mask is not None:
        m = mask.to(terms.device).reshape(*mask.shape, *([1] * (terms.dim() - mask.dim())))
        terms = terms * m
    return terms.flatten(keep).sum(-1) if terms.dim() > keep else terms


def _row_totals(name: str, terms: Tensor, batch: int) -> Optional[Tensor]:
    """One estimate per batch row, or None at vision-side sites, whose leading dimension is images or patches
    rather than rows (their batch mean is still exact: rows do not interact)."""
    if is_vision_side(name):
        return None
    return terms.reshape(batch, -1).sum(-1)


def _result(names: Sequence[str], run: GradRun, source: ActivationCache, masks: dict, positions: PositionSpec,
            clean_rows: Optional[list[float]]) -> PatchResult:
    base = [float(v) for v in run.values.float().cpu()]
    b = len(base)
    rows: dict[str, list[float]] = {"corrupted": base}
    if clean_rows is not None:
        rows["clean"] = clean_rows
    patched: dict[str, float] = {}
    for n in names:
        terms = linear_terms(source[n].to(run.acts[n].device) - run.acts[n], run.grads[n], masks[n])
        per_row = _row_totals(n, terms, b)
        if per_row is None:
            patched[n] = _mean(base) + float(terms.sum()) / b
        else:
            rows[n] = [x + float(t) for x, t in zip(base, per_row.cpu())]
            patched[n] = _mean(rows[n])
    return PatchResult(names=list(names), patched=patched,
                       clean=_mean(clean_rows) if clean_rows is not None else float("nan"),
                       corrupted=_mean(base), positions=_position_label(positions), rows=rows,
                       meta={"method": METHOD})


def attribution_from_run(
    model: "HookedVLM",
    target_inputs: VLMInputs,
    source_cache: ActivationCache,
    names: NameFilter,
    metric: Metric,
    positions: PositionSpec = "all",
    source_logits: Optional[Float[Tensor, "batch pos vocab"]] = None,
) -> PatchResult:
    """:func:`interp.patching.patch_from_run`, estimated: the effect of patching each site of ``source_cache``
    alone into a plain run of ``target_inputs``, from one differentiated run of the target.

    Arguments as in ``patch_from_run`` (``max_rows`` is not needed: there is one forward pass).  ``rows`` holds
    per-row estimates at language-model sites; at vision-side sites only the batch mean is estimated.
    """
    resolved = patchable_names(model, names)
    check_source(source_cache, target_inputs, resolved)
    masks = {n: _patch_mask(positions, n, target_inputs) for n in resolved}  # validate before any forward pass
    clean_rows = None
    if source_logits is not None:
        clean_rows = [float(v) for v in torch.as_tensor(metric(source_logits, target_inputs)).detach().float().cpu()]
    run = run_with_grads(model, target_inputs, resolved, metric)
    return _result(resolved, run, source_cache, masks, positions, clean_rows)


def attribution_patch(
    model: "HookedVLM",
    clean_inputs: VLMInputs,
    corrupted_inputs: VLMInputs,
    names: NameFilter,
    metric: Metric,
    positions: PositionSpec = "all",
) -> PatchResult:
    """:func:`interp.patching.patch_sites`, estimated by attribution patching: clean -> corrupted at each site
    in ``names`` (list, glob or predicate), at ``positions``, from one clean forward pass and one differentiated
    corrupted pass.  See the module docstring for when the estimate holds."""
    check_aligned(clean_inputs, corrupted_inputs)
    resolved = patchable_names(model, names)
    clean_logits, cache = model.run_with_cache(clean_inputs, names=resolved)
    return attribution_from_run(model, corrupted_inputs, cache, resolved, metric, positions, clean_logits)


def attribution_hooks(
    model: "HookedVLM",
    inputs: VLMInputs,
    hooks: HookSpec,
    names: NameFilter,
    metric: Metric,
    positions: PositionSpec = "all",
) -> PatchResult:
    """:func:`interp.patching.patch_hooks`, estimated: which site's hooked (e.g. steered) activations, patched
    alone into the vanilla run, would reproduce the hooked behaviour, to first order."""
    resolved = patchable_names(model, names)
    source_logits, cache = model.run_with_cache(inputs, names=resolved, hooks=hooks)
    return attribution_from_run(model, inputs, cache, resolved, metric, positions, source_logits)


def attribution_map(
    model: "HookedVLM",
    clean_inputs: VLMInputs,
    corrupted_inputs: VLMInputs,
    names: NameFilter,
    metric: Metric,
) -> dict[str, Float[Tensor, "batch pos"]]:
    """Per-position attribution at each language-model site: ``map[name][b, p]`` estimates how much patching
    position ``p`` of ``name`` alone (clean -> corrupted) changes row ``b``'s metric (unnormalised; summing a row
    over the positions gives the ``positions="all"`` estimate).  The layer x position picture of which image
    and text tokens carry the difference, for the cost of one backward pass.  Vision-side sites are refused:
    they have no prompt positions (use :func:`attribution_patch` with ``positions="image"``)."""
    check_aligned(clean_inputs, corrupted_inputs)
    resolved = patchable_names(model, names)
    vision = [n for n in resolved if is_vision_side(n)]
    if vision:
        raise ValueError(f"{vision[:3]} are vision-side sites: they have no prompt positions to map; "
                         "use attribution_patch(..., positions='image') for their totals")
    _, cache = model.run_with_cache(clean_inputs, names=resolved)
    run = run_with_grads(model, corrupted_inputs, resolved, metric)
    return {n: linear_terms(cache[n].to(run.acts[n].device) - run.acts[n], run.grads[n]).cpu() for n in resolved}


def attribution_heads(
    model: "HookedVLM",
    clean_inputs: VLMInputs,
    corrupted_inputs: VLMInputs,
    metric: Metric,
    layers: Optional[Sequence[int]] = None,
    positions: PositionSpec = "all",
) -> HeadPatchResult:
    """:func:`interp.head_patching.patch_heads`, estimated: every (layer, head) at once from the gradient at
    ``blocks.{l}.attn.hook_z``, one backward pass instead of ``n_layers x n_heads`` patched runs."""
    check_aligned(clean_inputs, corrupted_inputs)
    layers = list(range(model.n_layers)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < model.n_layers]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct LM layers in 0..{model.n_layers - 1}, got {layers}")
    names = [f"blocks.{l}.attn.hook_z" for l in layers]
    mask = _patch_mask(positions, names[0], corrupted_inputs)  # validate before any forward pass
    clean_logits, cache = model.run_with_cache(clean_inputs, names=names)
    clean_rows = [float(v) for v in torch.as_tensor(metric(clean_logits, corrupted_inputs)).detach().float().cpu()]
    del clean_logits
    run = run_with_grads(model, corrupted_inputs, names, metric)
    base = [float(v) for v in run.values.float().cpu()]
    rows: dict[str, list[float]] = {"clean": clean_rows, "corrupted": base}
    n_heads = model.head_counts["lm"][0]
    patched = np.full((len(layers), n_heads), np.nan)
    for i, (l, n) in enumerate(zip(layers, names)):
        terms = linear_terms(cache[n].to(run.acts[n].device) - run.acts[n], run.grads[n], mask, keep=3)
        per_head = terms.sum(1).cpu()  # [batch, head]
        for h in range(n_heads):
            rows[f"L{l}H{h}"] = [x + float(t) for x, t in zip(base, per_head[:, h])]
            patched[i, h] = _mean(rows[f"L{l}H{h}"])
    return HeadPatchResult(layers=layers, patched=patched, clean=_mean(clean_rows), corrupted=_mean(base),
                           positions=_position_label(positions), rows=rows, meta={"method": METHOD})
