"""interp.ablation: zero and per-modality mean ablation of sites and heads, checked against hand-made runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.ablation import (AblationResult, ModalityMeans, ablate_heads, ablate_sites, ablation_hook,
                             modality_means)
from interp.adapters import get_module
from interp.lens import unembed
from interp.patching import answer_logprob, logit_diff
from tests.conftest import random_image

PROMPTS = ["what is the name of the person in this image ?", "who is he"]


def _inputs(model, seeds=(1, 2)):
    size = 32 if model.arch == "llava" else 64
    return model.encode(images=[random_image(size, seeds[0]), None], prompts=PROMPTS)


def test_means_are_the_masked_means(tiny_model):
    a, b = _inputs(tiny_model), _inputs(tiny_model, (3, 4))
    names = ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"]
    means = modality_means(tiny_model, [a, b], names)
    with torch.no_grad():
        xs = [tiny_model.run_with_cache(x, names=names)[1] for x in (a, b)]
    for n in names:
        img = torch.cat([c[n][x.image_mask] for c, x in zip(xs, (a, b))]).double().mean(0).float()
        txt = torch.cat([c[n][x.text_mask] for c, x in zip(xs, (a, b))]).double().mean(0).float()
        assert torch.allclose(means.get(n, "image"), img, atol=1e-5)
        assert torch.allclose(means.get(n, "text"), txt, atol=1e-5)
        assert means.counts[n]["image"] == int(a.image_mask.sum() + b.image_mask.sum())
    assert means.get("blocks.0.attn.hook_z", "image").shape == xs[0]["blocks.0.attn.hook_z"].shape[2:]


def test_mean_ablating_the_last_mlp_is_its_direct_path(tiny_model):
    """Replacing the last block's MLP output by its means changes the logits exactly as the final residual with
    that output swapped, through the final norm and the unembedding."""
    inputs = _inputs(tiny_model)
    n = tiny_model.n_layers
    name = f"blocks.{n - 1}.hook_mlp_out"
    means = modality_means(tiny_model, [inputs], [name])
    metric = answer_logprob(5)
    res = ablate_sites(tiny_model, inputs, [name], metric, means)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(inputs, names=[name, f"blocks.{n - 1}.hook_resid_post"])
    img = inputs.image_mask.unsqueeze(-1)
    mean = torch.where(img, means.get(name, "image"), means.get(name, "text"))
    final = cache[f"blocks.{n - 1}.hook_resid_post"] - cache[name] + mean
    norm = get_module(tiny_model.hf_model, tiny_model.adapter.final_norm)
    with torch.no_grad():
        logits = unembed(tiny_model, norm(final))
    assert np.allclose(res.rows[name], metric(logits, inputs).tolist(), atol=1e-4)
    assert res.meta == {"how": "mean", "positions": "all"}
    assert abs(res.effects[name]) > 1e-3


def test_all_heads_zeroed_is_the_attention_output_zeroed(tiny_llava):
    inputs = _inputs(tiny_llava)
    metric = logit_diff(5, 7)
    n_heads = tiny_llava.head_counts["lm"][0]
    hook = ablation_hook(tiny_llava, "blocks.1.attn.hook_z", "zero", heads=list(range(n_heads)))
    with torch.no_grad():
        by_heads = tiny_llava.run_with_hooks(inputs, [("blocks.1.attn.hook_z", hook)])
    site = ablate_sites(tiny_llava, inputs, ["blocks.1.hook_attn_out"], metric, how="zero")
    assert np.allclose(metric(by_heads, inputs).tolist(), site.rows["blocks.1.hook_attn_out"], atol=1e-5)


def test_one_head_is_the_site_restricted_to_it(tiny_llava):
    inputs = _inputs(tiny_llava)
    means = modality_means(tiny_llava, [inputs], ["blocks.0.attn.hook_z"])
    metric = answer_logprob(3)
    res = ablate_heads(tiny_llava, inputs, metric, means, layers=[0])
    hook = ablation_hook(tiny_llava, "blocks.0.attn.hook_z", "mean", means, heads=[2])
    with torch.no_grad():
        _, cache = tiny_llava.run_with_cache(inputs, names=["blocks.0.attn.hook_z"],
                                             hooks=[("blocks.0.attn.hook_z", hook)])
        _, plain = tiny_llava.run_with_cache(inputs, names=["blocks.0.attn.hook_z"])
    z, z0 = cache["blocks.0.attn.hook_z"], plain["blocks.0.attn.hook_z"]
    assert torch.equal(z[:, :, [0, 1, 3]], z0[:, :, [0, 1, 3]])  # the other heads untouched
    assert torch.allclose(z[0][inputs.image_mask[0], 2], means.get("blocks.0.attn.hook_z", "image")[2].expand(
        int(inputs.image_mask[0].sum()), -1))
    grid = res.grid()
    assert grid.rows == [0] and grid.cols == list(range(tiny_llava.head_counts["lm"][0]))
    assert grid.values[0, 2] == pytest.approx(res.effects["L0H2"])
    assert res.top(1)[0][0] in res.names


def test_positions_restrict_the_ablation(tiny_llava):
    inputs = _inputs(tiny_llava)
    hook = ablation_hook(tiny_llava, "hook_embed", "zero", positions="image")
    with torch.no_grad():
        _, cache = tiny_llava.run_with_cache(inputs, names=["hook_embed"], hooks=[("hook_embed", hook)])
        _, plain = tiny_llava.run_with_cache(inputs, names=["hook_embed"])
    x, x0 = cache["hook_embed"], plain["hook_embed"]
    assert float(x[inputs.image_mask].abs().max()) == 0.0
    assert torch.equal(x[~inputs.image_mask], x0[~inputs.image_mask])


def test_text_ablation_reaches_generated_tokens(tiny_llava):
    inputs = _inputs(tiny_llava)
    means = modality_means(tiny_llava, [inputs], ["blocks.1.hook_resid_pre"])
    hook = ablation_hook(tiny_llava, "blocks.1.hook_resid_pre", "mean", means)
    out, cache = tiny_llava.generate_with_cache(inputs, "blocks.1.hook_resid_pre", max_new_tokens=3,
                                                hooks=[("blocks.1.hook_resid_pre", hook)], every_step=True)
    answer = cache.answer("blocks.1.hook_resid_pre")[0]
    assert torch.allclose(answer, means.get("blocks.1.hook_resid_pre", "text").expand_as(answer), atol=1e-6)


def test_results_and_means_round_trip(tiny_llava, tmp_path):
    inputs = _inputs(tiny_llava)
    means = modality_means(tiny_llava, [inputs], ["blocks.0.hook_mlp_out"])
    means.save(tmp_path / "means.safetensors")
    back = ModalityMeans.load(tmp_path / "means.safetensors")
    assert torch.equal(back.get("blocks.0.hook_mlp_out", "image"), means.get("blocks.0.hook_mlp_out", "image"))
    assert back.counts == means.counts
    res = ablate_sites(tiny_llava, inputs, ["blocks.0.hook_mlp_out"], answer_logprob(3), means)
    res.save(tmp_path / "res.json")
    again = AblationResult.load(tmp_path / "res.json")
    assert again.effects == pytest.approx(res.effects) and again.rows == res.rows
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="safetensors"):
        ModalityMeans.load(tmp_path / "bad.safetensors")


def test_bad_requests_are_named(tiny_llava):
    inputs = _inputs(tiny_llava)
    metric = answer_logprob(3)
    means = modality_means(tiny_llava, [inputs], ["blocks.0.hook_mlp_out"])
    with pytest.raises(ValueError, match="how must be"):
        ablate_sites(tiny_llava, inputs, ["blocks.0.hook_mlp_out"], metric, means, how="resample")
    with pytest.raises(ValueError, match="needs means"):
        ablate_sites(tiny_llava, inputs, ["blocks.0.hook_mlp_out"], metric)
    with pytest.raises(ValueError, match="no mean for"):
        ablate_sites(tiny_llava, inputs, ["blocks.1.hook_mlp_out"], metric, means)
    with pytest.raises(ValueError, match="vision-side"):
        ablate_sites(tiny_llava, inputs, ["vision.blocks.0.hook_resid_post"], metric, how="zero")
    with pytest.raises(ValueError, match="not a per-head site"):
        ablation_hook(tiny_llava, "blocks.0.hook_mlp_out", "zero", heads=[0])
    with pytest.raises(ValueError, match="distinct indices"):
        ablation_hook(tiny_llava, "blocks.0.attn.hook_z", "zero", heads=[9])
    with pytest.raises(ValueError, match="empty set"):
        modality_means(tiny_llava, [], ["blocks.0.hook_mlp_out"])
    with pytest.raises(ValueError, match="positions must be"):
        ablate_sites(tiny_llava, inputs, ["blocks.0.hook_mlp_out"], metric, means, positions="middle")


def test_key_value_heads_ablated_one_at_a_time(tiny_qwen):
    """``component="v"`` on Qwen2.5-VL: 2 key/value heads per layer (4 query heads share them), each cell the
    value slice replaced by its mean, by hand."""
    inputs = _inputs(tiny_qwen)
    name = "blocks.1.attn.hook_v"
    means = modality_means(tiny_qwen, [inputs], [name])
    metric = answer_logprob(3)
    res = ablate_heads(tiny_qwen, inputs, metric, means, layers=[1], component="v")
    assert res.names == ["L1H0", "L1H1"]
    with torch.no_grad():
        _, cache = tiny_qwen.run_with_cache(inputs, names=[name])

    def by_hand(v, ctx):
        v = v.clone()
        img = ctx.image_mask.to(v.device)
        v[:, :, 1] = torch.where(img.unsqueeze(-1), means.get(name, "image")[1], means.get(name, "text")[1])
        return v

    with torch.no_grad():
        want = metric(tiny_qwen.run_with_hooks(inputs, [(name, by_hand)]), inputs).tolist()
    assert np.allclose(res.rows["L1H1"], want, atol=1e-5)
    with pytest.raises(ValueError, match="component must be"):
        ablate_heads(tiny_qwen, inputs, metric, means, component="o")
