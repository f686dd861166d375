"""Vision-side activations on each image's patch grid, in raster order: spatial maps of the vision tower.

Why a helper: the towers store patches in different orders.  CLIP (LLaVA)
keeps one row per image, a CLS token and then the patches row by row.
Qwen2.5-VL flattens every image's patches into one sequence, first grouped
into ``merge x merge`` blocks (its processor's order), then permuted into
attention windows before the first block; only the merger's output
(``projector.hook_out``) is put back in order.  Reading ``cache["vision.blocks.3.hook_resid_post"]``
row by row as if it were raster scrambles any spatial map on Qwen, silently.

:func:`vision_maps` undoes each layout: one ``[h, w, ...]`` tensor per image
(``h x w`` patches; for ``projector.hook_out`` on Qwen, ``h/merge x w/merge``
merged patches), with the CLS token left out.

>>> import numpy as np
>>> from PIL import Image
>>> from interp.tiny import tiny_vlm
>>> model = tiny_vlm("llava", n_layers=1, vision_layers=1)
>>> inputs = model.encode(images=[Image.new("RGB", (32, 32))], prompts=["who"])
>>> _, cache = model.run_with_cache(inputs, names=["vision.blocks.0.hook_resid_post"])
>>> [tuple(m.shape) for m in vision_maps(model, inputs, "vision.blocks.0.hook_resid_post", cache)]
[(4, 4, 64)]
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .inputs import VLMInputs
from .names import HookNameError, closest_names, is_vision_side

if TYPE_CHECKING:  # pragma: no cover
    from .model import HookedVLM

__all__ = ["vision_maps", "qwen_window_to_raster", "qwen_unwindow"]


def vision_maps(model: "HookedVLM", inputs: VLMInputs, name: str, source: Any) -> list[Tensor]:
    """One ``[h, w, ...]`` tensor per image of ``inputs`` (batch order, then image order within a row): the
    vision-side activation ``name`` on the image's patch grid, row-major; ``source`` is a cache holding ``name``
    or the activation itself."""
    valid = model.hook_names()
    if name not in valid:  # a typo or a block this model lacks: the closest valid names
        vision_names = [n for n in valid if is_vision_side(n)]
        raise HookNameError(f"{name!r} is not a hook name of this model; closest vision-side names: "
                            f"{closest_names(name, vision_names) or vision_names[:6]}")
    if not is_vision_side(name):
        raise ValueError(f"{name!r} is not a vision-side site (vision.* or projector.*): it has prompt positions, "
                         "not patches; use cache.image(name) for the image tokens in the language model")
    t = source[name] if not isinstance(source, Tensor) else source
    n_images = sum(inputs.n_images)
    if n_images == 0:
        raise ValueError("the batch has no images")
    if model.adapter.vision_batched:
        return _batched_maps(t, n_images, name)
    grid = inputs.image_kwargs.get("image_grid_thw")
    if grid is None:
        raise ValueError(f"{model.arch}: the batch carries no image_grid_thw to lay the patches out by")
    vc = model.hf_model.config.vision_config
    merged = name == "projector.hook_out"
    if merged:
        return _raster_merged(t, grid, vc.spatial_merge_size, name)
    return qwen_window_to_raster(t, grid, vc.spatial_merge_size, vc.window_size, vc.patch_size, name)


def _batched_maps(t: Tensor, n_images: int, name: str) -> list[Tensor]:
    if t.dim() < 3 or t.shape[0] != n_images:
        raise ValueError(f"{name!r}: expected [n_images={n_images}, patches(+CLS), ...], got {tuple(t.shape)}")
    n = t.shape[1]
    for patches in (n, n - 1):  # projector sites drop the CLS token, tower sites keep it first
        side = math.isqrt(patches)
        if patches > 0 and side * side == patches:
            rest = tuple(t.shape[2:])
            return [t[i, n - patches:].reshape(side, side, *rest) for i in range(n_images)]
    raise ValueError(f"{name!r}: {n} rows per image are neither a square patch grid nor one plus a square")


def _grids(grid_thw: Tensor) -> list[tuple[int, int, int]]:
    out = [tuple(int(x) for x in g) for g in grid_thw.tolist()]
    if any(t != 1 for t, _, _ in out):
        raise NotImplementedError("vision_maps lays out still images (grid t = 1); video grids are not supported")
    return out


def _raster_merged(t: Tensor, grid_thw: Tensor, merge: int, name: str) -> list[Tensor]:
    """``projector.hook_out``: merged patches already in raster order, image after image."""
    shapes = [(h // merge, w // merge) for _, h, w in _grids(grid_thw)]
    counts = [h * w for h, w in shapes]
    if t.shape[0] != sum(counts):
        raise ValueError(f"{name!r}: {t.shape[0]} rows for merged grids of {counts} patches")
    return [c.reshape(h, w, *t.shape[1:]) for c, (h, w) in zip(torch.split(t, counts), shapes)]


def qwen_unwindow(t: Tensor, grid_thw: Tensor, merge: int, window_size: int, patch_size: int) -> Tensor:
    """Undo Qwen2.5-VL's window permutation: rows in window order -> the processor's order, for patch rows
    (``merge**2`` rows per merged unit: the vision blocks, ``projector.hook_in``) or merged rows (one per unit).

    The permutation is the tower's own (``transformers.vision_utils.get_vision_window_index``) over merged
    units, applied before the first block and undone by the tower only after the merger.
    """
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid_thw.cpu(), spatial_merge_size=merge, window_size=window_size,
                                              patch_size=patch_size)
    n_units = window_index.numel()
    if t.shape[0] % n_units:
        raise ValueError(f"{t.shape[0]} rows do not split into the {n_units} merged units of grids "
                         f"{grid_thw.tolist()}")
    units = t.reshape(n_units, t.shape[0] // n_units, *t.shape[1:])
    return units[torch.argsort(window_index.to(t.device))].reshape(t.shape)


def qwen_window_to_raster(t: Tensor, grid_thw: Tensor, merge: int, window_size: int, patch_size: int,
                          name: str = "activation") -> list[Tensor]:
    """Qwen2.5-VL's window-ordered patch rows (every vision block site, ``projector.hook_in``) -> one
    ``[h, w, ...]`` raster map per image.

    Two permutations are undone: the window order, over ``merge x merge`` blocks
    (``transformers.vision_utils.get_vision_window_index``, what the tower applies before its first block),
    then the processor's blocked order ``(h_block, w_block, h_in, w_in)``.
    """
    grids = _grids(grid_thw)
    total = sum(h * w for _, h, w in grids)
    if t.shape[0] != total:
        raise ValueError(f"{name!r}: {t.shape[0]} rows for image grids of {total} patches in all")
    processor = qwen_unwindow(t, grid_thw, merge, window_size, patch_size)
    maps = []
    for chunk, (_, h, w) in zip(torch.split(processor, [h * w for _, h, w in grids]), grids):
        rest = tuple(chunk.shape[1:])
        blocked = chunk.reshape(h // merge, w // merge, merge, merge, *rest)  # (hb, wb, hi, wi)
        perm = (0, 2, 1, 3) + tuple(range(4, 4 + len(rest)))
        maps.append(blocked.permute(*perm).reshape(h, w, *rest))  # (hb, hi, wb, wi) -> raster
    return maps
