"""The plain-PyTorch hook backend gives exactly what the nnsight backend gives, and detaches cleanly."""
from __future__ import annotations

import pytest
import torch


def _steer(vec, prefill_only):
    def fn(x, ctx):
        if prefill_only and ctx.step > 0:
            return None
        return x + vec * ctx.last_token_mask(x).unsqueeze(-1) if ctx.is_prefill else x + vec

    return fn


def test_forward_parity_and_clean_detach(tiny_model, two_prompts):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    vec = torch.linspace(-2, 2, tiny_model.d_model)
    spec = [("blocks.1.hook_resid_pre", _steer(vec, True)), ("blocks.0.hook_attn_out", lambda x, c: x * 1.5)]
    vanilla = tiny_model.run_with_hooks(inputs, [])
    via_nnsight = tiny_model.run_with_hooks(inputs, spec)
    with tiny_model.hooks(spec, backend="torch"):
        via_torch = tiny_model.run_with_hooks(inputs, [])
    with tiny_model.hooks(spec, backend="nnsight"):
        via_persistent = tiny_model.run_with_hooks(inputs, [])
    assert torch.equal(via_nnsight, via_torch) and torch.equal(via_nnsight, via_persistent)
    assert (via_nnsight - vanilla).abs().max() > 1e-3
    assert torch.equal(tiny_model.run_with_hooks(inputs, []), vanilla)  # detached bit for bit


@pytest.mark.parametrize("every_step", [False, True])
def test_generation_parity(tiny_model, two_prompts, every_step):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    vec = 3 * torch.linspace(-1, 1, tiny_model.d_model)
    fn = _steer(vec, prefill_only=not every_step)
    a = tiny_model.generate(inputs, max_new_tokens=6, hooks=[("blocks.1.hook_resid_pre", fn)], every_step=every_step,
                            eos_token_id=None)
    with tiny_model.hooks([("blocks.1.hook_resid_pre", fn)], backend="torch"):
        b = tiny_model.generate(inputs, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(a.sequences, b.sequences)


def test_hooks_are_removed_on_error(tiny_llava):
    inputs = tiny_llava.encode(prompts=["who is he"])
    vanilla = tiny_llava.run_with_hooks(inputs, [])
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_llava.hooks([("blocks.0.hook_resid_pre", lambda x, c: x + 1)], backend="torch"):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_llava.hooks([("blocks.0.hook_resid_pre", lambda x, c: x + 1)], backend="nnsight"):
            raise RuntimeError("boom")
    assert torch.equal(tiny_llava.run_with_hooks(inputs, []), vanilla)
    assert not tiny_llava.hf_model.model.language_model.layers[0]._forward_pre_hooks


def test_unknown_backend_and_names_fail_before_attaching(tiny_llava):
    with pytest.raises(ValueError, match="backend"):
        with tiny_llava.hooks([("blocks.0.hook_resid_pre", lambda x, c: x)], backend="jax"):
            pass
    from interp import HookNameError

    with pytest.raises(HookNameError):
        with tiny_llava.hooks([("blocks.0.hook_resid_prex", lambda x, c: x)]):
            pass


def test_raw_call_outside_hookedvlm_is_a_clear_error(tiny_llava):
    inputs = tiny_llava.encode(prompts=["who is he"])
    with tiny_llava.hooks([("blocks.0.hook_resid_pre", lambda x, c: x)], backend="torch"):
        with pytest.raises(RuntimeError, match="outside a HookedVLM call"):
            with torch.no_grad():
                tiny_llava.hf_model(**inputs.model_kwargs())
