"""Resolve a hook name to a concrete :class:`~interp.adapters.base.Site` on a model.

Why a separate step: names are architecture-free, sites are not.  The same
site ``attn.hook_z`` is the input of ``self_attn.o_proj`` in a Llama-style
decoder block, of ``self_attn.out_proj`` in a CLIP block and of ``attn.proj``
in a Qwen2.5-VL vision block; and a per-head site needs the model's head
count to be shown as ``[..., head, d_head]``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch

from .adapters.base import ArchAdapter, Site
from .names import parse_block_name

#: ``{"lm": (query heads, key/value heads), "vision": (...)}``, from :func:`head_counts`.
HeadCounts = Mapping[str, tuple[int, int]]


def head_counts(adapter: ArchAdapter, config: Any) -> dict[str, tuple[int, int]]:
    """The attention head counts of each tower of a model with this ``config`` (towers the adapter declares)."""
    out: dict[str, tuple[int, int]] = {}
    if adapter.lm_heads is not None:
        out["lm"] = adapter.lm_heads(config)
    if adapter.vision_heads is not None:
        out["vision"] = adapter.vision_heads(config)
    return out


def _split_heads(site: Site, n_heads: int) -> Site:
    """Show a ``[..., n_heads * d_head]`` site as ``[..., n_heads, d_head]``, and write it back flattened."""
    get, set_ = site.get, site.set

    def split(value: Any) -> torch.Tensor:
        return get(value).unflatten(-1, (n_heads, -1))

    def merge(value: Any, new: torch.Tensor) -> Any:
        return set_(value, new.flatten(-2))

    return replace(site, get=split, set=merge)


def _refuse_writes(site: Site, name: str) -> Site:
    def refuse(value: Any, new: torch.Tensor) -> Any:
        raise ValueError(f"{name!r} is read-only: a hook may read it (return None) but not replace it; the attention "
                         "weights are used inside the attention function before any hook sees them. To change what "
                         "a head attends to, edit attn.hook_q / attn.hook_k / attn.hook_v, or a head's output at "
                         "attn.hook_z")

    return replace(site, set=refuse)


def resolve_site(adapter: ArchAdapter, name: str, heads: HeadCounts | None = None) -> Site:
    """The module path (from the HF model root) and accessors for one valid hook name.

    ``heads`` (:func:`head_counts`) is needed for the per-head sites (``attn.hook_q``, ``attn.hook_z``, ...).
    """
    parsed = parse_block_name(name)
    if parsed is not None:
        tower, layer, site = parsed
        root = adapter.lm_layers if tower == "lm" else adapter.vision_layers
        block = f"{root}.{layer}"
        sites = adapter.lm_block if tower == "lm" else adapter.vision_block
        if site == "hook_resid_pre":
            return Site(block, "input")
        if site == "hook_resid_post":
            return Site(block, "output")
        residual = {"hook_attn_out": sites.attn, "hook_resid_mid": sites.resid_mid, "hook_mlp_out": sites.mlp}
        rel = residual[site] if site in residual else sites.inner_site(site)
        out = replace(rel, module=f"{block}.{rel.module}")
        if out.heads is not None:
            if heads is None or tower not in heads:
                raise ValueError(f"{name!r} is a per-head site: resolving it needs the model's head counts")
            n_q, n_kv = heads[tower]
            out = _split_heads(out, n_q if out.heads == "q" else n_kv)
        if out.read_only:
            out = _refuse_writes(out, name)
        return out
    fixed = {
        "hook_embed": Site(f"{adapter.lm_layers}.0", "input"),
        "vision.hook_embed": Site(f"{adapter.vision_layers}.0", "input"),
        "projector.hook_in": adapter.projector_in,
        "projector.hook_out": adapter.projector_out,
        "ln_final.hook_normalized": Site(adapter.final_norm, "output"),
        "hook_logits": Site(adapter.lm_head, "output"),
    }
    return fixed[name]
