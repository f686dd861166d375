"""Tiny models: overrides are honoured, bad ones rejected, seeds reproducible."""
from __future__ import annotations

import pytest
import torch

from interp.tiny import tiny_vlm


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_overrides_shape_the_model(arch):
    m = tiny_vlm(arch, seed=1, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vision_d_model=32,
                 vision_layers=3, image_size=32, patch_size=8)
    assert (m.d_model, m.n_layers, m.n_vision_layers) == (64, 2, 3)
    # per block: 5 residual-level sites + ln1, ln2 and the MLP's hook_pre, hook_post; the LM's gated MLP adds
    # hook_pre_linear and its attention q, k, v, z and pattern; CLIP's too, Qwen's vision tower (windowed
    # attention, no weights) q, k, v (thirds of its fused qkv) and z, and its gated MLP hook_pre_linear
    lm, vision = 5 + 4 + 1 + 5, 5 + 4 + (5 if arch == "llava" else 5)
    assert len(m.hook_names()) == 1 + 3 * vision + 3 + 2 * lm + 2
    assert m.head_counts == {"lm": (4, 2), "vision": (2, 2)}  # vision heads: the tiny builder's default


def test_vision_overrides_reach_the_hf_config():
    q = tiny_vlm("qwen2_5_vl", n_layers=1, vision_layers=4, vision_d_mlp=40, vision_window=32,
                 vision_full_attention=(1, 3)).hf_model.config.vision_config
    assert (q.intermediate_size, q.window_size, list(q.fullatt_block_indexes)) == (40, 32, [1, 3])
    d = tiny_vlm("qwen2_5_vl", n_layers=1, vision_layers=2).hf_model.config.vision_config
    assert (d.intermediate_size, d.window_size, list(d.fullatt_block_indexes)) == (256, 32, [1])  # the defaults
    assert tiny_vlm("llava", n_layers=1, vision_d_mlp=48).hf_model.config.vision_config.intermediate_size == 48
    with pytest.raises(ValueError, match="vision_full_attention"):
        tiny_vlm("qwen2_5_vl", n_layers=1, vision_layers=2, vision_full_attention=(2,))
    with pytest.raises(TypeError, match="vision_window"):
        tiny_vlm("llava", vision_window=32)  # LLaVA's CLIP tower has no windows


def test_seed_reproducible_and_distinct():
    a = tiny_vlm("llava", seed=3, n_layers=1)
    b = tiny_vlm("llava", seed=3, n_layers=1)
    c = tiny_vlm("llava", seed=4, n_layers=1)
    pa, pb, pc = (next(m.hf_model.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_bad_arch_and_overrides_are_rejected():
    with pytest.raises(NotImplementedError, match="llava"):
        tiny_vlm("gpt2")
    with pytest.raises(TypeError, match="n_layer"):
        tiny_vlm("llava", n_layer=2)
    with pytest.raises(ValueError):
        tiny_vlm("llava", d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="vision_feature_layer is LLaVA's"):  # was accepted and ignored (an audit)
        tiny_vlm("qwen2_5_vl", vision_feature_layer=-2)


def test_unsupported_hf_class_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    from interp import HookedVLM

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(NotImplementedError, match="unsupported architecture 'LlamaForCausalLM'"):
        HookedVLM.from_hf(tiny, tokenizer=object())


def test_tokenizer_round_trips_words_and_punctuation():
    m = tiny_vlm("llava", n_layers=1)
    ids = m.tokenizer("who is he ?", add_special_tokens=False)["input_ids"]
    assert m.tokenizer.unk_token_id not in ids
    assert m.tokenizer.decode(ids) == "who is he?"
