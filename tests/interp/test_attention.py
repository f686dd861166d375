"""interp.attention: eager attention for one tower, for one block of code, always put back."""
from __future__ import annotations

import pytest

from interp.attention import eager_attention, tower_root


def _impls(model) -> tuple[str, str]:
    c = model.hf_model.config
    return c.get_text_config()._attn_implementation, c.vision_config._attn_implementation


def test_switches_only_the_named_tower_and_restores(tiny_model):
    lm, vision = tower_root(tiny_model.adapter, "lm"), tower_root(tiny_model.adapter, "vision")
    assert lm == "model.language_model" and vision in ("model.vision_tower.encoder", "model.visual")
    assert _impls(tiny_model) == ("sdpa", "sdpa")
    with eager_attention(tiny_model.hf_model, [lm]):
        assert _impls(tiny_model) == ("eager", "sdpa")
        with eager_attention(tiny_model.hf_model, [lm, vision]):  # nested: each restores what it found
            assert _impls(tiny_model) == ("eager", "eager")
        assert _impls(tiny_model) == ("eager", "sdpa")
    assert _impls(tiny_model) == ("sdpa", "sdpa")
    with pytest.raises(RuntimeError, match="boom"), eager_attention(tiny_model.hf_model, [vision]):
        raise RuntimeError("boom")
    assert _impls(tiny_model) == ("sdpa", "sdpa")
    with eager_attention(tiny_model.hf_model, []):
        assert _impls(tiny_model) == ("sdpa", "sdpa")


def test_a_pattern_read_without_eager_attention_says_so(tiny_llava):
    """Hooks registered below HookedVLM (``interp.torch_hooks.register``) on a raw ``hf_model`` call do not switch
    attention to eager: the pattern is None there, and reading it is a clear error, not a silent None."""
    from interp import torch_hooks

    inputs = tiny_llava.encode(images=[None], prompts=["who is he"])
    handles = torch_hooks.register(tiny_llava, {"blocks.0.attn.hook_pattern": [lambda x, ctx: None]})
    try:
        with torch_hooks.active_inputs(inputs), pytest.raises(RuntimeError, match="eager attention"):
            tiny_llava.hf_model(**inputs.model_kwargs())
        with torch_hooks.active_inputs(inputs), eager_attention(tiny_llava.hf_model, ["model.language_model"]):
            tiny_llava.hf_model(**inputs.model_kwargs())  # with eager attention the same call reads it
    finally:
        torch_hooks.remove(handles)
