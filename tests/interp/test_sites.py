"""interp.sites: the sites inside attention and MLP hold what their names say, per head, on both architectures.

Each finer site is checked against the module that reads it (``o_proj(z) == hook_attn_out``,
``down_proj(mlp.hook_post) == hook_mlp_out``, ``z == pattern @ v``, ...), so a wrong module path,
head split or execution order fails here with a number, not only a shape.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interp.adapters import get_module
from interp.names import HookNameError
from tests.conftest import random_image

TOL = 1e-5


def _size(model) -> int:
    return 32 if model.arch == "llava" else 64


@pytest.fixture
def padded(tiny_model):
    size = _size(tiny_model)
    return tiny_model.encode(images=[random_image(size, 1), None],
                             prompts=["what is the name of the person in this image ?", "who is he"])


def _block(model, layer: int, vision: bool = False):
    return get_module(model.hf_model, f"{model.adapter.vision_layers if vision else model.adapter.lm_layers}.{layer}")


def _close(a, b, real=None) -> float:
    d = (a - b).abs()
    if real is not None:
        d = d[real]
    return d.max().item()


def test_language_model_sites_hold_what_their_modules_compute(tiny_model, padded):
    model, l = tiny_model, 1
    logits, cache = model.run_with_cache(padded, names=f"blocks.{l}.*")
    blk, real = _block(model, l), padded.attention_mask.bool()
    n_q, n_kv = model.head_counts["lm"]
    c = {n.split(f"blocks.{l}.")[1]: cache[n] for n in cache.names}
    with torch.no_grad():
        assert _close(c["ln1.hook_normalized"], blk.input_layernorm(c["hook_resid_pre"]), real) < TOL
        for s, proj, n in (("q", blk.self_attn.q_proj, n_q), ("k", blk.self_attn.k_proj, n_kv),
                           ("v", blk.self_attn.v_proj, n_kv)):
            assert c[f"attn.hook_{s}"].shape == (*real.shape, n, model.d_model // n_q)
            assert _close(c[f"attn.hook_{s}"].flatten(-2), proj(c["ln1.hook_normalized"]), real) < TOL
        assert _close(blk.self_attn.o_proj(c["attn.hook_z"].flatten(-2)), c["hook_attn_out"], real) < TOL
        assert _close(c["ln2.hook_normalized"], blk.post_attention_layernorm(c["hook_resid_mid"]), real) < TOL
        assert _close(c["mlp.hook_pre"], blk.mlp.gate_proj(c["ln2.hook_normalized"]), real) < TOL
        assert _close(c["mlp.hook_pre_linear"], blk.mlp.up_proj(c["ln2.hook_normalized"]), real) < TOL
        assert _close(c["mlp.hook_post"], F.silu(c["mlp.hook_pre"]) * c["mlp.hook_pre_linear"], real) < TOL
        assert _close(blk.mlp.down_proj(c["mlp.hook_post"]), c["hook_mlp_out"], real) < TOL

    # the pattern: [batch, head, query, key], causal, rows of real queries sum to 1 over real keys only
    p = c["attn.hook_pattern"]
    assert p.shape == (real.shape[0], n_q, real.shape[1], real.shape[1])
    pos = real.shape[1]
    q_real = real[:, None, :, None].expand_as(p)
    assert p.triu(1)[q_real].abs().max().item() == 0.0  # (a padding query's row is meaningless: skipped)
    k_pad = (~real)[:, None, None, :].expand_as(p)
    assert _close(p.sum(-1), torch.ones_like(p.sum(-1)), real[:, None, :].expand(-1, n_q, -1)) < TOL
    assert p[q_real & k_pad].abs().max().item() == 0.0
    # and it is what the heads mix: z = pattern @ v (v is not rotated; key/value heads shared by n_q / n_kv)
    v = c["attn.hook_v"].repeat_interleave(n_q // n_kv, dim=2)  # [b, k, head, d]
    z = torch.einsum("bhqk,bkhd->bqhd", p, v)
    assert _close(z, c["attn.hook_z"], real) < TOL
    assert p[0, 0, pos - 1, :].max().item() < 1.0  # not vacuous: the last token spreads its attention
    assert model.hf_model.config.get_text_config()._attn_implementation == "sdpa"  # put back after the call


def test_vision_tower_sites(tiny_model, padded):
    model = tiny_model
    _, cache = model.run_with_cache(padded, names="vision.blocks.0.*")
    blk = _block(model, 0, vision=True)
    c = {n.split("vision.blocks.0.")[1]: cache[n] for n in cache.names}
    with torch.no_grad():
        if model.arch == "llava":  # CLIP: LayerNorm, q/k/v/out_proj, fc1 -> quick_gelu -> fc2
            assert _close(c["ln1.hook_normalized"], blk.layer_norm1(c["hook_resid_pre"])) < TOL
            assert _close(c["attn.hook_q"].flatten(-2), blk.self_attn.q_proj(c["ln1.hook_normalized"])) < TOL
            assert _close(blk.self_attn.out_proj(c["attn.hook_z"].flatten(-2)), c["hook_attn_out"]) < TOL
            p = c["attn.hook_pattern"]  # no causal mask in a ViT: every patch sees every patch
            assert _close(p.sum(-1), torch.ones_like(p.sum(-1))) < TOL and p.triu(1).abs().max() > 0
            assert _close(torch.einsum("bhqk,bkhd->bqhd", p, c["attn.hook_v"]), c["attn.hook_z"]) < TOL
            assert _close(blk.mlp.fc1(c["ln2.hook_normalized"]), c["mlp.hook_pre"]) < TOL
            assert _close(blk.mlp.activation_fn(c["mlp.hook_pre"]), c["mlp.hook_post"]) < TOL
            assert _close(blk.mlp.fc2(c["mlp.hook_post"]), c["hook_mlp_out"]) < TOL
        else:  # Qwen2.5-VL: flat [patches, d], fused qkv ([q | k | v] thirds), no pattern site, gated MLP
            assert "attn.hook_pattern" not in c
            assert c["attn.hook_z"].dim() == 3 and c["attn.hook_q"].shape == c["attn.hook_z"].shape
            fused = blk.attn.qkv(c["ln1.hook_normalized"])
            parts = torch.cat([c[f"attn.hook_{x}"].flatten(-2) for x in "qkv"], -1)
            assert _close(parts, fused) < TOL

            def sharpen(q, ctx):  # head 0's query only: head 0's output moves, head 1's does not
                q = q.clone()
                q[..., 0, :] *= 50
                return q

            _, moved = model.run_with_cache(padded, names=["vision.blocks.0.attn.hook_z"],
                                            hooks=[("vision.blocks.0.attn.hook_q", sharpen)])
            z = moved["vision.blocks.0.attn.hook_z"]
            assert _close(z[:, 0], c["attn.hook_z"][:, 0]) > 1e-2 and _close(z[:, 1:], c["attn.hook_z"][:, 1:]) < TOL
            assert _close(c["ln1.hook_normalized"], blk.norm1(c["hook_resid_pre"])) < TOL
            assert _close(blk.attn.proj(c["attn.hook_z"].flatten(-2)), c["hook_attn_out"]) < TOL
            assert _close(c["mlp.hook_post"], F.silu(c["mlp.hook_pre"]) * c["mlp.hook_pre_linear"]) < TOL
            assert _close(blk.mlp.down_proj(c["mlp.hook_post"]), c["hook_mlp_out"]) < TOL
        assert _close(c["ln2.hook_normalized"], (blk.layer_norm2 if model.arch == "llava" else blk.norm2)(
            c["hook_resid_mid"])) < TOL


@pytest.mark.parametrize("backend", ["nnsight", "torch"])
def test_ablating_one_head_at_z_removes_exactly_its_share_of_attn_out(tiny_model, padded, backend):
    """Zeroing head h of ``attn.hook_z`` equals subtracting ``z_h @ W_O[:, h]^T`` from ``hook_attn_out``."""
    model, l, h = tiny_model, 1, 1
    _, cache = model.run_with_cache(padded, names=[f"blocks.{l}.attn.hook_z"])
    z = cache[f"blocks.{l}.attn.hook_z"]
    d_head = z.shape[-1]
    w_o = _block(model, l).self_attn.o_proj.weight[:, h * d_head:(h + 1) * d_head]  # [d_model, d_head]
    share = z[:, :, h] @ w_o.T

    def ablate(x, ctx):
        x = x.clone()
        x[:, :, h] = 0
        return x

    def subtract(x, ctx):
        return x - share.to(x.dtype)

    expect = model.run_with_hooks(padded, [(f"blocks.{l}.hook_attn_out", subtract)])
    if backend == "nnsight":
        got = model.run_with_hooks(padded, [(f"blocks.{l}.attn.hook_z", ablate)])
    else:
        with model.hooks([(f"blocks.{l}.attn.hook_z", ablate)], backend="torch"):
            got = model.run_with_hooks(padded, [])
    vanilla = model.run_with_hooks(padded, [])
    real = padded.attention_mask.bool()
    assert _close(got, expect, real) < 1e-4
    assert _close(got, vanilla, real) > 1e-3  # the head mattered


def test_patterns_are_read_only_and_read_eagerly_only_when_asked(tiny_llava):
    model = tiny_llava
    inputs = model.encode(images=[random_image(32, 3)], prompts=["who is he"])
    name = "blocks.0.attn.hook_pattern"
    seen = []
    logits = model.run_with_hooks(inputs, [(name, lambda x, ctx: seen.append(tuple(x.shape)))])
    assert seen == [(1, model.head_counts["lm"][0], inputs.input_ids.shape[1], inputs.input_ids.shape[1])]
    with pytest.raises(ValueError, match="read-only"):
        model.run_with_hooks(inputs, [(name, lambda x, ctx: x * 0)])
    with pytest.raises(ValueError, match="read-only"), model.hooks([(name, lambda x, ctx: x * 0)]):
        model.run_with_hooks(inputs, [])
    configs = [model.hf_model.config.get_text_config(), model.hf_model.config.vision_config]
    assert [c._attn_implementation for c in configs] == ["sdpa", "sdpa"]  # restored after the errors too
    with model.hooks([(name, lambda x, ctx: seen.append(tuple(x.shape)))], backend="torch"):
        assert configs[0]._attn_implementation == "eager" and configs[1]._attn_implementation == "sdpa"
        again = model.run_with_hooks(inputs, [])
    assert configs[0]._attn_implementation == "sdpa" and len(seen) == 2
    assert (again - logits).abs().max().item() < 1e-5
    plain = model.run_with_hooks(inputs, [])  # sdpa: the same numbers to float rounding
    assert (plain - logits).abs().max().item() < 1e-5


def test_pattern_at_decode_steps_covers_the_growing_context(tiny_llava):
    model = tiny_llava
    inputs = model.encode(images=[None, None], prompts=["who is he", "what is the capital of the city"])
    shapes = []
    out = model.generate(inputs, max_new_tokens=3, every_step=True, min_new_tokens=3,
                         hooks=[("blocks.2.attn.hook_pattern", lambda x, ctx: shapes.append((ctx.step, tuple(x.shape))))])
    pos, heads = inputs.input_ids.shape[1], model.head_counts["lm"][0]
    assert shapes == [(0, (2, heads, pos, pos)), (1, (2, heads, 1, pos + 1)), (2, (2, heads, 1, pos + 2))]
    assert out.new_tokens.shape == (2, 3)


def test_site_lookup_and_errors(tiny_model):
    model = tiny_model
    site = model.site("blocks.0.attn.hook_z")
    assert site.module == f"{model.adapter.lm_layers}.0.self_attn.o_proj" and site.kind == "input"
    assert model.module_for("blocks.0.mlp.hook_post") is _block(model, 0).mlp.down_proj
    with pytest.raises(HookNameError, match="blocks.0.attn.hook_z"):
        model.site("blocks.0.attn.hook_zz")
    if model.arch == "qwen2_5_vl":
        with pytest.raises(HookNameError):  # the windowed vision attention returns no weights
            model.site("vision.blocks.0.attn.hook_pattern")
        assert model.site("vision.blocks.0.attn.hook_v").module == model.site("vision.blocks.0.attn.hook_q").module
