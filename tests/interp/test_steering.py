"""Steering hooks touch only their positions; batched coefficients equal one trace per coefficient."""
from __future__ import annotations

import pytest
import torch

from interp.hooks import HookContext
from interp.steering import add_vector, generate_coefficients, repeat_inputs, row_scales, run_coefficients
from interp.tiny import tiny_vlm
from tests.conftest import random_image

SITE = "blocks.1.hook_resid_pre"
COEFFS = [-2.0, 0.5, 3.0]


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def model(request):
    return tiny_vlm(request.param, seed=0, n_layers=2)


@pytest.fixture(scope="module")
def inputs(model):
    """Rows of different lengths and image counts (1, 2 and none), so image tensors must repeat consistently."""
    size = 32 if model.arch == "llava" else 64
    images = [random_image(size, 1), [random_image(size, 2), random_image(size, 3)], None]
    prompts = ["what is the name of the person in this image ?", "who are they", "who is he"]
    return model.encode(images=images, prompts=prompts)


def _vec(model):
    return 4 * torch.linspace(-1, 1, model.d_model)


def _hooks_for(model, positions="last"):
    v = _vec(model)
    return lambda scales: [(SITE, add_vector(v, scale=scales, positions=positions))]


@pytest.mark.parametrize("positions", ["all", "last", "image", "text"])
def test_add_vector_touches_only_its_positions(model, inputs, positions):
    v = _vec(model)
    scales = torch.tensor([1.0, -2.0, 0.5])
    _, clean = model.run_with_cache(inputs, names=[SITE])
    _, hooked = model.run_with_cache(inputs, names=[SITE], hooks=[(SITE, add_vector(v, scale=scales, positions=positions))])
    delta = hooked[SITE] - clean[SITE]
    mask = {"all": torch.ones_like(inputs.image_mask), "image": inputs.image_mask, "text": inputs.text_mask,
            "last": torch.nn.functional.one_hot(inputs.last_index, inputs.input_ids.shape[1]).bool()}[positions]
    expected = scales[:, None, None] * v * mask[..., None]
    assert (delta - expected).abs().max() <= 1e-5
    assert int(mask.sum()) > 0 and (delta.abs().sum(-1) > 0).sum() == int(mask.sum())


def test_add_vector_after_prefill():
    """At later generation steps the activation is only the new position: 'image' is nothing, 'last'/'text' are it."""
    x = torch.zeros(2, 1, 4)
    ctx = HookContext(name=SITE, layer=1, step=3, inputs=None)  # masks are never read after prefill
    v = torch.arange(1.0, 5.0)
    assert torch.equal(add_vector(v, positions="image")(x, ctx), x)
    for pos in ("last", "text", "all"):
        assert torch.equal(add_vector(v, scale=torch.tensor([1.0, 2.0]), positions=pos)(x, ctx)[:, 0],
                           torch.stack([v, 2 * v]))


def test_add_vector_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positions"):
        add_vector(torch.ones(4), positions="prompt")
    ctx = HookContext(name=SITE, layer=1, step=3, inputs=None)
    with pytest.raises(ValueError, match="batch 2"):
        add_vector(torch.ones(4), scale=torch.ones(3))(torch.zeros(2, 1, 4), ctx)


def test_repeat_inputs_layout(model, inputs):
    rep = repeat_inputs(inputs, 3)
    b = inputs.batch_size
    assert rep.batch_size == 3 * b
    assert torch.equal(rep.input_ids[2 * b:], inputs.input_ids) and torch.equal(rep.last_index[b:2 * b], inputs.last_index)
    for name, t in inputs.image_kwargs.items():
        assert rep.image_kwargs[name].shape[0] == 3 * t.shape[0] and torch.equal(rep.image_kwargs[name][t.shape[0]:2 * t.shape[0]], t)
    assert rep.n_images == inputs.n_images * 3
    assert torch.equal(row_scales([1.0, 2.0], 2), torch.tensor([1.0, 1.0, 2.0, 2.0]))


@pytest.mark.parametrize("positions", ["last", "image"])
def test_batched_coefficients_equal_looped(model, inputs, positions):
    hooks_for = _hooks_for(model, positions)
    batched = run_coefficients(model, inputs, hooks_for, COEFFS)
    looped = torch.stack([model.run_with_hooks(inputs, hooks_for(torch.full((inputs.batch_size,), c))) for c in COEFFS])
    assert batched.shape == looped.shape == (len(COEFFS), *looped.shape[1:])
    assert (batched - looped).abs().max() <= 1e-5
    assert (looped[0] - looped[-1]).abs().max() > 1e-2  # the coefficients really differ
    if positions == "last":  # max_rows splits the coefficients over several passes: same numbers
        chunked = run_coefficients(model, inputs, hooks_for, COEFFS, max_rows=2 * inputs.batch_size)
        assert (chunked - looped).abs().max() <= 1e-5


def test_generated_text_equals_looped(model, inputs):
    hooks_for = _hooks_for(model, "last")
    coeffs = [-3.0, 0.0, 3.0]
    batched = generate_coefficients(model, inputs, hooks_for, coeffs, max_new_tokens=5, eos_token_id=None)
    looped = [model.generate(inputs, max_new_tokens=5, hooks=hooks_for(torch.full((inputs.batch_size,), c)),
                             eos_token_id=None).texts for c in coeffs]
    assert batched == looped
    assert len(batched) == 3 and all(len(row) == inputs.batch_size for row in batched)
    assert batched[0] != batched[2]
