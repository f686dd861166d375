"""interp.readout: exact direct attribution of linear readouts (probes, gates) of the residual stream."""
from __future__ import annotations

import pytest
import torch

from interp.collect import query_activations
from interp.readout import prompt_read, readout_attribution, readout_names
from tests.conftest import random_image

PROMPTS = ["what is the name of the person in this image ?", "who is he"]


def _inputs(model):
    size = 32 if model.arch == "llava" else 64
    return [random_image(size, 1), None], PROMPTS


@pytest.mark.parametrize("read", ["last", "mean"])
def test_components_add_up_to_the_readout_the_collector_reads(tiny_model, read):
    images, prompts = _inputs(tiny_model)
    gen = torch.Generator().manual_seed(0)
    d = tiny_model.d_model
    readout = {"blocks.1.hook_resid_pre": torch.randn(d, generator=gen),
               "blocks.2.hook_resid_mid": torch.randn(2, d, generator=gen)}  # one weight vector per row
    inputs = tiny_model.encode(images=images, prompts=prompts)
    _, cache = tiny_model.run_with_cache(inputs, names=readout_names(tiny_model, readout))
    att = readout_attribution(tiny_model, cache, readout, read=read)
    reads = query_activations(tiny_model, images, prompts, list(readout), read=read)
    expected = sum((reads[s] * w).sum(-1) for s, w in readout.items())
    assert torch.allclose(att.values.sum(0), expected, atol=1e-4)
    assert att.values[-1].abs().max() < 1e-4  # unhooked: nothing but rounding is "other"
    # resid_mid of block 2 is written by block 2's heads but not its MLP
    assert "L2H0" in att.labels and "L2.mlp" not in att.labels and "L1.mlp" in att.labels
    assert att.n_layers == 3 and att.by_head().shape == (3, tiny_model.head_counts["lm"][0])
    # the text-only row has no image component; at the last (text) token no row has one
    image = att.values[att.labels.index("image")]
    assert image[1] == 0.0 and (image[0] != 0.0) == (read == "mean")


def test_one_component_is_its_own_readout(tiny_llava):
    """The share of block 0's MLP is the readout of block 0's MLP output alone."""
    images, prompts = _inputs(tiny_llava)
    inputs = tiny_llava.encode(images=images, prompts=prompts)
    w = torch.randn(tiny_llava.d_model, generator=torch.Generator().manual_seed(1))
    readout = {"blocks.2.hook_resid_pre": w}
    _, cache = tiny_llava.run_with_cache(inputs, names=readout_names(tiny_llava, readout))
    att = readout_attribution(tiny_llava, cache, readout, read="mean")
    direct = prompt_read(cache["blocks.0.hook_mlp_out"].float(), cache, "mean") @ w
    assert torch.allclose(att.values[att.labels.index("L0.mlp")], direct, atol=1e-5)


def test_a_steering_hook_is_other(tiny_llava):
    images, prompts = _inputs(tiny_llava)
    inputs = tiny_llava.encode(images=images, prompts=prompts)
    v = torch.zeros(tiny_llava.d_model)
    v[0] = 3.0
    readout = {"blocks.2.hook_resid_pre": torch.eye(tiny_llava.d_model)[0]}
    hooks = [("blocks.1.hook_resid_pre", lambda x, ctx: x + v)]
    _, cache = tiny_llava.run_with_cache(inputs, names=readout_names(tiny_llava, readout), hooks=hooks)
    att = readout_attribution(tiny_llava, cache, readout, read="last")
    assert torch.allclose(att.values[-1], torch.full((2,), 3.0), atol=1e-4)


def test_bad_readouts_are_named(tiny_llava):
    inputs = tiny_llava.encode(images=[None], prompts=["who"])
    _, cache = tiny_llava.run_with_cache(inputs, names=["hook_embed", "blocks.0.hook_resid_pre"])
    d = tiny_llava.d_model
    with pytest.raises(ValueError, match="readout site"):
        readout_attribution(tiny_llava, cache, {"blocks.0.hook_attn_out": torch.ones(d)})
    with pytest.raises(ValueError, match="readout site"):
        readout_attribution(tiny_llava, cache, {"blocks.9.hook_resid_pre": torch.ones(d)})
    with pytest.raises(ValueError, match="empty readout"):
        readout_attribution(tiny_llava, cache, {})
    with pytest.raises(ValueError, match="read must be"):
        readout_attribution(tiny_llava, cache, {"blocks.0.hook_resid_pre": torch.ones(d)}, read="first")
    with pytest.raises(ValueError, match=r"\[d_model\]"):
        readout_attribution(tiny_llava, cache, {"blocks.0.hook_resid_pre": torch.ones(d + 1)})
    with pytest.raises(ValueError, match="lacks"):
        readout_attribution(tiny_llava, cache, {"blocks.2.hook_resid_pre": torch.ones(d)})
