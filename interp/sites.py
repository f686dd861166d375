"""Resolve a hook name to a concrete :class:`~interp.adapters.base.Site` on a model."""
from __future__ import annotations

from dataclasses import replace

from .adapters.base import ArchAdapter, Site
from .names import parse_block_name


def resolve_site(adapter: ArchAdapter, name: str) -> Site:
    """The module path (from the HF model root) and accessors for one valid hook name."""
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
        rel = {"hook_attn_out": sites.attn, "hook_resid_mid": sites.resid_mid, "hook_mlp_out": sites.mlp}[site]
        return replace(rel, module=f"{block}.{rel.module}")
    fixed = {
        "hook_embed": Site(f"{adapter.lm_layers}.0", "input"),
        "vision.hook_embed": Site(f"{adapter.vision_layers}.0", "input"),
        "projector.hook_in": adapter.projector_in,
        "projector.hook_out": adapter.projector_out,
        "ln_final.hook_normalized": Site(adapter.final_norm, "output"),
        "hook_logits": Site(adapter.lm_head, "output"),
    }
    return fixed[name]
