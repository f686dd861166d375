"""interp.attribution: heads sum to the attention output; every component's share sums to the logit difference."""
from __future__ import annotations

import pytest
import torch

from interp.attribution import attribution_names, head_outputs, logit_attribution
from tests.conftest import random_image


@pytest.fixture
def run(tiny_model):
    size = 32 if tiny_model.arch == "llava" else 64
    inputs = tiny_model.encode(images=[random_image(size, 1), None],
                               prompts=["what is the name of the person in this image ?", "who is he"])
    logits, cache = tiny_model.run_with_cache(inputs, names=attribution_names(tiny_model) + ["blocks.1.hook_attn_out"])
    return inputs, logits, cache


def test_heads_sum_to_the_attention_output(tiny_model, run):
    inputs, _, cache = run
    heads = head_outputs(tiny_model, cache["blocks.1.attn.hook_z"], 1)
    assert heads.shape[-2:] == (tiny_model.head_counts["lm"][0], tiny_model.d_model)
    real = inputs.attention_mask.bool()
    assert (heads.sum(-2) - cache["blocks.1.hook_attn_out"])[real].abs().max().item() < 1e-5
    assert heads[real].norm(dim=-1).min().item() > 0  # every head writes something


def test_contributions_sum_to_the_logit_difference_per_row(tiny_model, run):
    inputs, logits, cache = run
    last = logits[torch.arange(2), inputs.last_index]
    good, bad = [5, 9], [7, 3]
    att = logit_attribution(tiny_model, cache, good=good, bad=bad)
    n, h = tiny_model.n_layers, tiny_model.head_counts["lm"][0]
    assert att.values.shape == (1 + n * (h + 1) + 1, 2) and att.labels[-1] == "other"
    assert att.values[-1].abs().max().item() < 1e-4  # no hooks: the components are the whole residual
    assert att.labels[0] == "embed" and att.labels[1:h + 2] == [f"L0H{i}" for i in range(h)] + ["L0.mlp"]
    want = last[[0, 1], good] - last[[0, 1], bad]
    torch.testing.assert_close(att.values.sum(0), want.float(), atol=1e-4, rtol=1e-4)
    one = logit_attribution(tiny_model, cache, good=5)  # a single logit: also exact
    torch.testing.assert_close(one.values.sum(0), last[:, 5].float(), atol=1e-4, rtol=1e-4)
    assert att.by_head().shape == (n, h)
    top = att.top(3)
    mean = att.values.mean(1)
    assert abs(top[0][1]) == pytest.approx(mean.abs().max().item()) and len(top) == 3
    assert att.values.abs().max().item() > 1e-3  # not vacuous


def test_errors(tiny_llava):
    inputs = tiny_llava.encode(images=[None], prompts=["who"])
    _, cache = tiny_llava.run_with_cache(inputs, names=["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="attribution_names"):
        logit_attribution(tiny_llava, cache, good=1)
    _, full = tiny_llava.run_with_cache(inputs, names=attribution_names(tiny_llava))
    with pytest.raises(ValueError, match="one per row"):
        logit_attribution(tiny_llava, full, good=[1, 2])


def test_a_steering_hooks_own_share_is_other(tiny_llava):
    """A vector added at block 1's input is written by no head or MLP: its direct share is exactly ``other``."""
    from interp.steering import add_vector

    inputs = tiny_llava.encode(images=[None, None], prompts=["who is he", "what is the name"])
    v = torch.randn(tiny_llava.d_model, generator=torch.Generator().manual_seed(1)) * 3
    hooks = [("blocks.1.hook_resid_pre", add_vector(v, positions="last"))]
    logits, cache = tiny_llava.run_with_cache(inputs, names=attribution_names(tiny_llava), hooks=hooks)
    att = logit_attribution(tiny_llava, cache, good=4, bad=6)
    last = logits[torch.arange(2), inputs.last_index]
    torch.testing.assert_close(att.values.sum(0), (last[:, 4] - last[:, 6]).float(), atol=1e-4, rtol=1e-4)
    # other = v read through the final norm's scale and the unembedding direction
    from interp.adapters import get_module

    norm = get_module(tiny_llava.hf_model, "model.language_model.norm")
    w_u = get_module(tiny_llava.hf_model, "lm_head").weight
    x = cache.last(f"blocks.{tiny_llava.n_layers - 1}.hook_resid_post")
    inv_rms = torch.rsqrt(x.pow(2).mean(-1) + norm.variance_epsilon)
    want = ((v * norm.weight) @ (w_u[4] - w_u[6])) * inv_rms
    torch.testing.assert_close(att.values[-1], want.detach().float(), atol=1e-4, rtol=1e-4)
    assert att.values[-1].abs().min().item() > 1e-3


def test_attribution_round_trips_through_json(tiny_llava, tmp_path):
    from interp.attribution import Attribution

    inputs = tiny_llava.encode(images=[None, None], prompts=["who is he", "who"])
    _, cache = tiny_llava.run_with_cache(inputs, names=attribution_names(tiny_llava))
    att = logit_attribution(tiny_llava, cache, good=5, bad=9)
    att.save(tmp_path / "att.json")
    back = Attribution.load(tmp_path / "att.json")
    assert back.labels == att.labels and (back.n_layers, back.n_heads) == (att.n_layers, att.n_heads)
    assert torch.equal(back.values, att.values)  # float32 -> JSON -> float32 is exact
    assert back.top(3) == att.top(3)
    from interp.patching import PatchResult

    PatchResult(names=[], patched={}, clean=1.0, corrupted=0.0).save(tmp_path / "patch.json")
    with pytest.raises(ValueError, match=r"patch.json is not a saved Attribution .*not 'interp.Attribution'"):
        Attribution.load(tmp_path / "patch.json")

