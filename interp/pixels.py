"""The image processor's maths as differentiable torch, so attacks can work in pixel space.

Why: adversarial attacks (PGD for MLLMEraser's recall pairs) bound the
perturbation in pixel space ``[0, 1]``, *before* the processor's rescale and
normalisation, and need gradients with respect to those pixels.  The
processors themselves are numpy/PIL code, so we split them in two:

1. :func:`to_pixels` runs the processor's own geometric steps (resize, crop,
   padding: whatever it is configured to do) by calling the processor with
   ``do_rescale=False, do_normalize=False``, so the resize is the processor's
   exact PIL resampling, not a torch imitation of it.  The result is an image
   at the model's resolution in ``[0, 1]``.
2. :func:`pixels_to_image_kwargs` redoes the rest (rescale, normalise, and for
   Qwen2.5-VL the patchification) in torch, so gradients flow back to the
   pixels.  ``pixels_to_image_kwargs(model, to_pixels(model, imgs))`` equals
   ``model.image_processor(imgs)`` to float rounding (tests assert <= 1e-4).

:func:`encode_with_pixels` then builds a full :class:`~interp.inputs.VLMInputs`
from pixels, with the text encoded exactly as :meth:`HookedVLM.encode` would.

>>> from PIL import Image
>>> from interp.tiny import tiny_vlm
>>> model = tiny_vlm("llava", n_layers=2)
>>> x = to_pixels(model, [Image.new("RGB", (45, 31), "red")])
>>> tuple(x.shape), float(x.min()) >= 0.0
((1, 3, 32, 32), True)
>>> inputs = encode_with_pixels(model, x, ["who is this"])
>>> inputs.image_kwargs["pixel_values"].shape
torch.Size([1, 3, 32, 32])

Adding an architecture: write a ``_from_processed_<arch>`` (processor output
without rescale/normalise -> list of ``[3, h, w]`` images) and a
``_to_kwargs_<arch>`` (pixels -> model kwargs) and register both in
``_ARCH`` below, keyed by the adapter's ``name``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from .inputs import InputError, VLMInputs, encode_batch

PixelImage = Float[Tensor, "3 h w"]
Pixels = Union[Float[Tensor, "n 3 h w"], Sequence[PixelImage]]


# -- shared pieces ---------------------------------------------------------
def _as_list(pixels: Pixels) -> list[Tensor]:
    if isinstance(pixels, Tensor):
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [n, 3, H, W] (or a list of [3, h, w]), got shape {tuple(pixels.shape)}")
        return list(pixels.unbind(0))
    out = list(pixels)
    for i, p in enumerate(out):
        if not isinstance(p, Tensor) or p.ndim != 3 or p.shape[0] != 3:
            raise ValueError(f"image {i}: expected a [3, h, w] tensor, got {getattr(p, 'shape', type(p).__name__)}")
    return out


def _stack(images: list[Tensor], what: str) -> Tensor:
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"{what}: the images have different sizes {sorted(shapes)} (Qwen2.5-VL resizes each image to its own "
            "aspect ratio); pass stack=False to get a list of [3, h, w] tensors instead"
        )
    return torch.stack(images)


def _normalise(processor: Any, x: Float[Tensor, "*batch 3 h w"]) -> Float[Tensor, "*batch 3 h w"]:
    """``[0, 1]`` pixels -> what the processor feeds the model: ``(x * 255 * rescale_factor - mean) / std``.

    ``x * 255`` recovers the processor's 0..255 values; its rescale and
    normalise flags and constants are read from the processor, not assumed.
    """
    x = x.float()
    if getattr(processor, "do_rescale", True):
        scale = 255.0 * float(getattr(processor, "rescale_factor", 1 / 255))
        if abs(scale - 1.0) > 1e-12:
            x = x * scale
    else:
        x = x * 255.0
    if getattr(processor, "do_normalize", True):
        mean = torch.as_tensor(processor.image_mean, dtype=x.dtype, device=x.device).reshape(3, 1, 1)
        std = torch.as_tensor(processor.image_std, dtype=x.dtype, device=x.device).reshape(3, 1, 1)
        x = (x - mean) / std
    return x


# -- LLaVA (CLIP processor: resize shortest edge, centre crop) ----------------
def _from_processed_llava(processor: Any, out: dict[str, Tensor]) -> list[Tensor]:
    return list(out["pixel_values"].float().unbind(0))


def _to_kwargs_llava(processor: Any, images: list[Tensor]) -> dict[str, Tensor]:
    return {"pixel_values": _normalise(processor, _stack(images, "LLaVA pixel_values"))}


# -- Qwen2.5-VL (smart_resize to a pixel budget, then patchify) -------------
def _qwen_sizes(processor: Any) -> tuple[int, int, int]:
    return int(processor.patch_size), int(processor.merge_size), int(processor.temporal_patch_size)


def _from_processed_qwen(processor: Any, out: dict[str, Tensor]) -> list[Tensor]:
    """Undo the processor's patchification (its rows are un-normalised 0..255 values here)."""
    p, m, t = _qwen_sizes(processor)
    flat = out["pixel_values"].float()
    images, start = [], 0
    for _, gh, gw in out["image_grid_thw"].tolist():
        n = gh * gw
        rows = flat[start:start + n].reshape(gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
        # (gh/m, gw/m, mh, mw, C, ph, pw) -> (C, gh/m, mh, ph, gw/m, mw, pw)
        images.append(rows.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p))
        start += n
    return images


def patchify_qwen(
    image: Float[Tensor, "3 h w"], patch_size: int, merge_size: int, temporal_patch_size: int,
) -> Float[Tensor, "patches dim"]:
    """Qwen2-VL's patch layout, in torch: rows ordered by merge window, each row (C, T, p, p) flattened.

    A still image is repeated ``temporal_patch_size`` times along time, as the
    processor does, so the vision tower's 3D patch embedding sees a static clip.
    """
    c, h, w = image.shape
    gh, gw, p, m = h // patch_size, w // patch_size, patch_size, merge_size
    if gh * p != h or gw * p != w or gh % m or gw % m:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size*merge_size = {p * m}")
    x = image.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, mh, mw, C, ph, pw)
    x = x.unsqueeze(5).expand(*x.shape[:5], temporal_patch_size, p, p)
    return x.reshape(gh * gw, c * temporal_patch_size * p * p)


def _to_kwargs_qwen(processor: Any, images: list[Tensor]) -> dict[str, Tensor]:
    p, m, t = _qwen_sizes(processor)
    patches, grids = [], []
    for im in images:
        patches.append(patchify_qwen(_normalise(processor, im), p, m, t))
        grids.append([1, im.shape[1] // p, im.shape[2] // p])
    return {
        "pixel_values": torch.cat(patches, 0),
        "image_grid_thw": torch.tensor(grids, dtype=torch.long, device=images[0].device),
    }


_ARCH: dict[str, tuple[Callable[[Any, dict[str, Tensor]], list[Tensor]], Callable[[Any, list[Tensor]], dict[str, Tensor]]]] = {
    "llava": (_from_processed_llava, _to_kwargs_llava),
    "qwen2_5_vl": (_from_processed_qwen, _to_kwargs_qwen),
}


def _arch(model: Any):
    name = model.adapter.name
    if name not in _ARCH:
        raise NotImplementedError(
            f"pixel-space preprocessing is not implemented for {name!r} (have {sorted(_ARCH)}); add a "
            "_from_processed/_to_kwargs pair for it to interp/pixels.py and register it in _ARCH"
        )
    if model.image_processor is None:
        raise InputError(f"{name}: this model has no image processor, so it cannot take images")
    return _ARCH[name]


# -- public API ------------------------------------------------------------
def to_pixels(
    model: Any, images: Sequence[Image.Image], stack: bool = True, device: torch.device | str | None = None,
) -> Union[Float[Tensor, "n 3 H W"], list[PixelImage]]:
    """Images resized/cropped exactly as the model's processor does, as float32 pixels in ``[0, 1]``.

    The geometry is the processor's own (it is called with rescale and
    normalise switched off), so nothing here re-implements PIL resampling.
    With ``stack=False`` a list of ``[3, h, w]`` tensors is returned: Qwen2.5-VL
    resizes each image to its own aspect ratio, so a batch may not stack.
    Values are multiples of 1/255 (the processor's resize works on uint8).
    """
    from_processed, _ = _arch(model)
    proc = model.image_processor
    bad = [i for i, im in enumerate(images) if not isinstance(im, Image.Image)]
    if bad:
        raise InputError(f"row {bad[0]}: to_pixels() takes one PIL image per row, got "
                         f"{type(images[bad[0]]).__name__} (text-only and multi-image rows cannot be attacked in "
                         "pixel space here)")
    rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
    if not rgb:
        raise InputError("to_pixels() needs at least one image")
    out = proc(rgb, do_rescale=False, do_normalize=False, return_tensors="pt")
    pix = [(im / 255.0).to(device if device is not None else model.device) for im in from_processed(proc, dict(out))]
    return _stack(pix, "to_pixels") if stack else pix


def pixels_to_image_kwargs(model: Any, pixels: Pixels) -> dict[str, Tensor]:
    """Differentiable ``[0, 1]`` pixels -> the image kwargs the model takes (``pixel_values``, ...).

    LLaVA: ``(x - mean) / std`` -> ``pixel_values [n, 3, H, W]``.  Qwen2.5-VL:
    normalise, then patchify exactly like ``Qwen2VLImageProcessorPil`` ->
    ``pixel_values [total_patches, 3*T*p*p]`` and ``image_grid_thw [n, 3]``.
    Output is float32 on the pixels' device; gradients flow to ``pixels``.
    """
    _, to_kwargs = _arch(model)
    images = _as_list(pixels)
    if not images:
        raise ValueError("pixels_to_image_kwargs() needs at least one image")
    return to_kwargs(model.image_processor, images)


def pixels_to_pil(pixels: Pixels) -> list[Image.Image]:
    """Quantise ``[0, 1]`` pixels to uint8 PIL images (round to nearest: each value moves by <= 0.5/255)."""
    out = []
    for im in _as_list(pixels):
        arr = (im.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        out.append(Image.fromarray(np.ascontiguousarray(arr), mode="RGB"))
    return out


class _Precomputed:
    """Stands in for the image processor inside :func:`~interp.inputs.encode_batch`.

    Why: the number of image tokens must come from the *same* kwargs the model
    will see (Qwen's ``image_grid_thw``); re-processing a placeholder image of
    the pixels' size is not safe, because ``smart_resize`` is not idempotent
    (an image it upscaled past the pixel budget is downscaled on a second pass).
    """

    def __init__(self, kwargs: dict[str, Tensor]) -> None:
        self.kwargs = kwargs

    def __call__(self, images: Any, **_: Any) -> dict[str, Tensor]:
        return dict(self.kwargs)


def encode_with_pixels(
    model: Any, pixels: Pixels, prompts: Sequence[str] | str, answers: Sequence[str] | None = None, chat: bool = True,
) -> VLMInputs:
    """Like :meth:`HookedVLM.encode` with one image per prompt, but the images are differentiable pixels.

    The text side (chat template, image-token expansion, left padding, masks,
    ``labels`` when ``answers`` are given) is exactly ``encode``'s; the image
    kwargs are :func:`pixels_to_image_kwargs` of ``pixels``, moved to the
    model's device and dtype with the autograd graph kept.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    images = _as_list(pixels)
    if len(images) != len(prompts):
        raise InputError(f"got {len(images)} images for {len(prompts)} prompts; encode_with_pixels takes one image per prompt")
    kwargs = pixels_to_image_kwargs(model, images)
    dummies = [Image.new("RGB", (1, 1)) for _ in images]  # only counted; the shim supplies the real kwargs
    enc = encode_batch(model.adapter, model.tokenizer, _Precomputed(kwargs), model.hf_model.config,
                       dummies, list(prompts), chat=chat, answers=answers)
    return enc.to(model.device, dtype=model.dtype)


__all__ = ["to_pixels", "pixels_to_image_kwargs", "pixels_to_pil", "encode_with_pixels", "patchify_qwen"]
