"""generate_with_cache: the values a generation computed, step by step, equal a forward pass over the sequence it
fed (teacher forcing) where the hooks act the same on every position, and follow generate's step rules where not."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from interp import ActivationCache
from interp.recording import answer_positions
from interp.steering import add_vector
from tests.conftest import random_image

NAMES = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.2.hook_resid_post", "ln_final.hook_normalized"]
SITE = "blocks.1.hook_resid_pre"


@pytest.fixture
def batch(tiny_model):
    """Rows of different lengths: one with an image, one text-only (left padding differs)."""
    size = 32 if tiny_model.arch == "llava" else 64
    return tiny_model.encode(images=[random_image(size, 1), None],
                             prompts=["what is the name of the person in this image ?", "who is he"])


def _fed(inputs, new):
    """The inputs of a teacher-forced pass over what generation fed: the prompt, then new_tokens[:, :-1]."""
    extra = new[:, :-1]
    off = torch.zeros_like(extra, dtype=torch.bool)
    return dataclasses.replace(inputs, input_ids=torch.cat([inputs.input_ids, extra], 1),
                               attention_mask=torch.cat([inputs.attention_mask, torch.ones_like(extra)], 1),
                               image_mask=torch.cat([inputs.image_mask, off], 1),
                               text_mask=torch.cat([inputs.text_mask, off], 1))


def _steer(model):
    return add_vector(3 * torch.linspace(-1, 1, model.d_model), positions="all")


def test_recorded_values_equal_a_teacher_forced_pass(tiny_model, batch):
    gen, cache = tiny_model.generate_with_cache(batch, NAMES, max_new_tokens=6)
    assert torch.equal(gen.new_tokens, tiny_model.generate(batch, max_new_tokens=6).new_tokens)
    n_prompt, n_new = batch.input_ids.shape[1], gen.new_tokens.shape[1]
    assert n_new == 6 and cache.image_mask.shape == (2, n_prompt + 5)
    _, forced = tiny_model.run_with_cache(_fed(batch, gen.new_tokens), NAMES)
    for name in NAMES:
        assert cache[name].shape == forced[name].shape, name
        mask = torch.cat([batch.attention_mask.bool(), torch.ones(2, 5, dtype=torch.bool)], 1)  # not padding
        diff = (cache[name] - forced[name])[mask].abs().max().item()
        assert diff < 1e-5, (name, diff)
    # the prompt positions are exactly what run_with_cache gives on the prompt
    _, prompt = tiny_model.run_with_cache(batch, NAMES)
    for name in NAMES:
        torch.testing.assert_close(cache[name][:, :n_prompt], prompt[name], atol=1e-5, rtol=0)
    assert torch.equal(cache.last(NAMES[0]), prompt.last(NAMES[0]))
    rows = cache.answer(NAMES[0])
    assert [r.shape[0] for r in rows] == [5, 5]  # no EOS: every fed answer token
    torch.testing.assert_close(rows[1], forced[NAMES[0]][1, n_prompt:], atol=1e-5, rtol=0)


def test_hooks_on_every_step_match_teacher_forcing_and_generate(tiny_model, batch):
    hooks = [(SITE, _steer(tiny_model))]
    gen, cache = tiny_model.generate_with_cache(batch, [SITE, "blocks.2.hook_resid_pre"], max_new_tokens=5,
                                                hooks=hooks, every_step=True)
    assert torch.equal(gen.new_tokens, tiny_model.generate(batch, 5, hooks=hooks, every_step=True).new_tokens)
    _, forced = tiny_model.run_with_cache(_fed(batch, gen.new_tokens), [SITE, "blocks.2.hook_resid_pre"],
                                          hooks=hooks)
    mask = torch.cat([batch.attention_mask.bool(), torch.ones(2, 4, dtype=torch.bool)], 1)
    for name in (SITE, "blocks.2.hook_resid_pre"):  # recorded after the hook at its own site
        assert (cache[name] - forced[name])[mask].abs().max() < 1e-5, name


def test_unmarked_hooks_act_on_the_prefill_only_as_in_generate(tiny_model, batch):
    steps = []

    def spy(x, ctx):
        steps.append(ctx.step)
        return x + 2.0

    gen, cache = tiny_model.generate_with_cache(batch, SITE, max_new_tokens=4, hooks=[(SITE, spy)])
    assert steps == [0]
    assert torch.equal(gen.new_tokens, tiny_model.generate(batch, 4, hooks=[(SITE, lambda x, c: x + 2.0)]).new_tokens)
    _, plain = tiny_model.run_with_cache(batch, SITE)
    n_prompt = batch.input_ids.shape[1]
    torch.testing.assert_close(cache[SITE][:, :n_prompt], plain[SITE] + 2.0, atol=1e-5, rtol=0)
    steps.clear()
    tiny_model.generate_with_cache(batch, SITE, max_new_tokens=4, hooks=[(SITE, spy)], every_step=True)
    assert steps == [0, 1, 2, 3]


def test_hooks_attached_on_the_torch_backend_are_recorded_after(tiny_model, batch):
    hooks = [(SITE, _steer(tiny_model))]
    with tiny_model.hooks(hooks):  # an eraser.attached block: module hooks, every step
        gen, cache = tiny_model.generate_with_cache(batch, SITE, max_new_tokens=4)
    ref_gen, ref = tiny_model.generate_with_cache(batch, SITE, max_new_tokens=4, hooks=hooks, every_step=True)
    assert torch.equal(gen.new_tokens, ref_gen.new_tokens)
    assert torch.equal(cache[SITE], ref[SITE])
    _, vanilla = tiny_model.generate_with_cache(batch, SITE, max_new_tokens=4)
    assert (cache[SITE] - vanilla[SITE]).abs().max() > 1.0  # the steering is in what was recorded


def test_vision_sites_are_kept_as_the_prefill_gave_them(tiny_model, batch):
    name = "vision.blocks.1.hook_resid_post"
    _, cache = tiny_model.generate_with_cache(batch, [name, SITE], max_new_tokens=3)
    _, prompt = tiny_model.run_with_cache(batch, [name])
    torch.testing.assert_close(cache[name], prompt[name], atol=1e-5, rtol=0)


def test_eos_ends_a_rows_answer(tiny_llava):
    inputs = tiny_llava.encode(images=[None, None], prompts=["who is he", "what is the name of this person"])
    free = tiny_llava.generate(inputs, max_new_tokens=6).new_tokens
    eos = int(free[0, 1])  # row 0 stops after its second token
    assert eos not in free[1, :5].tolist() or pytest.skip("both rows would stop")
    gen, cache = tiny_llava.generate_with_cache(inputs, SITE, max_new_tokens=6, eos_token_id=eos)
    assert gen.new_tokens[0, 1] == eos and gen.new_tokens.shape[1] == 6
    assert [r.shape[0] for r in cache.answer(SITE)] == [2, 5]  # row 0: its first token and its EOS
    assert cache.answer_mask.shape == cache.image_mask.shape


def test_answer_positions_stop_after_the_first_eos():
    new = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 2, 2]])
    mask = answer_positions(new, n_prompt=2, eos_token_id=2)
    assert mask.tolist() == [[False, False, True, True, False], [False, False, True, True, True],
                             [False, False, True, False, False]]
    assert answer_positions(new, 1, [7, 2]).tolist()[1] == [False, True, True, True]
    assert answer_positions(new, 1, None)[:, 1:].all()
    assert answer_positions(new[:, :1], 3, 2).shape == (3, 3)  # one new token: none fed back


def test_a_generation_cache_saves_and_moves_with_its_answer_mask(tiny_llava, tmp_path):
    inputs = tiny_llava.encode(images=[None], prompts=["who is he"])
    _, cache = tiny_llava.generate_with_cache(inputs, SITE, max_new_tokens=3)
    cache.save(tmp_path / "gen.safetensors")
    back = ActivationCache.load(tmp_path / "gen.safetensors")
    assert torch.equal(back.answer_mask, cache.answer_mask) and torch.equal(back[SITE], cache[SITE])
    assert torch.equal(cache.to("cpu").answer_mask, cache.answer_mask)
    _, single = tiny_llava.run_with_cache(inputs, SITE)
    assert single.answer_mask is None
    with pytest.raises(ValueError, match="one forward pass, not a generation"):
        single.answer(SITE)


def test_bad_requests_are_refused(tiny_llava):
    inputs = tiny_llava.encode(images=[random_image(32, 1)], prompts=["who is this"])
    text_only = tiny_llava.encode(images=[None], prompts=["who is this"])
    for names, match in ((["hook_logits"], "hook_logits.*not recorded while generating"),
                         (["blocks.0.attn.hook_pattern"], "not recorded while generating"),
                         (["blocks.0.hook_nope"], "blocks.0.hook_nope")):
        with pytest.raises(Exception, match=match):
            tiny_llava.generate_with_cache(inputs, names, max_new_tokens=2)
    _, cache = tiny_llava.generate_with_cache(inputs, "*", max_new_tokens=2)  # a glob leaves them out
    assert "hook_logits" not in cache and not any(n.endswith("hook_pattern") for n in cache)
    assert "vision.blocks.0.hook_resid_pre" in cache and "blocks.2.hook_resid_post" in cache
    with pytest.raises(ValueError, match="vision-side sites, but this batch has no images"):
        tiny_llava.generate_with_cache(text_only, ["vision.blocks.0.hook_resid_pre"], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        tiny_llava.generate_with_cache(inputs, SITE, max_new_tokens=0)
    with tiny_llava.hooks([(SITE, lambda x, c: None)], backend="nnsight"):
        with pytest.raises(ValueError, match="backend='nnsight'"):
            tiny_llava.generate_with_cache(inputs, SITE, max_new_tokens=2)
