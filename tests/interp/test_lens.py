"""interp.lens: accumulated / decomposed residuals, the frozen final norm, the logit lens, on both architectures."""
from __future__ import annotations

import pytest
import torch

from interp import HookedVLM
from interp.attribution import attribution_names, logit_attribution
from interp.lens import (accumulated_resid, apply_ln_to_stack, decompose_names, decompose_resid, final_norm_scale,
                         lens_names, logit_lens, unembed)
from tests.conftest import random_image


@pytest.fixture
def lens_run(tiny_model, two_prompts):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=[images[0], None], prompts=prompts)  # image + text-only, left-padded
    names = lens_names(tiny_model, incl_mid=True) + decompose_names(tiny_model) + attribution_names(tiny_model)
    logits, cache = tiny_model.run_with_cache(inputs, names=names)
    return tiny_model, inputs, logits, cache


def test_logit_lens_ends_at_the_models_logits(lens_run):
    model, inputs, logits, cache = lens_run
    n = model.n_layers
    lens, labels = logit_lens(model, cache, return_labels=True)
    assert labels == [f"{l}_pre" for l in range(n)] + ["final_post"]
    rows = torch.arange(2)
    last = logits[rows, inputs.last_index].float()
    assert lens.shape == (n + 1, 2, logits.shape[-1])
    assert torch.allclose(lens[-1], last, atol=1e-5)
    # every layer is the norm of its own residual, unembedded: layer 1 by hand
    norm = model.module_for("ln_final.hook_normalized")
    by_hand = model.hf_model.lm_head(norm(cache.last("blocks.1.hook_resid_pre")))
    assert torch.allclose(lens[1], by_hand.float(), atol=1e-5)
    # pos="all" holds the last-token values at each row's last index, and the logits everywhere real
    full = logit_lens(model, cache, pos="all")
    assert full.shape == (n + 1,) + tuple(logits.shape)
    assert torch.allclose(full[:, rows, inputs.last_index], lens, atol=1e-5)
    real = inputs.attention_mask.bool()
    assert torch.allclose(full[-1][real], logits[real].float(), atol=1e-5)


def test_accumulated_resid_layers_follow_transformerlens(lens_run):
    model, _, _, cache = lens_run
    stack, labels = accumulated_resid(model, cache, layer=1, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre"]
    assert torch.equal(stack[1], cache.last("blocks.0.hook_resid_mid"))
    assert accumulated_resid(model, cache, layer=0, return_labels=True)[1] == ["0_pre"]
    _, labels = accumulated_resid(model, cache, layer=model.n_layers, incl_mid=True, return_labels=True)
    assert labels[-3:] == [f"{model.n_layers - 1}_pre", f"{model.n_layers - 1}_mid", "final_post"]
    for bad in (-1, model.n_layers + 1, 1.5, True):
        with pytest.raises(ValueError, match="layer must be an int"):
            accumulated_resid(model, cache, layer=bad)
    with pytest.raises(ValueError, match="pos must be one of"):
        accumulated_resid(model, cache, pos="image")


def test_decompose_resid_sums_to_each_residual(lens_run):
    model, _, _, cache = lens_run
    n = model.n_layers
    parts, labels = decompose_resid(model, cache, return_labels=True)
    assert labels == ["embed"] + [f"{l}_{k}_out" for l in range(n) for k in ("attn", "mlp")]
    final = cache.last(f"blocks.{n - 1}.hook_resid_post")
    assert torch.allclose(parts.sum(0), final, atol=1e-5 * float(final.abs().max()))
    parts1 = decompose_resid(model, cache, layer=1, pos="all")
    assert parts1.shape[0] == 3
    assert torch.allclose(parts1.sum(0), cache["blocks.1.hook_resid_pre"], atol=1e-5)


def test_apply_ln_to_stack_is_the_linear_attribution(lens_run):
    """Frozen-scale normalised components add up to ln_final's output, and their unembedded logit difference is
    the per-layer sum of logit_attribution's heads and MLP."""
    model, inputs, logits, cache = lens_run
    parts = decompose_resid(model, cache)
    normed = apply_ln_to_stack(model, cache, parts)
    norm = model.module_for("ln_final.hook_normalized")
    final = cache.last(f"blocks.{model.n_layers - 1}.hook_resid_post")
    assert torch.allclose(normed.sum(0), norm(final).float(), atol=1e-4)
    w_u = model.hf_model.lm_head.weight.float()
    diff = normed @ (w_u[5] - w_u[9])  # [component, batch]
    att = logit_attribution(model, cache, good=5, bad=9)
    n_heads = model.head_counts["lm"][0]
    attn_l0 = att.values[[att.labels.index(f"L0H{h}") for h in range(n_heads)]].sum(0)
    assert torch.allclose(diff[1], attn_l0, atol=1e-4)
    assert torch.allclose(diff[2], att.values[att.labels.index("L0.mlp")], atol=1e-4)
    rows = torch.arange(2)
    last = logits[rows, inputs.last_index].float()
    assert torch.allclose(diff.sum(0), last[:, 5] - last[:, 9], atol=1e-4)
    # the stack must match the positions of the scale
    with pytest.raises(ValueError, match="same pos"):
        apply_ln_to_stack(model, cache, decompose_resid(model, cache, pos="all"))


def test_final_norm_scale_and_unembed(tiny_llava):
    x = torch.randn(3, tiny_llava.d_model)
    norm = tiny_llava.module_for("ln_final.hook_normalized")
    scale = final_norm_scale(tiny_llava, x)
    assert torch.allclose(scale, (x.pow(2).mean(-1) + norm.variance_epsilon).rsqrt(), atol=1e-6)
    assert torch.allclose(unembed(tiny_llava, x), x @ tiny_llava.hf_model.lm_head.weight.T, atol=1e-5)


def test_missing_names_say_what_to_cache(tiny_llava):
    inputs = tiny_llava.encode(images=[random_image(32, 0)], prompts=["who is this"])
    _, cache = tiny_llava.run_with_cache(inputs, names="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match=r"lacks 'blocks.1.hook_resid_pre'.*lens_names\(model\)"):
        logit_lens(tiny_llava, cache)
    with pytest.raises(ValueError, match=r"lacks 'hook_embed'.*decompose_names"):
        decompose_resid(tiny_llava, cache)


def test_positions_per_row_other_and_no_grad(lens_run):
    model, inputs, logits, cache = lens_run
    rows = torch.arange(2)
    at = inputs.last_index - 1  # one token before each row's last
    lens = logit_lens(model, cache, pos=at)
    assert torch.allclose(lens[-1], logits[rows, at].float(), atol=1e-5)
    with pytest.raises(ValueError, match=r"one position in \[0, \d+\) per row"):
        logit_lens(model, cache, pos=torch.tensor([0]))
    parts = decompose_resid(model, cache, pos=at)
    normed = apply_ln_to_stack(model, cache, parts, pos=at)
    assert not normed.requires_grad and not final_norm_scale(model, parts[0]).requires_grad
    normed.numpy()  # usable as is
    # W_U is TransformerLens's [d_model, vocab]
    assert model.W_U.shape == (model.d_model, logits.shape[-1])
    assert torch.allclose(normed.sum(0) @ model.W_U, logits[rows, at].float(), atol=1e-4)
    # unhooked, "other" is float rounding; steered, it is exactly what the hook added
    parts, labels = decompose_resid(model, cache, return_labels=True, incl_other=True)
    assert labels[-1] == "other" and float(parts[-1].abs().max()) < 1e-4
    v = torch.randn(model.d_model)
    steer = [("blocks.1.hook_resid_pre", lambda x, c: x + v)]
    _, steered = model.run_with_cache(inputs, names=decompose_names(model) + ["blocks.1.hook_resid_pre"], hooks=steer)
    parts = decompose_resid(model, steered, incl_other=True)
    assert torch.allclose(parts[-1], v.expand(2, -1), atol=1e-4)
    assert torch.allclose(parts.sum(0), steered.last(f"blocks.{model.n_layers - 1}.hook_resid_post"), atol=1e-4)
    layer1 = decompose_resid(model, steered, layer=1, incl_other=True)
    assert torch.allclose(layer1[-1], v.expand(2, -1), atol=1e-4)  # the hook wrote resid_pre of block 1 itself


def test_incl_mid_error_names_the_call_that_caches_it(tiny_llava):
    inputs = tiny_llava.encode(images=[None], prompts=["who is this"])
    _, cache = tiny_llava.run_with_cache(inputs, names=lens_names(tiny_llava))
    with pytest.raises(ValueError, match=r"lacks 'blocks.0.hook_resid_mid'.*lens_names\(model, incl_mid=True\)"):
        accumulated_resid(tiny_llava, cache, incl_mid=True)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_attribute_too(tiny_model, two_prompts, dtype):
    """A 7B model is loaded in bf16/fp16: the frozen-norm scale and the attribution work there (they raised
    "not an RMSNorm" before, the check's tolerance being below half-precision rounding) and agree with the
    float32 model's to half precision."""
    import copy

    images, prompts = two_prompts
    half = HookedVLM.from_hf(copy.deepcopy(tiny_model.hf_model).to(dtype), tokenizer=tiny_model.tokenizer,
                             image_processor=tiny_model.image_processor)
    inputs = tiny_model.encode(images=[images[0], None], prompts=prompts)
    x = torch.randn(3, tiny_model.d_model)
    assert torch.allclose(final_norm_scale(half, x.to(dtype)), final_norm_scale(tiny_model, x.to(dtype).float()),
                          rtol=1e-3)
    atts = []
    for m in (tiny_model, half):
        _, cache = m.run_with_cache(inputs, names=attribution_names(m) + decompose_names(m))
        atts.append(logit_attribution(m, cache, good=5, bad=9))
    full, low = atts
    assert low.labels == full.labels
    scale = float(full.values.abs().max())
    assert float((low.values.float() - full.values.float()).abs().max()) < 0.05 * scale
    normed = apply_ln_to_stack(half, cache, decompose_resid(half, cache))
    assert normed.dtype == torch.float32 and torch.isfinite(normed).all()
