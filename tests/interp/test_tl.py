"""interp.tl: the TransformerLens bridge sees the same activations, leaves our model alone, never installs torchvision."""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import random_image

pytest.importorskip("transformer_lens.model_bridge")

from interp.tl import (  # noqa: E402
    bridge_hook_name,
    bridge_hook_names,
    bridge_run_with_cache,
    compare_with_bridge,
    no_torchvision_install,
    to_tl,
    to_transformer_lens,
)

HELPERS = "transformer_lens.model_bridge.sources.transformers.helpers"
TOL = 1e-4


def _image_size(model) -> int:
    return 32 if model.arch == "llava" else 64


@pytest.fixture(scope="module")
def bridged(tiny_model):
    return tiny_model, to_transformer_lens(tiny_model)


def test_resid_post_and_logits_match_on_an_image_prompt(bridged):
    model, bridge = bridged
    inputs = model.encode(images=[random_image(_image_size(model), 3)], prompts=["who is the person in this image ?"])
    logits, cache = model.run_with_cache(inputs, names="blocks.*.hook_resid_post")
    kw = inputs.model_kwargs()
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(kw.pop("input_ids"), **kw)  # the bridge's own run_with_cache
    diffs = [(tl_cache[f"blocks.{l}.hook_resid_post"] - cache[f"blocks.{l}.hook_resid_post"]).abs().max().item()
             for l in range(model.n_layers)]
    logit_diff = (tl_logits - logits).abs().max().item()
    print(f"{model.arch}: resid_post max|diff| per layer {diffs}, logits {logit_diff:.2e}")
    assert len(diffs) == model.n_layers == bridge.cfg.n_layers
    assert max(diffs) <= TOL, diffs
    assert logit_diff <= TOL
    assert logits.abs().max() > 1e-2  # not vacuous: the activations and logits are real numbers, not zeros
    assert inputs.image_mask.sum() > 0


def test_every_site_matches_on_a_padded_batch(bridged):
    """All our hook names (vision tower, projector, LM, logits) through the name mapping, left-padded batch of 2."""
    model, bridge = bridged
    size = _image_size(model)
    inputs = model.encode(images=[random_image(size, 1), random_image(size, 2)],
                          prompts=["what is the name of the person in this image ?", "who is he"])
    assert (inputs.attention_mask == 0).any()  # really padded
    diffs = compare_with_bridge(model, bridge, inputs)
    print(f"{model.arch}: worst site {max(diffs, key=diffs.get)} = {max(diffs.values()):.2e}")
    assert set(diffs) == set(model.hook_names()) | {"logits"}
    assert max(diffs.values()) <= TOL, {k: v for k, v in diffs.items() if v > TOL}


def test_text_only_batch_skips_vision_sites(bridged):
    model, bridge = bridged
    inputs = model.encode(images=[None], prompts=["who is this person"])
    logits, acts = bridge_run_with_cache(bridge, model, inputs)
    assert not any(n.startswith(("vision.", "projector.")) for n in acts)
    ours, cache = model.run_with_cache(inputs, names=list(acts))
    assert (logits - ours).abs().max() <= TOL
    assert (acts["hook_embed"] - cache["hook_embed"]).abs().max() <= TOL


def test_original_model_is_untouched(tiny_model):
    model = tiny_model
    inputs = model.encode(images=[random_image(_image_size(model), 5)], prompts=["who is he"])
    before_logits, before_cache = model.run_with_cache(inputs, names="blocks.*.hook_resid_post")
    state = {k: v.detach().clone() for k, v in model.hf_model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.hf_model.named_modules()]
    config = model.hf_model.config.to_dict()
    attn_impl = model.hf_model.config._attn_implementation

    bridge = to_tl(model)

    after = model.hf_model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert [(n, type(m)) for n, m in model.hf_model.named_modules()] == modules
    assert model.hf_model.config.to_dict() == config
    assert model.hf_model.config._attn_implementation == attn_impl
    # The bridge owns a copy: no shared storage, and wrapping changed the copy's module tree, not ours.
    ours = {p.data_ptr() for p in model.hf_model.parameters()}
    assert not ours & {p.data_ptr() for p in bridge.parameters()}
    assert bridge.original_model is not model.hf_model
    after_logits, after_cache = model.run_with_cache(inputs, names="blocks.*.hook_resid_post")
    assert torch.equal(after_logits, before_logits)
    assert all(torch.equal(after_cache[n], before_cache[n]) for n in before_cache)


def test_torchvision_is_never_installed(tiny_qwen, monkeypatch, caplog):
    """Qwen2.5-VL's processor needs torchvision, which sends TransformerLens down its pip-install path."""
    import importlib

    helpers = importlib.import_module(HELPERS)
    from transformer_lens.model_bridge.supported_architectures.qwen2_5_vl import Qwen2_5_VLArchitectureAdapter

    original = helpers._ensure_torchvision
    calls: list = []

    def no_subprocess(*args, **kwargs):
        calls.append(args)
        raise RuntimeError(f"a subprocess was started during bridging: {args}")

    for fn in ("check_call", "check_output", "run", "call", "Popen"):
        monkeypatch.setattr(subprocess, fn, no_subprocess)
    monkeypatch.setattr(os, "system", no_subprocess)
    caplog.set_level(logging.INFO, logger="interp.tl")

    bridge = to_tl(tiny_qwen)

    assert calls == []
    assert "refused" in caplog.text  # TL did reach its install fallback, and the guard answered it
    assert bridge.processor is None
    assert "torchvision" not in sys.modules
    # Everything patched is restored afterwards.
    assert helpers._ensure_torchvision is original
    assert Qwen2_5_VLArchitectureAdapter.required_libraries == ["torchvision"]


def test_guard_restores_on_error():
    import importlib

    helpers = importlib.import_module(HELPERS)
    original = helpers._ensure_torchvision
    with pytest.raises(ZeroDivisionError):
        with no_torchvision_install():
            assert helpers._ensure_torchvision() is False
            1 / 0
    assert helpers._ensure_torchvision is original


def test_hook_name_mapping(tiny_llava, tiny_qwen):
    assert bridge_hook_name("blocks.2.hook_resid_post", "llava") == "blocks.2.hook_resid_post"
    assert bridge_hook_name("hook_embed", "qwen2_5_vl") == "blocks.0.hook_resid_pre"
    assert bridge_hook_name("hook_logits", "llava") == "unembed.hook_out"
    assert bridge_hook_name("vision.blocks.1.hook_attn_out", "llava") == "vision_encoder.encoder_layers.1.hook_attn_out"
    assert bridge_hook_name("vision.blocks.0.hook_resid_mid", "llava") == "vision_encoder.encoder_layers.0.ln2.hook_in"
    assert bridge_hook_name("vision.hook_embed", "qwen2_5_vl") == "vision_encoder.blocks.0.hook_resid_pre"
    assert bridge_hook_name("projector.hook_out", "qwen2_5_vl") == "vision_projector.hook_out"
    mapping = bridge_hook_names(tiny_llava, "blocks.*.hook_resid_post")
    assert mapping == {f"blocks.{l}.hook_resid_post": f"blocks.{l}.hook_resid_post" for l in range(tiny_llava.n_layers)}
    assert len(bridge_hook_names(tiny_qwen)) == len(tiny_qwen.hook_names())
    with pytest.raises(KeyError):
        bridge_hook_name("not_a_hook", "llava")
    with pytest.raises(NotImplementedError, match="supported"):
        bridge_hook_name("hook_embed", "idefics2")


def test_unsupported_architecture_is_a_clear_error(tiny_llava):
    import copy

    fake = copy.copy(tiny_llava)
    fake.adapter = dataclasses.replace(tiny_llava.adapter, name="idefics2", hf_class="Idefics2ForConditionalGeneration")
    with pytest.raises(NotImplementedError, match="idefics2"):
        to_tl(fake)


def test_missing_transformer_lens_is_a_clear_error(tiny_llava, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_lens.model_bridge", None)
    with pytest.raises(ImportError, match="transformer-lens>=4"):
        to_tl(tiny_llava)
