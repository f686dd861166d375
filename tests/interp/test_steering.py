"""Steering hooks touch only their positions; batched coefficients equal one trace per coefficient."""
from __future__ import annotations

import dataclasses

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


def test_shared_prefix_equals_looped_for_last_token_steering(model, inputs):
    """The prefix once, the last position per coefficient over its KV cache: the same logits as one trace per
    coefficient, chunked or not; the hooks see one position at step 1.  Qwen2.5-VL's 3-D positions refuse."""
    hooks_for = _hooks_for(model, "last")
    if not model.adapter.continues_from_cache:
        with pytest.raises(ValueError, match="not supported for qwen2_5_vl"):
            run_coefficients(model, inputs, hooks_for, COEFFS, shared_prefix=True)
        return
    looped = torch.stack([model.run_with_hooks(inputs, hooks_for(torch.full((inputs.batch_size,), c))) for c in COEFFS])
    for max_rows in (None, 2 * inputs.batch_size):
        shared = run_coefficients(model, inputs, hooks_for, COEFFS, max_rows=max_rows, shared_prefix=True)
        assert shared.shape == looped.shape
        assert (shared - looped).abs().max() <= 1e-5
    assert (looped[0, :, -1] - looped[-1, :, -1]).abs().max() > 1e-2  # the coefficients really differ
    seen = []

    def spy(x, ctx):
        seen.append((ctx.step, tuple(x.shape)))

    run_coefficients(model, inputs, lambda s: [*hooks_for(s), (SITE, spy)], COEFFS, shared_prefix=True)
    assert seen == [(1, (len(COEFFS) * inputs.batch_size, 1, model.d_model))]


def test_shared_prefix_rejects_what_it_cannot_share():
    model = tiny_vlm("llava", seed=0, n_layers=2)
    enc = model.encode(images=[None], prompts=["who is this"])
    one = dataclasses.replace(enc, input_ids=enc.input_ids[:, -1:], attention_mask=enc.attention_mask[:, -1:],
                              image_mask=enc.image_mask[:, -1:], text_mask=enc.text_mask[:, -1:],
                              last_index=torch.zeros_like(enc.last_index))
    with pytest.raises(ValueError, match="at least 2 positions"):
        run_coefficients(model, one, _hooks_for(model), COEFFS, shared_prefix=True)
    image_last = dataclasses.replace(enc, image_mask=torch.ones_like(enc.image_mask))
    with pytest.raises(ValueError, match="last prompt position is an image token"):
        run_coefficients(model, image_last, _hooks_for(model), COEFFS, shared_prefix=True)
    with pytest.raises(ValueError, match="at least one coefficient"):
        run_coefficients(model, enc, _hooks_for(model), [], shared_prefix=True)
    for shared in (False, True):  # a NaN coefficient would give its rows NaN logits
        with pytest.raises(ValueError, match=r"run_coefficients needs finite coefficients, got \[nan\]"):
            run_coefficients(model, enc, _hooks_for(model), [1.0, float("nan")], shared_prefix=shared)
    with pytest.raises(ValueError, match=r"generate_coefficients needs finite coefficients, got \[inf\]"):
        generate_coefficients(model, enc, _hooks_for(model), [float("inf")], max_new_tokens=1)
    for backend in ("torch", "nnsight"):  # attached hooks would act on the full pass but not on the prefix
        with model.hooks([(SITE, add_vector(_vec(model)))], backend=backend):
            with pytest.raises(ValueError, match="cannot honour hooks attached"):
                run_coefficients(model, enc, _hooks_for(model), COEFFS, shared_prefix=True)
    run_coefficients(model, enc, _hooks_for(model), COEFFS, shared_prefix=True)  # detached again: runs


def test_generated_text_equals_looped(model, inputs):
    hooks_for = _hooks_for(model, "last")
    coeffs = [-3.0, 0.0, 3.0]
    batched = generate_coefficients(model, inputs, hooks_for, coeffs, max_new_tokens=5, eos_token_id=None)
    looped = [model.generate(inputs, max_new_tokens=5, hooks=hooks_for(torch.full((inputs.batch_size,), c)),
                             eos_token_id=None).texts for c in coeffs]
    assert batched == looped
    assert len(batched) == 3 and all(len(row) == inputs.batch_size for row in batched)
    assert batched[0] != batched[2]


def test_per_head_vectors_at_z_equal_their_image_through_o_proj(tiny_llava):
    """Adding ``v_h`` to head h's output at ``attn.hook_z`` is adding ``W_O[:, h] v_h`` to ``hook_attn_out``."""
    from interp.adapters import get_module

    inputs = tiny_llava.encode(images=[random_image(32, 0), None], prompts=["who is he", "what is the city"])
    n_heads, d_head = tiny_llava.head_counts["lm"][0], tiny_llava.d_model // tiny_llava.head_counts["lm"][0]
    v = torch.zeros(n_heads, d_head)
    v[2] = torch.randn(d_head, generator=torch.Generator().manual_seed(0))
    w_o = get_module(tiny_llava.hf_model, "model.language_model.layers.1.self_attn.o_proj").weight
    out_v = (w_o[:, 2 * d_head:3 * d_head] @ v[2]).detach()
    got = tiny_llava.run_with_hooks(inputs, [("blocks.1.attn.hook_z", add_vector(v, scale=3.0, positions="last"))])
    want = tiny_llava.run_with_hooks(inputs, [("blocks.1.hook_attn_out", add_vector(out_v, scale=3.0, positions="last"))])
    plain = tiny_llava.run_with_hooks(inputs, [])
    real = inputs.attention_mask.bool()
    assert (got - want)[real].abs().max().item() < 1e-4
    assert (got - plain)[real].abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="last 2 dim"):
        tiny_llava.run_with_hooks(inputs, [("blocks.1.attn.hook_z", add_vector(torch.zeros(3, d_head)))])
    with pytest.raises(ValueError, match="1-D vector"):
        add_vector(torch.zeros(2, 3, 4))
