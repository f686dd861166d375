"""Encoding: masks, left padding, image-count checks, image conversion."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from interp.hooks import first_steps
from interp.inputs import InputError


def test_masks_count_image_tokens_and_cover_non_pad(tiny_model, two_prompts):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    image_id = tiny_model.adapter.image_token_id(tiny_model.hf_model.config)
    assert inputs.image_mask.sum().item() == (inputs.input_ids == image_id).sum().item() == 2 * 16
    assert not (inputs.image_mask & inputs.text_mask).any()
    assert ((inputs.image_mask | inputs.text_mask) == inputs.attention_mask.bool()).all()
    # left padding: every row ends at the last column, which is the last prompt token
    assert (inputs.attention_mask[:, -1] == 1).all()
    assert (inputs.last_index == inputs.input_ids.shape[1] - 1).all()
    assert inputs.attention_mask[0].sum() != inputs.attention_mask[1].sum()


def test_image_count_must_match_placeholders(tiny_model):
    ph = tiny_model.adapter.image_placeholder
    size = 32 if tiny_model.arch == "llava" else 64
    img = Image.new("RGB", (size, size))
    with pytest.raises(InputError, match="placeholder"):
        tiny_model.encode(images=[img], prompts=[f"{ph} and {ph} who"], chat=False)
    with pytest.raises(InputError, match="placeholder"):
        tiny_model.encode(images=[None], prompts=[f"{ph} who"], chat=False)
    with pytest.raises(InputError, match="2 image entries for 1 prompts"):
        tiny_model.encode(images=[img, img], prompts=["who"])
    with pytest.raises(InputError, match="at least one prompt"):
        tiny_model.encode(images=[], prompts=[])


def test_non_rgb_images_are_converted_and_bad_ones_rejected(tiny_llava):
    gray = Image.new("L", (40, 30), 128)
    rgba = Image.new("RGBA", (32, 32), (1, 2, 3, 4))
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    inputs = tiny_llava.encode(images=[gray, rgba, arr], prompts=["a", "b", "c"])
    assert inputs.image_kwargs["pixel_values"].shape == (3, 3, 32, 32)
    with pytest.raises(InputError, match="row 0"):
        tiny_llava.encode(images=["not an image"], prompts=["a"])
    with pytest.raises(InputError, match="shape"):
        tiny_llava.encode(images=[np.zeros((4, 4, 7), dtype=np.uint8)], prompts=["a"])


def test_float_and_integer_arrays_are_scaled_or_rejected_never_wrapped(tiny_llava):
    """A float image in [0, 1] is scaled to 0-255 (a plain uint8 cast would make it black); values outside the
    uint8 range are an error, not wrapped around."""
    rng = np.random.RandomState(0)
    as_float = rng.rand(32, 32, 3)
    as_uint8 = np.rint(as_float * 255).astype(np.uint8)
    pixels = lambda img: tiny_llava.encode(images=[img], prompts=["who"]).image_kwargs["pixel_values"]
    assert torch.equal(pixels(as_float), pixels(as_uint8))
    assert torch.equal(pixels(as_float.astype(np.float32)), pixels(as_uint8))
    assert torch.equal(pixels(as_uint8.astype(np.int64)), pixels(as_uint8))  # integers already in [0, 255]
    assert torch.equal(pixels(as_uint8.astype(np.float64)), pixels(as_uint8))  # whole-number floats in [0, 255]
    black = pixels(np.zeros((32, 32, 3), dtype=np.uint8))
    assert not torch.equal(pixels(as_float), black)
    grey = np.full((32, 32, 1), 0.5)
    assert torch.equal(pixels(grey), pixels(np.full((32, 32, 3), 128, dtype=np.uint8)))
    for bad, message in [(as_float * 300, r"values span \[0.02.*, 299.9"), (as_float - 0.5, r"values span \[-0.4"),
                         (as_float * 2, "neither in \\[0, 1\\] nor whole numbers"),
                         (np.full((8, 8, 3), np.nan), "NaN or infinite"),
                         (np.ones((8, 8, 3), dtype=bool), "dtype bool")]:
        with pytest.raises(InputError, match=message):
            pixels(bad)


def test_one_bare_image_for_one_prompt(tiny_llava):
    img = Image.new("RGB", (32, 32), (10, 20, 30))
    bare = tiny_llava.encode(images=img, prompts="who")
    listed = tiny_llava.encode(images=[img], prompts=["who"])
    assert torch.equal(bare.input_ids, listed.input_ids)
    assert torch.equal(bare.image_kwargs["pixel_values"], listed.image_kwargs["pixel_values"])
    assert torch.equal(tiny_llava.encode(images=np.asarray(img), prompts="who").input_ids, listed.input_ids)
    with pytest.raises(InputError, match="one image for 2 prompts"):
        tiny_llava.encode(images=img, prompts=["who", "who is he"])
    stacked = np.stack([np.asarray(img)] * 2)  # a [N, H, W, 3] batch still means one image per prompt
    assert tiny_llava.encode(images=stacked, prompts=["a", "b"]).image_kwargs["pixel_values"].shape[0] == 2


def test_multiple_images_per_row(tiny_llava):
    img = Image.new("RGB", (32, 32), (10, 20, 30))
    inputs = tiny_llava.encode(images=[[img, img], None], prompts=["compare them", "hi"])
    assert inputs.image_mask[0].sum().item() == 32 and inputs.image_mask[1].sum().item() == 0


def test_qwen_image_tokens_get_their_3d_rope_positions(tiny_qwen, tiny_llava):
    """Qwen2.5-VL computes its (temporal, height, width) image positions only when given ``mm_token_type_ids``;
    without them every token silently gets 1-D positions.  The encoded batch carries them, so interp's forward
    equals one with the 3-D positions passed explicitly, and differs from the 1-D fallback."""
    import copy

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 40, 3), dtype=np.uint8))  # a non-square grid
    model = copy.deepcopy(tiny_qwen)
    with torch.no_grad():  # sharper attention, as a trained model has, so positions matter visibly
        for layer in model.hf_model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    inputs = model.encode(images=[img, None], prompts=["who is this person ?", "who is ada lovelace ?"])
    kw = inputs.model_kwargs()
    assert torch.equal(kw["mm_token_type_ids"], inputs.image_mask.long())
    pos, deltas = model.hf_model.model.get_rope_index(
        inputs.input_ids, image_grid_thw=kw["image_grid_thw"], attention_mask=inputs.attention_mask,
        mm_token_type_ids=kw["mm_token_type_ids"])
    assert int(deltas[0]) < 0 and int(deltas[1]) == 0  # the image row's text positions are shifted back
    real = inputs.attention_mask.bool()
    with torch.no_grad():
        ours = model.run_with_hooks(inputs, [])
        plain = {k: v for k, v in kw.items() if k != "mm_token_type_ids"}
        explicit = model.hf_model(**plain, position_ids=pos).logits
        model.hf_model.model.rope_deltas = None
        fallback = model.hf_model(**plain).logits
        model.hf_model.model.rope_deltas = None
    assert torch.allclose(ours[real], explicit[real], atol=1e-5)
    assert (ours[0][real[0]] - fallback[0][real[0]]).abs().max() > 1e-2
    assert torch.allclose(ours[1][real[1]], fallback[1][real[1]], atol=1e-5)  # text-only rows: 1-D either way
    assert "mm_token_type_ids" not in model.encode(prompts=["who is ada lovelace ?"]).model_kwargs()
    assert "mm_token_type_ids" not in tiny_llava.encode(images=[img], prompts=["who ?"]).model_kwargs()


def test_with_tokens_teacher_forces_what_generation_computed(tiny_model, two_prompts):
    """The prompt + the first generated tokens in one forward pass gives the logits greedy generation computed at
    each step (left padding and Qwen's 3-D rope positions included), with the masks and labels extended."""
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    steps: dict[int, torch.Tensor] = {}
    record = first_steps(lambda x, ctx: steps.__setitem__(ctx.step, x[:, -1].float().clone()), 3)
    gen = tiny_model.generate(inputs, max_new_tokens=4, hooks=[("hook_logits", record)])
    forced = inputs.with_tokens(gen.new_tokens[:, :3])
    width = inputs.input_ids.shape[1]
    assert forced.input_ids.shape == (2, width + 3) and (forced.last_index == width + 2).all()
    assert forced.text_mask[:, width:].all() and not forced.image_mask[:, width:].any()
    assert torch.equal(forced.image_mask[:, :width], inputs.image_mask)
    with torch.no_grad():
        logits = tiny_model.run_with_hooks(forced, [])
    for t in range(4):
        assert torch.allclose(logits[:, width - 1 + t].float(), steps[t], atol=1e-5), t
    labelled = replace(inputs, labels=torch.zeros_like(inputs.input_ids)).with_tokens(gen.new_tokens[:, :2])
    assert (labelled.labels[:, width:] == -100).all() and (labelled.labels[:, :width] == 0).all()
    assert inputs.with_tokens(gen.new_tokens[:, :0]) is inputs
    with pytest.raises(ValueError, match=r"\[batch, n\] with batch 2"):
        inputs.with_tokens(gen.new_tokens[:1])
