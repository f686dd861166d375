"""Steering hooks, and running one steering at many strengths in a single batched pass.

Why batch strengths: choosing a steering coefficient means evaluating the
same prompts at, say, 8 strengths.  One trace per strength pays the tracing
and launch overhead 8 times and runs 8 small batches; replicating the batch
once per strength and giving every row its own scale runs one large batch
with identical numbers (each row only ever sees its own scale).

>>> import torch
>>> from interp.tiny import tiny_vlm
>>> model = tiny_vlm("llava", n_layers=2)
>>> inputs = model.encode(images=[None, None], prompts=["who is this", "who is she"])
>>> v = torch.ones(model.d_model)
>>> hooks_for = lambda s: [("blocks.1.hook_resid_pre", add_vector(v, scale=s, positions="last"))]
>>> run_coefficients(model, inputs, hooks_for, [-1.0, 0.0, 1.0]).shape[:2]
torch.Size([3, 2])
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Literal, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .hooks import HookContext, HookFn, HookSpec
from .inputs import VLMInputs

if TYPE_CHECKING:
    from .model import HookedVLM

Positions = Literal["all", "last", "image", "text"]
Scale = Union[float, Float[Tensor, " batch"]]
POSITIONS = ("all", "last", "image", "text")


# -- hooks -------------------------------------------------------------------
def position_mask(x: Float[Tensor, "batch pos d"], ctx: HookContext, positions: Positions) -> Optional[Bool[Tensor, "batch pos"]]:
    """Which positions of ``x`` a hook at ``ctx`` should touch; None means all of them.

    At generation steps after the prefill ``x`` holds only the new position(s),
    which are text: "last" is the newest position, "text" and "all" are
    everything, and "image" is nothing.
    """
    if positions == "all":
        return None
    if x.dim() not in (3, 4):
        raise ValueError(f"positions={positions!r} needs a [batch, pos, d] (or per-head [batch, pos, head, d_head]) "
                         f"activation at {ctx.name!r}, got shape {tuple(x.shape)}")
    if positions == "last":
        return ctx.last_token_mask(x)
    if not ctx.is_prefill:
        fill = positions == "text"
        return torch.full(x.shape[:2], fill, dtype=torch.bool, device=x.device)
    mask = ctx.image_mask if positions == "image" else ctx.text_mask
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"positions={positions!r}: mask shape {tuple(mask.shape)} does not match the activation "
                         f"{tuple(x.shape[:2])} at {ctx.name!r}; use positions='all' on sites without prompt positions")
    return mask.to(x.device)


def _row_scale(scale: Scale, x: Tensor) -> Tensor | float:
    if not isinstance(scale, Tensor):
        return float(scale)
    if scale.dim() == 0:
        return scale.to(device=x.device, dtype=x.dtype)
    if scale.dim() != 1 or scale.shape[0] != x.shape[0]:
        raise ValueError(f"per-row scale has shape {tuple(scale.shape)}, but the activation has batch {x.shape[0]}")
    return scale.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def add_vector(v: Float[Tensor, " d_model"] | Float[Tensor, "head d_head"], scale: Scale = 1.0,
               positions: Positions = "all") -> HookFn:
    """A hook ``fn(x, ctx)`` that adds ``scale * v`` at the chosen positions.

    ``v`` is one vector as wide as the site, or, at a per-head site (``attn.hook_z``, ...), a
    ``[head, d_head]`` matrix: one vector per head (zero rows leave those heads alone).

    ``scale`` is a float, or a 1-D tensor with one scale per batch row, so
    rows of one batch can be steered at different strengths (see
    :func:`run_coefficients`).  ``positions``: "all", "last" (the last prompt
    token; the new token at later generation steps), "image" or "text"
    (non-pad, non-image prompt tokens).
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if v.dim() not in (1, 2):
        raise ValueError(f"add_vector expects a 1-D vector (or [head, d_head] at a per-head site), got shape "
                         f"{tuple(v.shape)}")

    def hook(x: Tensor, ctx: HookContext) -> Tensor:
        if tuple(x.shape[x.dim() - v.dim():]) != tuple(v.shape):
            raise ValueError(f"vector has shape {tuple(v.shape)}, but {ctx.name!r} has shape {tuple(x.shape)} "
                             f"(its last {v.dim()} dim(s) must match)")
        delta = _row_scale(scale, x) * v.to(device=x.device, dtype=x.dtype)
        mask = position_mask(x, ctx, positions)
        if mask is None:
            return x + delta
        return x + delta * mask.reshape(*mask.shape, *([1] * (x.dim() - 2))).to(x.dtype)

    return hook


# -- batched coefficients ------------------------------------------------------
def repeat_inputs(inputs: VLMInputs, k: int) -> VLMInputs:
    """The batch stacked ``k`` times along the batch dim: rows ``[c*B, (c+1)*B)`` are copy ``c``.

    Image tensors repeat the same way because every image kwarg is laid out in
    row order along dim 0: LLaVA's ``pixel_values`` ``[n_images, 3, H, W]``;
    Qwen2.5-VL's ``pixel_values`` ``[total_patches, D]`` with
    ``image_grid_thw`` ``[n_images, 3]``.  Repeating all of them whole keeps
    image ``i`` of copy ``c`` paired with its patches and its rows.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k == 1:
        return inputs

    def rep(t: Tensor) -> Tensor:
        return t.repeat(k, *([1] * (t.dim() - 1)))

    return inputs.map_tensors(rep, prompts=list(inputs.prompts) * k, n_images=list(inputs.n_images) * k)


def row_scales(coeffs: Sequence[float], batch: int, device: torch.device | str | None = None) -> Float[Tensor, " rows"]:
    """``[c0]*batch + [c1]*batch + ...``: the per-row scale matching :func:`repeat_inputs`."""
    return torch.tensor([float(c) for c in coeffs], dtype=torch.float32, device=device).repeat_interleave(batch)


def _checked_coeffs(coeffs: Sequence[float], caller: str) -> list[float]:
    """The coefficients as floats: at least one, all finite (a NaN coefficient silently turns its rows' logits
    into NaN)."""
    coeffs = [float(c) for c in coeffs]
    if not coeffs:
        raise ValueError(f"{caller} needs at least one coefficient")
    bad = [c for c in coeffs if not math.isfinite(c)]
    if bad:
        raise ValueError(f"{caller} needs finite coefficients, got {bad}")
    return coeffs


def _chunks(n_coeffs: int, batch: int, max_rows: int | None) -> list[range]:
    per = n_coeffs if max_rows is None else max(1, max_rows // batch)
    return [range(i, min(i + per, n_coeffs)) for i in range(0, n_coeffs, per)]


def run_coefficients(model: "HookedVLM", inputs: VLMInputs, hooks_for: Callable[[Tensor], HookSpec],
                     coeffs: Sequence[float], max_rows: int | None = None, shared_prefix: bool = False
                     ) -> Float[Tensor, "n_coeffs batch pos vocab"]:
    """Logits at every coefficient, in one forward pass (or one per ``max_rows`` rows).

    ``hooks_for(scales)`` gets a 1-D tensor of per-row scales and returns a
    hook spec, typically ``[(name, add_vector(v, scale=scales))]``.  The
    result equals calling ``model.run_with_hooks(inputs, hooks_for(full(c)))``
    for each ``c`` in turn.  ``max_rows`` caps the rows of one pass to bound
    memory on large models.

    ``shared_prefix=True`` is for hooks that change the last prompt position
    only (``add_vector(..., positions="last")``, the usual activation-addition
    sweep).  Every earlier position is then the same at every coefficient, so
    it is computed once: one unhooked pass of the batch over positions
    ``[0, T-1)`` keeps its KV cache, and the last position runs for all
    coefficients as one batched step over that cache (the hooks see it as a
    decode step, ``ctx.step == 1``, one position wide).  Same logits up to
    float rounding; the arithmetic shrinks from ``n_coeffs`` whole passes to
    about one.  Hooks that touch other positions would be applied to the last
    one only: do not use it for them.
    """
    coeffs = _checked_coeffs(coeffs, "run_coefficients")
    if shared_prefix:
        return _run_shared_prefix(model, inputs, hooks_for, coeffs, max_rows)
    b = inputs.batch_size
    outs = []
    for chunk in _chunks(len(coeffs), b, max_rows):
        cs = [coeffs[i] for i in chunk]
        logits = model.run_with_hooks(repeat_inputs(inputs, len(cs)), hooks_for(row_scales(cs, b, model.device)))
        outs.append(logits.reshape(len(cs), b, *logits.shape[1:]))
    return torch.cat(outs)


def _run_shared_prefix(model: "HookedVLM", inputs: VLMInputs, hooks_for: Callable[[Tensor], HookSpec],
                       coeffs: list[float], max_rows: int | None) -> Float[Tensor, "n_coeffs batch pos vocab"]:
    """:func:`run_coefficients` with ``shared_prefix``: the prefix once, the last position per coefficient.

    Rows follow :func:`repeat_inputs`'s layout (copy ``c`` of the batch at rows ``[c*B, (c+1)*B)``), so the
    cache is tiled the same way and :func:`row_scales` gives the per-row scales.
    """
    from . import torch_hooks, tracing

    adapter = model.adapter
    if not adapter.continues_from_cache:
        raise ValueError(f"shared_prefix is not supported for {adapter.name}: its positions cannot be continued "
                         f"from a cached prefix (run_coefficients without shared_prefix gives the same logits)")
    if model._persistent or torch_hooks.has_hooks(model):
        raise ValueError("shared_prefix runs the prefix unhooked, so it cannot honour hooks attached with "
                         "model.hooks(...) (e.g. an attached eraser); pass them through hooks_for instead")
    b, t = inputs.input_ids.shape
    if t < 2:
        raise ValueError("shared_prefix needs prompts of at least 2 positions")
    if bool(inputs.image_mask[:, -1].any()):
        raise ValueError("shared_prefix: the last prompt position is an image token; end the prompt with text")
    ids, mask = inputs.input_ids, inputs.attention_mask
    with torch.no_grad():
        prefix = model.hf_model(**{**inputs.model_kwargs(), "input_ids": ids[:, :-1], "attention_mask": mask[:, :-1]},
                                use_cache=True)
    text_only = replace(inputs, image_kwargs={})  # the images are in the cache already
    lasts = []
    for chunk in _chunks(len(coeffs), b, max_rows):
        cs = [coeffs[i] for i in chunk]
        cache = copy.deepcopy(prefix.cache) if len(cs) < len(coeffs) else prefix.cache
        cache.reorder_cache(torch.arange(b, device=ids.device).repeat(len(cs)))
        rows = repeat_inputs(text_only, len(cs))
        step = {"input_ids": rows.input_ids[:, -1:], "attention_mask": rows.attention_mask, "cache": cache}
        plan = model._plan(None, hooks_for(row_scales(cs, b, model.device)), rows)
        logits, _ = tracing.run(model, rows, plan, kwargs=step, step=1)
        lasts.append(logits.reshape(len(cs), b, 1, -1))
    head = prefix.logits[None].expand(len(coeffs), -1, -1, -1)
    return torch.cat([head, torch.cat(lasts).to(head.dtype)], dim=2)


def generate_coefficients(model: "HookedVLM", inputs: VLMInputs, hooks_for: Callable[[Tensor], HookSpec],
                          coeffs: Sequence[float], max_new_tokens: int = 32, every_step: bool = False,
                          max_rows: int | None = None, **generate_kwargs) -> list[list[str]]:
    """Greedy answers at every coefficient from one batched generation: ``texts[coeff][row]``.

    Hooks run on the prefill pass only unless ``every_step``; same contract
    for ``hooks_for`` as :func:`run_coefficients`.
    """
    coeffs = _checked_coeffs(coeffs, "generate_coefficients")
    b = inputs.batch_size
    texts: list[list[str]] = []
    for chunk in _chunks(len(coeffs), b, max_rows):
        cs = [coeffs[i] for i in chunk]
        out = model.generate(repeat_inputs(inputs, len(cs)), max_new_tokens=max_new_tokens,
                             hooks=hooks_for(row_scales(cs, b, model.device)), every_step=every_step, **generate_kwargs)
        texts.extend(out.texts[i * b:(i + 1) * b] for i in range(len(cs)))
    return texts
