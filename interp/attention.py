"""Eager attention for the calls that read attention patterns, and only for them.

Why: a transformers attention module returns its attention weights only when
it runs the eager implementation; the fused ones (sdpa, flash) never build the
``[batch, head, query, key]`` matrix, which is what makes them fast.  Loading
the whole model eager to read a pattern now and then would slow every other
call, so :class:`~interp.HookedVLM` switches just the tower whose
``attn.hook_pattern`` a call reads, for that call, and puts the previous
implementation back afterwards (whatever happens).  transformers reads
``config._attn_implementation`` at each forward, so the switch needs no reload.
Eager and sdpa agree to float rounding (~1e-7 in float32), so a cache read with
a pattern matches one read without to that precision, not bit for bit.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

from torch import nn

from .adapters.base import ArchAdapter, get_module


def tower_root(adapter: ArchAdapter, tower: str) -> str:
    """The module path holding one tower's blocks and its own config (``"lm"`` or ``"vision"``)."""
    layers = adapter.lm_layers if tower == "lm" else adapter.vision_layers
    return layers.rsplit(".", 1)[0]


def _configs(module: nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for mod in module.modules():
        config = getattr(mod, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def eager_attention(hf_model: nn.Module, roots: Iterable[str]) -> Iterator[None]:
    """Run the attention of every module under ``roots`` (dotted paths) eagerly inside the block.

    Every distinct config object under those modules is switched (the decoder's mask builder reads the same
    config as its attention modules), and each gets its own previous value back on exit.
    """
    roots = tuple(roots)
    if not roots:  # the common case: nothing to switch, no walk over the modules
        yield
        return
    configs: dict[int, Any] = {}
    for root in roots:
        for config in _configs(get_module(hf_model, root)):
            configs.setdefault(id(config), config)
    saved = [(config, config._attn_implementation_internal) for config in configs.values()]
    try:
        for config, _ in saved:
            config._attn_implementation_internal = "eager"
        yield
    finally:
        for config, before in saved:
            config._attn_implementation_internal = before
