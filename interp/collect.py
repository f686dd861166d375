"""Streaming activation collection: one ``[d]`` row per query, read at the last prompt token or averaged.

Why streaming: fitting statistics (means, second moments) over thousands of
queries must not hold every activation in memory, and at 7B scale one batch
of full caches is already gigabytes.  Each batch yields only ``[batch, d]``
per name, at the position MLLMEraser (and most probing work) reads.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .hooks import HookSpec
from .inputs import RowImages
from .model import HookedVLM
from .names import NameFilter, is_vision_side, resolve_names_except_read_only


#: How a ``[batch, pos, d]`` activation becomes one ``[batch, d]`` row per query.
READS = ("last", "mean")


def prompt_positions(inputs, n_pos: int) -> Tensor:
    """Bool ``[batch, pos]``: real prompt positions up to and including the last prompt token (no padding)."""
    pos = torch.arange(n_pos, device=inputs.attention_mask.device)
    return (pos[None, :] <= inputs.last_index[:, None].to(pos.device)) & inputs.attention_mask.bool()


def prompt_mean(x: Float[Tensor, "batch pos d"], mask: Tensor) -> Float[Tensor, "batch d"]:
    """Mean of ``x`` over the positions ``mask`` selects (image and text tokens alike), per row."""
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def iter_query_activations(
    model: HookedVLM,
    images: Sequence[RowImages],
    prompts: Sequence[str],
    names: NameFilter,
    batch_size: int = 32,
    hooks: HookSpec | None = None,
    progress: bool = False,
    desc: str = "activations",
    read: str = "last",
) -> Iterator[dict[str, Float[Tensor, "batch d"]]]:
    """Yield ``{name: [batch, d]}`` activations, one batch at a time, in input order.

    ``read="last"`` (default) takes the last prompt token; ``read="mean"`` the mean over every prompt
    position (image and text tokens, padding excluded), still ``[batch, d]`` so streaming stays cheap.
    Per-head sites (``attn.hook_z``, ...) give the heads side by side (``[batch, heads * d_head]``);
    attention patterns are left out of globs, and naming one is an error.
    """
    if read not in READS:
        raise ValueError(f"read must be one of {READS}, got {read!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    if not prompts:
        raise ValueError(f"no queries to collect {desc} from (an empty set)")
    names = resolve_names_except_read_only(
        names, model.hook_names(), "attention patterns are [batch, head, query, key], not one vector per query; "
        "collect attn.hook_z (each head's output) instead")
    vision = [n for n in names if is_vision_side(n)]
    if vision:
        raise ValueError(f"{vision[:3]} are vision-side sites: they have no prompt tokens to read a query at; "
                         "collect language-model sites here, and per-image means of vision sites with "
                         "interp.probe.collect_features (the mean over each image's patches)")
    per_head = {n for n in names if model.site(n).heads is not None}
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        inputs = model.encode(images=list(images[s:s + batch_size]), prompts=list(prompts[s:s + batch_size]))
        _, cache = model.run_with_cache(inputs, names=names, hooks=hooks, stop_early=True)  # logits unused
        out = {}
        for n in cache.names:
            if read == "last":
                out[n] = cache.last(n).float().flatten(1)  # per-head sites: the heads side by side
            else:
                x = cache[n].flatten(-2) if n in per_head else cache[n]
                out[n] = prompt_mean(x.float(), prompt_positions(inputs, x.shape[1]).to(x.device))
        yield out


def query_activations(model: HookedVLM, images: Sequence[RowImages], prompts: Sequence[str], names: NameFilter,
                      batch_size: int = 32, hooks: HookSpec | None = None, progress: bool = False,
                      desc: str = "activations", read: str = "last") -> dict[str, Float[Tensor, "n d"]]:
    """All query activations stacked, ``{name: [n, d]}``: for small sets (large ones: :func:`iter_query_activations`)."""
    out: dict[str, list[Tensor]] = {}
    for batch in iter_query_activations(model, images, prompts, names, batch_size, hooks, progress, desc, read):
        for n, t in batch.items():
            out.setdefault(n, []).append(t)
    return {n: torch.cat(ts) for n, ts in out.items()}
