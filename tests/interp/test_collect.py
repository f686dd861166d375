"""Streaming collection: last-token and prompt-mean rows equal what the full cache gives."""
from __future__ import annotations

import pytest
import torch

from interp.collect import iter_query_activations, prompt_mean, prompt_positions, query_activations
from tests.conftest import random_image


def test_prompt_mean_numbers():
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    torch.testing.assert_close(prompt_mean(x, mask), torch.tensor([[3.0, 4.0], [8.0, 9.0]]))


def test_streamed_rows_equal_the_cache(tiny_model):
    images = [random_image(32, 0), None, random_image(32, 1)]
    prompts = ["who is this person", "tell me the city", "what is the name of the person in the image"]
    name = "blocks.1.hook_resid_pre"
    inputs = tiny_model.encode(images=images, prompts=prompts)
    _, cache = tiny_model.run_with_cache(inputs, names=[name])
    mask = prompt_positions(inputs, cache[name].shape[1])
    assert mask.sum(1).tolist() == (inputs.attention_mask.sum(1)).tolist()  # left padding only, no answers here
    last = torch.cat([b[name] for b in iter_query_activations(tiny_model, images, prompts, [name], batch_size=2)])
    mean = torch.cat([b[name] for b in iter_query_activations(tiny_model, images, prompts, [name], batch_size=3,
                                                              read="mean")])
    torch.testing.assert_close(last, cache.last(name).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, prompt_mean(cache[name].float(), mask), atol=1e-5, rtol=1e-5)
    stacked = query_activations(tiny_model, images, prompts, [name], batch_size=2, read="mean")
    assert list(stacked) == [name]
    torch.testing.assert_close(stacked[name], mean)
    with pytest.raises(ValueError, match="read"):
        next(iter_query_activations(tiny_model, images, prompts, [name], read="max"))
    for bad in (0, -1, 2.0):  # -1 gave {} silently, 0 a bare range() error (an audit)
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            query_activations(tiny_model, images, prompts, [name], batch_size=bad)


def test_per_head_sites_stream_as_one_row_and_patterns_are_refused(tiny_model):
    images = [random_image(32 if tiny_model.arch == "llava" else 64, 0), None]
    prompts = ["who is this person", "tell me the city"]
    inputs = tiny_model.encode(images=images, prompts=prompts)
    _, cache = tiny_model.run_with_cache(inputs, names=["blocks.1.attn.hook_z", "blocks.1.attn.hook_k"])
    got = query_activations(tiny_model, images, prompts, "blocks.1.attn.*", batch_size=1)
    assert sorted(got) == ["blocks.1.attn.hook_k", "blocks.1.attn.hook_q", "blocks.1.attn.hook_v",
                           "blocks.1.attn.hook_z"]
    n_q, n_kv = tiny_model.head_counts["lm"]
    assert got["blocks.1.attn.hook_z"].shape == (2, tiny_model.d_model)
    assert got["blocks.1.attn.hook_k"].shape == (2, tiny_model.d_model // n_q * n_kv)  # GQA: fewer k heads on Qwen
    torch.testing.assert_close(got["blocks.1.attn.hook_z"], cache.last("blocks.1.attn.hook_z").flatten(1),
                               atol=1e-5, rtol=1e-5)
    mean = query_activations(tiny_model, images, prompts, ["blocks.1.attn.hook_z"], read="mean")
    mask = prompt_positions(inputs, inputs.input_ids.shape[1])
    torch.testing.assert_close(mean["blocks.1.attn.hook_z"],
                               prompt_mean(cache["blocks.1.attn.hook_z"].flatten(-2).float(), mask), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn.hook_z"):
        query_activations(tiny_model, images, prompts, ["blocks.0.attn.hook_pattern"])


def test_vision_sites_point_to_collect_features(tiny_llava):
    with pytest.raises(ValueError, match=r"vision-side sites.*interp.probe.collect_features"):
        query_activations(tiny_llava, [random_image(32, 0)], ["who"], "vision.blocks.0.hook_resid_post")


def test_prompt_positions_leave_out_padding_and_teacher_forced_answers(tiny_llava):
    """From a mutation audit: dropping ``pos <= last_index`` (so the eraser steered the forced answer tokens too)
    went unnoticed.  The mask is exactly the non-padded positions up to and including the last prompt token."""
    inputs = tiny_llava.encode(images=[random_image(32, 0), None], prompts=["who is this person", "who"],
                               answers=["a red cat", "the person in the image is a red cat"])
    width = inputs.input_ids.shape[1]
    mask = prompt_positions(inputs, width)
    n_answer = (inputs.labels != -100).sum(1)
    assert inputs.last_index.tolist() == (width - 1 - n_answer).tolist()
    expected = torch.zeros_like(mask)
    for b in range(2):
        start = width - int(inputs.attention_mask[b].sum())
        expected[b, start:int(inputs.last_index[b]) + 1] = True
    assert torch.equal(mask, expected)
    assert mask.sum(1).tolist() == (inputs.attention_mask.sum(1) - n_answer).tolist()
    assert not (mask & (inputs.labels != -100)).any() and (inputs.labels != -100).sum() > 0
