"""The residual stream read through the unembedding: accumulated and decomposed residuals, the final norm, the
logit lens (TransformerLens's ``accumulated_resid``, ``decompose_resid``, ``apply_ln_to_stack``, ``unembed``).

Why a module of its own: these are the first tools of a residual-stream analysis ("at which layer does the
model know the name?", "which block wrote it?"), and they need three things the cache alone does not have:
the depth, the final norm and the unembedding.  So every function takes the model and a cache, like
:func:`interp.attribution.logit_attribution`, and the cache only has to hold the names
:func:`lens_names` / :func:`decompose_names` list.

Two ways to put a residual through the final RMSNorm, as in TransformerLens:

- :func:`logit_lens` normalises every layer's residual by its *own* scale (the logit lens: what the model
  would say if it stopped there); its last entry is exactly the model's logits.
- :func:`apply_ln_to_stack` multiplies every component by the *final* residual's scale, frozen, so the
  norm is linear and the components' normalised values add up to the normalised final residual
  (direct attribution).

>>> from interp.tiny import tiny_vlm
>>> model = tiny_vlm("llava", n_layers=2)
>>> inputs = model.encode(images=[None], prompts=["who is this person"])
>>> logits, cache = model.run_with_cache(inputs, names=lens_names(model) + decompose_names(model))
>>> lens, labels = logit_lens(model, cache, return_labels=True)
>>> labels, tuple(lens.shape[:2])                    # [layer, batch, vocab] at the last prompt token
(['0_pre', '1_pre', 'final_post'], (3, 1))
>>> bool(torch.allclose(lens[-1], logits[:, -1], atol=1e-5))
True
>>> parts, labels = decompose_resid(model, cache, return_labels=True)
>>> labels
['embed', '0_attn_out', '0_mlp_out', '1_attn_out', '1_mlp_out']
>>> bool(torch.allclose(parts.sum(0), cache.last("blocks.1.hook_resid_post"), atol=1e-5))
True
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from .adapters import get_module
from .cache import ActivationCache

if TYPE_CHECKING:
    from .model import HookedVLM

#: Where a residual is read: the last prompt token (``[batch, d]``) or every position (``[batch, pos, d]``);
#: a ``[batch]`` tensor of positions (one per row, e.g. ``inputs.last_index + 1``: the first answer token of a
#: teacher-forced run) reads ``[batch, d]`` there.
POSITIONS = ("last", "all")
Pos = Union[str, Tensor]


def lens_names(model: "HookedVLM", incl_mid: bool = False) -> list[str]:
    """The hook names :func:`accumulated_resid` and :func:`logit_lens` need in the cache."""
    n = model.n_layers
    names = []
    for l in range(n):
        names.append(f"blocks.{l}.hook_resid_pre")
        if incl_mid:
            names.append(f"blocks.{l}.hook_resid_mid")
    return names + [f"blocks.{n - 1}.hook_resid_post"]


def decompose_names(model: "HookedVLM") -> list[str]:
    """The hook names :func:`decompose_resid` (and :func:`apply_ln_to_stack`'s frozen scale) need in the cache."""
    n = model.n_layers
    return (["hook_embed"] + [f"blocks.{l}.hook_{k}_out" for l in range(n) for k in ("attn", "mlp")]
            + [f"blocks.{n - 1}.hook_resid_post"])


def _read(cache: ActivationCache, name: str, pos: Pos) -> Tensor:
    if name not in cache:
        hint = ("interp.lens.lens_names(model, incl_mid=True)" if name.endswith("hook_resid_mid")
                else "interp.lens.decompose_names(model)" if name.endswith(("_out", "hook_embed"))
                else "interp.lens.lens_names(model)")
        raise ValueError(f"the cache lacks {name!r}: run it with names={hint} (or add it to the names)")
    if isinstance(pos, Tensor):
        t = cache[name]
        idx = pos.to(device=t.device, dtype=torch.long).reshape(-1)
        if idx.shape[0] != t.shape[0] or bool(((idx < 0) | (idx >= t.shape[1])).any()):
            raise ValueError(f"pos must hold one position in [0, {t.shape[1]}) per row ({t.shape[0]} rows), "
                             f"got {pos.tolist()}")
        return t[torch.arange(t.shape[0], device=t.device), idx]
    if pos not in POSITIONS:
        raise ValueError(f"pos must be one of {POSITIONS} or a [batch] tensor of positions, got {pos!r}")
    return cache.last(name) if pos == "last" else cache[name]


def _depth(model: "HookedVLM", layer: Optional[int]) -> int:
    n = model.n_layers
    if layer is None:
        return n
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
        raise ValueError(f"layer must be an int in [0, {n}] (or None: every layer), got {layer!r}")
    return layer


def accumulated_resid(model: "HookedVLM", cache: ActivationCache, layer: Optional[int] = None,
                      incl_mid: bool = False, pos: Pos = "last", return_labels: bool = False):
    """The residual stream as it accumulates, as TransformerLens reads ``layer``: ``blocks.{l}.hook_resid_pre``
    for ``l <= layer`` (with ``resid_mid`` of each ``l < layer`` if ``incl_mid``), and every layer plus the final
    residual when ``layer`` is None or ``n_layers``.  ``[component, batch, d]`` at the last prompt token (``pos="last"``) or
    ``[component, batch, pos, d]`` (``"all"``); labels ``"0_pre"``, ``"0_mid"``, ..., ``"final_post"``.
    """
    n, stop = model.n_layers, _depth(model, layer)
    labels, parts = [], []
    for l in range(min(stop + 1, n)):  # ``layer`` k includes k's resid_pre
        labels.append(f"{l}_pre")
        parts.append(_read(cache, f"blocks.{l}.hook_resid_pre", pos))
        if incl_mid and l < stop:
            labels.append(f"{l}_mid")
            parts.append(_read(cache, f"blocks.{l}.hook_resid_mid", pos))
    if stop == n:
        labels.append("final_post")
        parts.append(_read(cache, f"blocks.{n - 1}.hook_resid_post", pos))
    out = torch.stack(parts)
    return (out, labels) if return_labels else out


def decompose_resid(model: "HookedVLM", cache: ActivationCache, layer: Optional[int] = None, pos: Pos = "last",
                    return_labels: bool = False, incl_other: bool = False):
    """The residual stream at ``blocks.{layer}.hook_resid_pre`` (the final residual if None) as the sum of what
    wrote it: ``"embed"`` (token embeddings with the image features in place), then each earlier block's
    ``"{l}_attn_out"`` and ``"{l}_mlp_out"``.  ``[component, batch, d]`` (``pos="last"``) or
    ``[component, batch, pos, d]``; the components add up to that residual (to float rounding), unless a hook
    wrote into the residual stream itself: ``incl_other=True`` appends ``"other"``, that residual minus the
    components (what hooks wrote, e.g. a steering vector's own share; ~1e-6 in an unhooked run), so the
    parts always add up.
    """
    stop = _depth(model, layer)
    labels, parts = ["embed"], [_read(cache, "hook_embed", pos)]
    for l in range(stop):
        for k in ("attn", "mlp"):
            labels.append(f"{l}_{k}_out")
            parts.append(_read(cache, f"blocks.{l}.hook_{k}_out", pos))
    if incl_other:
        n = model.n_layers
        target = (_read(cache, f"blocks.{stop}.hook_resid_pre", pos) if stop < n
                  else _read(cache, f"blocks.{n - 1}.hook_resid_post", pos))
        labels.append("other")
        parts.append(target - torch.stack(parts).sum(0))
    out = torch.stack(parts)
    return (out, labels) if return_labels else out


def final_norm_scale(model: "HookedVLM", resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
    """The final RMSNorm's scale of each residual vector: ``norm(x) == scale * weight * x``, read off the
    norm module itself (so its own epsilon and dtype count).  Raises if the final norm is not an RMSNorm."""
    norm = get_module(model.hf_model, model.adapter.final_norm)
    w = norm.weight.detach().float()
    x = resid.detach().float()
    rtol = 1e-4
    with torch.no_grad():
        try:  # an RMSNorm computes in float32 anyway: a float32 input keeps bf16/fp16 rounding out of the check
            y = norm(x).float()
        except RuntimeError:  # a module that insists on its own dtype: check to that dtype's precision
            y = norm(resid.to(norm.weight.dtype)).float()
            rtol = max(rtol, 8 * torch.finfo(norm.weight.dtype).eps)
    wx = w * x
    scale = (y * wx).sum(-1) / (wx * wx).sum(-1).clamp_min(1e-30)
    if not torch.allclose(y, scale[..., None] * wx, atol=rtol * float(y.abs().max()) + 1e-6):
        raise NotImplementedError("the final norm is not an RMSNorm (y != scale * w * x): it is not linear per vector")
    return scale


def apply_ln_to_stack(model: "HookedVLM", cache: ActivationCache, stack: Float[Tensor, "component batch ..."],
                      pos: Pos = "last") -> Float[Tensor, "component batch ..."]:
    """Put every component of ``stack`` (from :func:`decompose_resid` or :func:`accumulated_resid`, same
    ``pos``) through the final norm with the *final* residual's scale, frozen: the norm is then linear, so
    normalised components add up to the normalised final residual (direct attribution, not the logit lens)."""
    final = _read(cache, f"blocks.{model.n_layers - 1}.hook_resid_post", pos)
    if tuple(stack.shape[1:]) != tuple(final.shape):
        raise ValueError(f"stack has per-component shape {tuple(stack.shape[1:])}, the final residual at pos={pos!r} "
                         f"{tuple(final.shape)}: build the stack with the same pos")
    w = get_module(model.hf_model, model.adapter.final_norm).weight.detach().float()
    return stack.detach().float() * w * final_norm_scale(model, final)[None, ..., None]


def unembed(model: "HookedVLM", x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """Logits of already-normalised residual vectors (the model's ``lm_head``, in float32)."""
    head = get_module(model.hf_model, model.adapter.lm_head)
    with torch.no_grad():
        return head(x.to(head.weight.dtype)).float()


def logit_lens(model: "HookedVLM", cache: ActivationCache, incl_mid: bool = False, pos: Pos = "last",
               return_labels: bool = False):
    """The logit lens: each accumulated residual (:func:`accumulated_resid`) through the final norm, with its
    own scale, and the unembedding: ``[component, batch, vocab]`` at the last prompt token (``pos="all"``:
    ``[component, batch, pos, vocab]``).  The last component is the model's own logits there.
    """
    stack, labels = accumulated_resid(model, cache, incl_mid=incl_mid, pos=pos, return_labels=True)
    norm = get_module(model.hf_model, model.adapter.final_norm)
    with torch.no_grad():
        out = unembed(model, norm(stack.to(norm.weight.dtype)))
    return (out, labels) if return_labels else out
