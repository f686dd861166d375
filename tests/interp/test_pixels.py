"""Pixel-space preprocessing: equals the processor, is differentiable, and encodes like ``encode``."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from interp.model import sequence_nll
from interp.pixels import encode_with_pixels, pixels_to_image_kwargs, pixels_to_pil, to_pixels


def odd_images() -> list[Image.Image]:
    """Non-square images of odd sizes (width x height), including one wider and one taller than square."""
    rng = np.random.RandomState(7)
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(53, 37), (29, 71), (45, 45)]]


def test_kwargs_from_pixels_equal_the_processor(tiny_model):
    images = odd_images()
    ref = tiny_model.image_processor(images, return_tensors="pt")
    pix = to_pixels(tiny_model, images, stack=False)
    got = pixels_to_image_kwargs(tiny_model, pix)
    assert set(got) == set(ref)
    for key in ref:
        assert got[key].shape == ref[key].shape, key
        diff = (got[key].double() - ref[key].double()).abs().max().item()
        print(f"{tiny_model.arch} {key}: max abs diff {diff:.3g}")
        assert diff <= 1e-4, (key, diff)
    if tiny_model.arch == "qwen2_5_vl":
        assert torch.equal(got["image_grid_thw"], ref["image_grid_thw"])
    for p in pix:
        assert p.dtype == torch.float32 and p.min() >= 0 and p.max() <= 1
        assert torch.allclose(p * 255, (p * 255).round(), atol=1e-4)  # the processor's resize is on uint8


def test_resized_size_follows_the_processor(tiny_llava, tiny_qwen):
    images = odd_images()
    assert tuple(to_pixels(tiny_llava, images).shape) == (3, 3, 32, 32)  # shortest edge 32, centre crop 32x32
    sizes = [tuple(p.shape[1:]) for p in to_pixels(tiny_qwen, images, stack=False)]
    grids = tiny_qwen.image_processor(images, return_tensors="pt")["image_grid_thw"]
    assert sizes == [(h * 8, w * 8) for _, h, w in grids.tolist()]
    assert len(set(sizes)) > 1  # each image keeps its own aspect ratio ...
    with pytest.raises(ValueError, match="stack=False"):
        to_pixels(tiny_qwen, images)  # ... so a mixed batch does not stack


def test_gradients_flow_to_pixels(tiny_model):
    images = odd_images()[:2]
    pix = [p.clone().requires_grad_(True) for p in to_pixels(tiny_model, images, stack=False)]
    inputs = encode_with_pixels(tiny_model, pix, ["who is this", "what is it"], answers=["a cat", "the dog"])
    loss = sequence_nll(tiny_model.hf_model(**inputs.model_kwargs()).logits, inputs.labels).sum()
    grads = torch.autograd.grad(loss, pix)  # not .backward(): the shared model must not collect .grad
    for g in grads:
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_encode_with_pixels_matches_encode(tiny_model):
    images = odd_images()
    prompts = ["who is this", "what is the name of the person", "hi"]
    answers = ["a b", "c", "d e f"]
    ref = tiny_model.encode(images=images, prompts=prompts, answers=answers)
    got = encode_with_pixels(tiny_model, to_pixels(tiny_model, images, stack=False), prompts, answers=answers)
    for f in ("input_ids", "attention_mask", "image_mask", "text_mask", "last_index", "labels"):
        assert torch.equal(getattr(got, f), getattr(ref, f)), f
    assert got.prompts == ref.prompts
    with torch.no_grad():
        a = tiny_model.hf_model(**got.model_kwargs()).logits
        b = tiny_model.hf_model(**ref.model_kwargs()).logits
    assert (a - b).abs().max().item() <= 1e-4


def test_pil_round_trip_is_exact_on_processor_grid(tiny_llava):
    pix = to_pixels(tiny_llava, odd_images())
    back = to_pixels(tiny_llava, pixels_to_pil(pix))
    assert (back - pix).abs().max().item() <= 1e-6


def test_pil_quantisation_moves_values_by_at_most_half_a_level():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    q = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in pixels_to_pil(x)])
    assert (q - x).abs().max().item() <= 0.5 / 255 + 1e-6


def test_errors_are_clear(tiny_llava):
    fake = SimpleNamespace(adapter=SimpleNamespace(name="idefics"), image_processor=object())
    with pytest.raises(NotImplementedError, match="interp/pixels.py"):
        pixels_to_image_kwargs(fake, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[n, 3, H, W\]"):
        pixels_to_image_kwargs(tiny_llava, torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="one image per prompt"):
        encode_with_pixels(tiny_llava, torch.zeros(2, 3, 32, 32), ["only one"])
