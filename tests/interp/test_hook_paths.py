"""interp.hook_paths: a hook's write given to one reader at a time, checked against the hooked run, hand-made
runs and its first-order estimate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.adapters import get_module
from interp import HookNameError
from interp.hook_paths import (HookPaths, attribution_hook_paths, generation_writes, hook_paths, hook_paths_by_position,
                               hook_writes)
from interp.hooks import first_steps, prefill_only
from interp.lens import unembed
from interp.patching import logit_diff
from tests.conftest import random_image

PROMPTS = ["what is the name of the person in this image ?", "who is he"]


def _inputs(model):
    size = 32 if model.arch == "llava" else 64
    return model.encode(images=[random_image(size, 1), random_image(size, 2)], prompts=PROMPTS)


def _steer(model, layer: int, scale: float = 2.0, site: str = "pre"):
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(layer))
    return [(f"blocks.{layer}.hook_resid_{site}", lambda x, ctx: x + scale * v.to(x))]


@pytest.mark.parametrize("qkv", [False, True])
def test_every_path_at_once_is_the_hooked_run(tiny_model, qkv):
    inputs, metric = _inputs(tiny_model), logit_diff(5, 7)
    paths = hook_paths(tiny_model, inputs, _steer(tiny_model, 1), metric, qkv=qkv, max_rows=4)
    assert paths.readers[0] == ("L1H0.q" if qkv else "L1.attn_in") and paths.readers[-1] == "logits"
    assert paths.all_readers == pytest.approx(paths.hooked, abs=1e-4)
    assert abs(paths.hooked - paths.plain) > 5e-3  # the hook does something (measured: 0.014 on Qwen, more on LLaVA)
    batched = hook_paths(tiny_model, inputs, _steer(tiny_model, 1), metric, qkv=qkv, max_rows=None)
    assert np.allclose(paths.patched, batched.patched, atol=1e-5)
    assert set(paths.by_kind()) == ({"q", "k", "v", "mlp_in", "logits"} if qkv else {"attn_in", "mlp_in", "logits"})


def test_the_direct_path_is_the_final_norm_of_the_plain_residual_plus_the_write(tiny_model):
    inputs, metric = _inputs(tiny_model), logit_diff(5, 7)
    hooks = _steer(tiny_model, 2, site="post")  # block 2 is the last: only the logits read it
    paths = hook_paths(tiny_model, inputs, hooks, metric)
    assert paths.readers == ["logits"]
    last = f"blocks.{tiny_model.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(inputs, names=[last])
        writes, _ = hook_writes(tiny_model, inputs, hooks)
        norm = get_module(tiny_model.hf_model, tiny_model.adapter.final_norm)
        by_hand = metric(unembed(tiny_model, norm(cache[last] + writes[last])), inputs).mean().item()
    assert paths.patched[0] == pytest.approx(by_hand, abs=1e-4)
    assert paths.value("logits") == pytest.approx(1.0, abs=1e-4)  # the only path: the whole effect


def test_writes_are_what_the_hooks_changed(tiny_llava):
    inputs = _inputs(tiny_llava)
    v = torch.arange(tiny_llava.d_model, dtype=torch.float32)
    hooks = [("blocks.1.hook_resid_pre", lambda x, ctx: x + v), ("blocks.1.hook_resid_pre", lambda x, ctx: 2 * x),
             ("blocks.2.hook_resid_pre", lambda x, ctx: None)]  # a reader: writes nothing
    writes, _ = hook_writes(tiny_llava, inputs, hooks)
    with torch.no_grad():
        _, cache = tiny_llava.run_with_cache(inputs, names=["blocks.1.hook_resid_pre"])
    x = cache["blocks.1.hook_resid_pre"]
    assert torch.allclose(writes["blocks.1.hook_resid_pre"], (2 * (x + v) - x), atol=1e-4)
    assert writes["blocks.2.hook_resid_pre"].abs().max() == 0


def test_estimates_follow_patching_for_a_small_write(tiny_model):
    inputs, metric = _inputs(tiny_model), logit_diff(5, 7)
    hooks = _steer(tiny_model, 1, scale=1e-4)  # small next to the residual (Qwen is off linear by 5 % at 1e-3)
    real = hook_paths(tiny_model, inputs, hooks, metric, qkv=True)
    est = attribution_hook_paths(tiny_model, inputs, hooks, metric, qkv=True)
    assert est.readers == real.readers and est.meta["method"] == "attribution"
    assert est.plain == pytest.approx(real.plain, abs=1e-5) and est.hooked == pytest.approx(real.hooked, abs=1e-5)
    assert np.abs(real.effects - est.effects).max() < 0.02  # measured 0.0013 / 0.0019
    assert est.all_readers - est.plain == pytest.approx(real.hooked - real.plain, rel=0.01)  # measured 0.3-0.5 %


def test_round_trip_and_bad_input(tiny_llava, tmp_path):
    inputs, metric = _inputs(tiny_llava), logit_diff(5, 7)
    paths = hook_paths(tiny_llava, inputs, _steer(tiny_llava, 0), metric)
    paths.save(tmp_path / "p.json")
    back = HookPaths.load(tmp_path / "p.json")
    assert back.readers == paths.readers and np.allclose(back.patched, paths.patched) and back.meta == paths.meta
    assert paths.top(1)[0][0] in paths.readers
    with pytest.raises(ValueError, match="residual stream"):
        hook_paths(tiny_llava, inputs, [("blocks.0.hook_mlp_out", lambda x, ctx: x)], metric)
    with pytest.raises(HookNameError, match="unknown hook name 'blocks.7.hook_resid_pre'"):
        hook_paths(tiny_llava, inputs, [("blocks.7.hook_resid_pre", lambda x, ctx: x)], metric)
    with pytest.raises(ValueError, match="no hooks"):
        hook_paths(tiny_llava, inputs, [], metric)
    with pytest.raises(KeyError, match="no reader"):
        paths.value("L9.mlp_in")
    with pytest.raises(ValueError, match="wrote nothing"):
        hook_paths(tiny_llava, inputs, [("blocks.1.hook_resid_pre", lambda x, ctx: None)], metric)
    # a hook that only reads (a gate's reader) opens no path: the readers start at the first real write
    reader = [("blocks.0.hook_resid_pre", lambda x, ctx: None)]
    assert hook_paths(tiny_llava, inputs, reader + _steer(tiny_llava, 2), metric).readers[0] == "L2.attn_in"


def test_integrated_estimates_add_up_to_the_whole_effect(tiny_model):
    """A write far from small (first order misses): integrated over the write's scale, the readers' terms add up to
    the hooked run's change, closer with more steps, and the ranking follows patching.  (How many steps depends on
    the path: a write that dwarfs the residual saturates the norms near 0, where uniform steps are coarse.)"""
    inputs, metric = _inputs(tiny_model), logit_diff(5, 7)
    # the random Qwen's metric turns over already at a write of 0.1 (measured): a smaller one keeps the path simple
    hooks = _steer(tiny_model, 1, scale=0.3 if tiny_model.arch == "llava" else 0.01)
    real = hook_paths(tiny_model, inputs, hooks, metric)
    est = {k: attribution_hook_paths(tiny_model, inputs, hooks, metric, steps=k) for k in (0, 4, 64)}
    gap = real.hooked - real.plain
    err = {k: abs(e.all_readers - e.plain - gap) / abs(gap) for k, e in est.items()}
    # measured: first order 10x / 2x off, 64 steps 0.3 % / 0.02 %
    assert est[64].meta["steps"] == 64 and err[0] > 0.5 and err[64] < 0.02 and err[64] <= err[4] + 1e-3 < err[0], err
    assert np.abs(est[64].effects - real.effects).max() < np.abs(est[0].effects - real.effects).max()


def test_positions_split_the_write(tiny_model):
    """The write at some positions only: at every position it is the whole hook; to first order the image, text
    and padding parts add up to it; at the last prompt token only, patched, by hand."""
    inputs, metric = _inputs(tiny_model), logit_diff(5, 7)
    hooks = _steer(tiny_model, 1, scale=1e-4)
    est = {p: attribution_hook_paths(tiny_model, inputs, hooks, metric, positions=p) for p in ("all", "image", "text")}
    pad = lambda x: ~(x.image_mask | x.text_mask)  # noqa: E731 - a positions mask: what neither modality covers
    rest = attribution_hook_paths(tiny_model, inputs, hooks, metric, positions=pad)
    parts = sum(est[p].patched - est[p].plain for p in ("image", "text")) + rest.patched - rest.plain
    assert np.allclose(parts, est["all"].patched - est["all"].plain, atol=1e-6)
    assert est["image"].meta["positions"] == "image"
    last = hook_paths(tiny_model, inputs, hooks, metric, positions="last")
    writes, _ = hook_writes(tiny_model, inputs, hooks)
    w = writes["blocks.1.hook_resid_pre"].clone()
    keep = torch.zeros_like(inputs.image_mask)
    keep[torch.arange(2), inputs.last_index] = True
    w[~keep] = 0
    with torch.no_grad():
        by_hand = metric(tiny_model.run_with_hooks(inputs, [("blocks.1.hook_resid_pre", lambda x, ctx: x + w)]),
                         inputs).mean().item()
    assert last.all_readers == pytest.approx(by_hand, abs=1e-5)  # every reader given the last token's write


def test_several_position_sets_in_one_call_match_one_call_each(tiny_model, monkeypatch):
    """hook_paths_by_position = hook_paths per position set, with the hooked and plain runs done once and every
    set's rows in shared passes (counted: 1 + 1 + ceil(rows / max_rows) forward passes)."""
    inputs, metric = _inputs(tiny_model), logit_diff(5, 7)
    hooks = _steer(tiny_model, 1)
    last_two = lambda x: torch.arange(x.input_ids.shape[1]) >= x.input_ids.shape[1] - 2  # noqa: E731
    sets = ["all", "image", "text", "last", lambda x: last_two(x).expand_as(x.input_ids)]
    calls = []
    real = type(tiny_model).run_with_hooks
    counted = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)  # noqa: E731
    monkeypatch.setattr(type(tiny_model), "run_with_hooks", counted)
    together = hook_paths_by_position(tiny_model, inputs, hooks, metric, sets, max_rows=16)
    n_rows = len(sets) * (len(together["all"].readers) + 1) * inputs.batch_size
    assert len(calls) == 2 + -(-n_rows // 16)
    monkeypatch.undo()
    assert list(together) == ["all", "image", "text", "last", "<lambda>"]
    for p, label in zip(sets, together):
        alone = hook_paths(tiny_model, inputs, hooks, metric, positions=p, max_rows=4)
        assert np.allclose(together[label].patched, alone.patched, atol=1e-5), label
        assert together[label].all_readers == pytest.approx(alone.all_readers, abs=1e-5)
        assert together[label].meta["positions"] == label
    assert together["all"].all_readers == pytest.approx(together["all"].hooked, abs=1e-4)
    assert abs(together["last"].all_readers - together["all"].all_readers) > 1e-4  # the sets differ
    with pytest.raises(ValueError, match="distinct labels"):
        hook_paths_by_position(tiny_model, inputs, hooks, metric, ["last", "last"])
    with pytest.raises(ValueError, match="no positions"):
        hook_paths_by_position(tiny_model, inputs, hooks, metric, [])
    with pytest.raises(TypeError, match="sequence of position specs"):
        hook_paths_by_position(tiny_model, inputs, hooks, metric, "last")


def _answer_steer(model, scale: float = 2.0, last: int = 2):
    """Adds ``v`` at the prompt and ``u`` at answer steps ``1..last`` (an eraser's prompt and answer steering)."""
    v, u = (scale * torch.randn(model.d_model, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    return [("blocks.1.hook_resid_pre", first_steps(lambda x, ctx: x + (v if ctx.is_prefill else u).to(x), last))], v, u


def test_generation_writes_reproduce_the_hooked_generation(tiny_model):
    """The writes recorded while generating, added to one forward pass of the prompt + the answer tokens, give the
    hooked generation's logits at every step; each decode step's write sits at its token."""
    inputs = _inputs(tiny_model)
    hooks, v, u = _answer_steer(tiny_model)
    forced, writes, logits = generation_writes(tiny_model, inputs, hooks, answer_step=2)
    width = inputs.input_ids.shape[1]
    assert forced.input_ids.shape[1] == width + 2 and list(writes) == ["blocks.1.hook_resid_pre"]
    w = writes["blocks.1.hook_resid_pre"]
    assert torch.allclose(w[:, :width], v.expand(2, width, -1), atol=1e-5)
    assert torch.allclose(w[:, width:], u.expand(2, 2, -1), atol=1e-5)
    assert torch.isnan(logits[:, :width - 1]).all() and not torch.isnan(logits[:, width - 1:]).any()
    with torch.no_grad():
        add = lambda x, ctx: (x.float() + w).to(x.dtype)  # noqa: E731
        again = tiny_model.run_with_hooks(forced, [("blocks.1.hook_resid_pre", add)])
    assert torch.allclose(again[:, width - 1:].float(), logits[:, width - 1:], atol=1e-5)
    gen = tiny_model.generate(inputs, max_new_tokens=2, hooks=hooks)
    assert torch.equal(forced.input_ids[:, width:], gen.new_tokens)
    same, _, _ = generation_writes(tiny_model, inputs, hooks, answer_step=0)
    assert same is inputs


@pytest.mark.parametrize("qkv", [False, True])
def test_paths_at_an_answer_step(tiny_model, qkv):
    """At answer step 2 every reader given the recorded writes is the hooked generation; the prompt's and the
    answer tokens' writes split it; a prefill-only hook acts on later tokens only through the prompt."""
    inputs, metric = _inputs(tiny_model), logit_diff(10, 20)  # moved by 1.0 / 0.36 (LLaVA / Qwen) at step 2
    hooks, _, _ = _answer_steer(tiny_model)
    paths = hook_paths_by_position(tiny_model, inputs, hooks, metric, ["all", "prompt", "answer", "last"], qkv=qkv,
                                   answer_step=2)
    full = paths["all"]
    assert full.all_readers == pytest.approx(full.hooked, abs=1e-4) and abs(full.hooked - full.plain) > 5e-3
    assert full.meta["answer_step"] == 2 and paths["answer"].meta["positions"] == "answer"
    assert paths["prompt"].all_readers != pytest.approx(paths["answer"].all_readers, abs=1e-3)
    # the direct path sees only the last position's write: the prompt's write has no direct path
    assert paths["prompt"].value("logits") == pytest.approx(0.0, abs=1e-6)
    assert paths["last"].value("logits") == pytest.approx(full.value("logits"), abs=1e-5)
    v = torch.randn(tiny_model.d_model, generator=torch.Generator().manual_seed(4))
    only_prompt = [("blocks.1.hook_resid_pre", prefill_only(lambda x, ctx: x + v.to(x) if ctx.is_prefill else None))]
    answer = hook_paths(tiny_model, inputs, only_prompt, metric, positions="answer", answer_step=1, qkv=qkv)
    assert np.allclose(answer.patched, answer.plain, atol=1e-6)  # nothing written at the answer token
    small, _, _ = _answer_steer(tiny_model, scale=1e-4)  # first order = patching for a small write
    est = attribution_hook_paths(tiny_model, inputs, small, metric, qkv=qkv, answer_step=2)
    real = hook_paths(tiny_model, inputs, small, metric, qkv=qkv, answer_step=2)
    d_est, d_real = est.patched - est.plain, real.patched - real.plain
    assert np.abs(d_est - d_real).max() < 0.02 * np.abs(d_real).max()  # measured 0.004 (0.04 at 1e-3: second order)


def test_answer_step_errors(tiny_llava):
    inputs, metric = _inputs(tiny_llava), logit_diff(5, 7)
    hooks, _, _ = _answer_steer(tiny_llava)
    with pytest.raises(ValueError, match="answer_step must be an int >= 0"):
        hook_paths(tiny_llava, inputs, hooks, metric, answer_step=-1)
    with pytest.raises(ValueError, match="needs answer_step >= 1"):
        hook_paths(tiny_llava, inputs, hooks, metric, positions="answer")
    first = tiny_llava.generate(inputs, max_new_tokens=1, hooks=hooks).new_tokens[0, 0].item()
    eos = tiny_llava.tokenizer.eos_token_id
    tiny_llava.tokenizer.eos_token_id = first  # every row ends at its first token
    try:
        with pytest.raises(ValueError, match="ended before answer step 2"):
            generation_writes(tiny_llava, inputs, hooks, answer_step=2)
    finally:
        tiny_llava.tokenizer.eos_token_id = eos


def test_hook_specs_by_pattern(tiny_llava):
    """A hook given for a glob of names is a write at each of them (here blocks 1 and 2's inputs)."""
    inputs, metric = _inputs(tiny_llava), logit_diff(5, 7)
    v = torch.randn(tiny_llava.d_model, generator=torch.Generator().manual_seed(3))
    spec = [(["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"], lambda x, ctx: x + v)]
    writes, _ = hook_writes(tiny_llava, inputs, spec)
    assert list(writes) == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    paths = hook_paths(tiny_llava, inputs, spec, metric)
    assert paths.readers[0] == "L1.attn_in" and paths.all_readers == pytest.approx(paths.hooked, abs=1e-4)
