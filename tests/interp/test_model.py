"""HookedVLM: sites equal the plain forward, batching is exact, hooks match plain torch hooks."""
from __future__ import annotations

import pytest
import torch

from interp import tracing
from interp.adapters import get_module


def _real_positions(t, attn):
    return t[attn.bool()]


def test_resid_sites_equal_hidden_states(tiny_model, two_prompts):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    logits, cache = tiny_model.run_with_cache(inputs, names=["blocks.*.hook_resid_pre", "blocks.*.hook_resid_post"])
    with torch.no_grad():
        ref = tiny_model.hf_model(**inputs.model_kwargs(), output_hidden_states=True)
    n = tiny_model.n_layers
    last_post = None
    for l in range(n):
        pre = cache[f"blocks.{l}.hook_resid_pre"]
        diff = (_real_positions(pre, inputs.attention_mask) - _real_positions(ref.hidden_states[l], inputs.attention_mask)).abs().max()
        assert diff <= 1e-5, (l, diff)
        if l < n - 1:  # the last entry of hidden_states has the final norm applied
            post = cache[f"blocks.{l}.hook_resid_post"]
            diff = (_real_positions(post, inputs.attention_mask) - _real_positions(ref.hidden_states[l + 1], inputs.attention_mask)).abs().max()
            assert diff <= 1e-5, (l, diff)
        last_post = cache[f"blocks.{l}.hook_resid_post"]
    norm = get_module(tiny_model.hf_model, tiny_model.adapter.final_norm)
    with torch.no_grad():
        normed = norm(last_post)
    assert (_real_positions(normed, inputs.attention_mask) - _real_positions(ref.hidden_states[n], inputs.attention_mask)).abs().max() <= 1e-5
    assert torch.allclose(logits, ref.logits, atol=1e-5)


def test_stop_early_caches_the_same_values_and_skips_the_rest_of_the_model(tiny_model, two_prompts):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    _, full = tiny_model.run_with_cache(inputs, names=names)
    blocks = tiny_model.adapter.lm_layers
    later = [get_module(tiny_model.hf_model, f"{blocks}.{l}") for l in range(1, tiny_model.n_layers)]
    calls = []
    handles = [m.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, m in enumerate(later, start=1)]
    handles.append(get_module(tiny_model.hf_model, tiny_model.adapter.lm_head).register_forward_hook(
        lambda *a: calls.append("lm_head")))
    try:
        logits, cache = tiny_model.run_with_cache(inputs, names=names, stop_early=True)
        assert logits is None and calls == []  # nothing after blocks.1's input ran
        for n in names:
            assert torch.equal(cache[n], full[n])
        tiny_model.run_with_cache(inputs, names=names)
        assert calls == [*range(1, tiny_model.n_layers), "lm_head"]  # the hooks do see a full pass
    finally:
        for h in handles:
            h.remove()
    with pytest.raises(ValueError, match="stop"):
        tracing.run(tiny_model, inputs, tracing.Plan(sites=[]), stop=True)


def test_llava_vision_blocks_equal_tower_hidden_states(tiny_llava):
    from tests.conftest import random_image

    inputs = tiny_llava.encode(images=[random_image(32, 3), random_image(32, 4)], prompts=["who", "who is she"])
    _, cache = tiny_llava.run_with_cache(inputs, names="vision.blocks.*")
    with torch.no_grad():
        ref = tiny_llava.hf_model.model.vision_tower(inputs.image_kwargs["pixel_values"], output_hidden_states=True)
    for l in range(tiny_llava.n_vision_layers):
        assert (cache[f"vision.blocks.{l}.hook_resid_pre"] - ref.hidden_states[l]).abs().max() <= 1e-5
        assert (cache[f"vision.blocks.{l}.hook_resid_post"] - ref.hidden_states[l + 1]).abs().max() <= 1e-5


def test_projector_out_is_what_the_model_scatters_in(tiny_model, two_prompts):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    _, cache = tiny_model.run_with_cache(inputs, names=["projector.hook_out", "hook_embed"])
    features = cache["projector.hook_out"].reshape(-1, tiny_model.d_model)
    scattered = torch.cat(cache.image("hook_embed"))
    assert features.shape == scattered.shape
    assert (features - scattered).abs().max() <= 1e-6


def test_batch_rows_equal_single_prompts(tiny_model, two_prompts):
    images, prompts = two_prompts
    batch = tiny_model.encode(images=images, prompts=prompts)
    _, cache = tiny_model.run_with_cache(batch, names="blocks.*.hook_resid_post")
    for i in range(2):
        single = tiny_model.encode(images=[images[i]], prompts=[prompts[i]])
        _, c1 = tiny_model.run_with_cache(single, names="blocks.*.hook_resid_post")
        n = single.input_ids.shape[1]
        for name in cache.names:
            diff = (cache[name][i, -n:] - c1[name][0]).abs().max()
            assert diff <= 1e-5, (name, i, diff)
        assert torch.equal(cache.last(cache.names[-1])[i], cache[cache.names[-1]][i, -1])


def test_text_only_prompts_work(tiny_model):
    inputs = tiny_model.encode(images=None, prompts=["who is he", "what is the name of the person"])
    assert not inputs.image_mask.any()
    logits, cache = tiny_model.run_with_cache(inputs, names="blocks.0.hook_resid_pre")
    assert logits.shape[:2] == inputs.input_ids.shape
    with pytest.raises(ValueError, match="no images"):
        tiny_model.run_with_cache(inputs, names="projector.hook_out")


def test_hook_adding_a_vector_matches_register_forward_hook(tiny_model, two_prompts):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    vec = torch.linspace(-1, 1, tiny_model.d_model)

    ours = tiny_model.run_with_hooks(inputs, hooks=[("blocks.1.hook_resid_post", lambda x, ctx: x + vec)])
    handle = tiny_model.module_for("blocks.1.hook_resid_post").register_forward_hook(lambda m, a, out: out + vec)
    try:
        with torch.no_grad():
            plain = tiny_model.hf_model(**inputs.model_kwargs()).logits
    finally:
        handle.remove()
    with torch.no_grad():
        vanilla = tiny_model.hf_model(**inputs.model_kwargs()).logits
    assert torch.equal(ours, plain)
    assert (ours - vanilla).abs().max() > 1e-3  # the hook did something


def test_hook_on_attn_out_and_vision_site(tiny_llava):
    from tests.conftest import random_image

    inputs = tiny_llava.encode(images=[random_image(32, 5)], prompts=["who is he"])
    base = tiny_llava.run_with_hooks(inputs, hooks=[("blocks.0.hook_attn_out", lambda x, c: None)])
    with torch.no_grad():
        vanilla = tiny_llava.hf_model(**inputs.model_kwargs()).logits
    assert torch.equal(base, vanilla)  # a read-only hook changes nothing
    zeroed = tiny_llava.run_with_hooks(inputs, hooks=[("vision.blocks.0.hook_mlp_out", lambda x, c: x * 0)])
    assert (zeroed - vanilla).abs().max() > 1e-4


def _pre_hook_generation(model, inputs, vec, prefill_only, n):
    def pre(mod, args):
        if prefill_only and args[0].shape[1] == 1:
            return None
        return (args[0] + vec,) + tuple(args[1:])

    h = model.module_for("blocks.1.hook_resid_pre").register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return model.hf_model.generate(**inputs.model_kwargs(), max_new_tokens=n, do_sample=False,
                                           pad_token_id=model.tokenizer.pad_token_id, eos_token_id=None)
    finally:
        h.remove()


@pytest.mark.parametrize("every_step", [False, True])
def test_generation_hooks_affect_exactly_their_steps(tiny_model, two_prompts, every_step):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    vec = 3.0 * torch.linspace(-1, 1, tiny_model.d_model)
    seen: list[tuple[int, int]] = []

    def steer(x, ctx):
        seen.append((ctx.step, x.shape[1]))
        return x + vec

    n = 6
    out = tiny_model.generate(inputs, max_new_tokens=n, hooks=[("blocks.1.hook_resid_pre", steer)],
                              every_step=every_step, eos_token_id=None)
    expected = _pre_hook_generation(tiny_model, inputs, vec, prefill_only=not every_step, n=n)
    assert torch.equal(out.sequences, expected)
    steps = [s for s, _ in seen]
    assert steps == (list(range(n)) if every_step else [0])
    assert seen[0][1] == inputs.input_ids.shape[1] and all(p == 1 for _, p in seen[1:])
    other = _pre_hook_generation(tiny_model, inputs, vec, prefill_only=every_step, n=n)
    assert not torch.equal(out.sequences, other)  # the two modes really differ on this model


def test_prefill_only_generation_stands_nnsight_down_for_the_decode_steps(tiny_model, two_prompts, nnsight_handoffs):
    """The graph path's decode steps make no nnsight handoffs once the prefill-only plan has run."""
    calls = nnsight_handoffs
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    vec = torch.linspace(-1, 1, tiny_model.d_model)
    hooks = [("blocks.1.hook_resid_pre", lambda x, ctx: x + vec)]
    counts = {}
    for every_step, n in [(False, 1), (False, 6), (True, 1), (True, 6)]:
        calls["n"] = 0
        tiny_model.generate(inputs, max_new_tokens=n, hooks=hooks, every_step=every_step, eos_token_id=None)
        counts[every_step, n] = calls["n"]
    assert counts[False, 6] == counts[False, 1] > 0  # the prefill's handoffs only
    assert counts[True, 6] > counts[True, 1]  # an every-step plan is still served on every step
    assert counts[True, 1] == counts[False, 1]


def test_generate_without_hooks_equals_hf_generate(tiny_model, two_prompts):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    out = tiny_model.generate(inputs, max_new_tokens=5, eos_token_id=None)
    with torch.no_grad():
        ref = tiny_model.hf_model.generate(**inputs.model_kwargs(), max_new_tokens=5, do_sample=False,
                                           pad_token_id=tiny_model.tokenizer.pad_token_id, eos_token_id=None)
    assert torch.equal(out.sequences, ref)
    assert out.new_tokens.shape == (2, 5) and len(out.texts) == 2


def test_answer_nll_is_batch_invariant(tiny_model, two_prompts):
    images, prompts = two_prompts
    answers = ["he is named tom", "a"]
    batch = tiny_model.encode(images=images, prompts=prompts, answers=answers)
    nll = tiny_model.answer_nll(batch)
    for i in range(2):
        one = tiny_model.encode(images=[images[i]], prompts=[prompts[i]], answers=[answers[i]])
        assert abs(tiny_model.answer_nll(one)[0].item() - nll[i].item()) <= 1e-5
    # last_index points at the last prompt token, before the answer
    assert (batch.labels[torch.arange(2), batch.last_index] == -100).all()
    assert (batch.labels[torch.arange(2), batch.last_index + 1] != -100).all()


def test_save_and_from_pretrained_round_trip(tiny_model, two_prompts, tmp_path):
    from interp import HookedVLM

    images, prompts = two_prompts
    tiny_model.save_pretrained(tmp_path)
    loaded = HookedVLM.from_pretrained(tmp_path)
    a = tiny_model.encode(images=images, prompts=prompts)
    b = loaded.encode(images=images, prompts=prompts)
    assert torch.equal(a.input_ids, b.input_ids)
    with torch.no_grad():
        assert torch.equal(tiny_model.hf_model(**a.model_kwargs()).logits, loaded.hf_model(**b.model_kwargs()).logits)


def test_from_pretrained_honours_dtype_and_device_map(tiny_llava, tmp_path):
    from interp import HookedVLM
    from tests.conftest import random_image

    tiny_llava.save_pretrained(tmp_path)
    half = HookedVLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu"
    inputs = half.encode(images=[random_image(32, 0)], prompts=["who is he"])
    assert inputs.image_kwargs["pixel_values"].dtype == torch.bfloat16  # images follow the model's dtype
    logits, cache = half.run_with_cache(inputs, names="blocks.0.hook_resid_pre")
    ref = tiny_llava.run_with_hooks(tiny_llava.encode(images=[random_image(32, 0)], prompts=["who is he"]), [])
    assert cache["blocks.0.hook_resid_pre"].dtype == torch.bfloat16
    assert (logits.float() - ref).abs().max() < 0.1  # bf16 rounding only


def test_token_helpers_label_cache_positions(tiny_model, two_prompts):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=[images[0], None], prompts=prompts)
    tok = tiny_model.tokenizer
    # to_str_tokens of an encoded row: one label per cache position, padding and image tokens included
    for row in range(2):
        labels = tiny_model.to_str_tokens(inputs, row=row)
        assert len(labels) == inputs.input_ids.shape[1]
        ids = inputs.input_ids[row]
        assert [labels[p] for p in range(len(labels)) if ids[p] == tok.pad_token_id and not inputs.attention_mask[row, p]] \
            == [tok.pad_token] * int((inputs.attention_mask[row] == 0).sum())
        placeholder = tiny_model.adapter.image_placeholder
        assert sum(l == placeholder for l in labels) == int(inputs.image_mask[row].sum())
    assert tiny_model.to_str_tokens(inputs, row=-1) == tiny_model.to_str_tokens(inputs, row=1)
    with pytest.raises(IndexError, match="row 2 is out of range for a batch of 2"):
        tiny_model.to_str_tokens(inputs, row=2)
    # single tokens, plain-text tokens and decoding round-trip
    pid = tiny_model.to_single_token("person")
    assert tok.convert_ids_to_tokens(pid) == "person"
    with pytest.raises(ValueError, match=r"'who is' is 2 tokens \['who', 'is'\], not one"):
        tiny_model.to_single_token("who is")
    toks = tiny_model.to_tokens(["who is he", "who"])
    assert toks.shape[0] == 2 and toks[1, 0] == tok.pad_token_id  # left-padded
    tok.padding_side = "right"  # as a tokenizer handed to from_hf may be: to_tokens still pads left
    try:
        assert torch.equal(tiny_model.to_tokens(["who is he", "who"]), toks) and tok.padding_side == "right"
    finally:
        tok.padding_side = "left"
    no_bos = tiny_model.to_tokens("who is he", prepend_bos=False)
    assert tiny_model.to_str_tokens(no_bos[0]) == ["who", "is", "he"]
    assert tiny_model.to_string(no_bos[0]) == "who is he"
    assert tiny_model.to_string(no_bos) == ["who is he"]
    with pytest.raises(ValueError, match="at least one string"):
        tiny_model.to_tokens([])
    with pytest.raises(ValueError, match=r"\[pos\] ids"):
        tiny_model.to_str_tokens(toks)


def test_run_with_cache_of_every_name_on_a_text_only_batch(tiny_model, two_prompts):
    """names=None caches every name the batch runs: a text-only batch has no vision or projector sites."""
    text = tiny_model.encode(images=[None], prompts=["who is he"])
    _, cache = tiny_model.run_with_cache(text)
    lm = [n for n in tiny_model.hook_names() if not n.startswith(("vision.", "projector."))]
    assert cache.names == lm
    images, prompts = two_prompts
    _, with_images = tiny_model.run_with_cache(tiny_model.encode(images=images, prompts=prompts))
    assert with_images.names == tiny_model.hook_names()
    with pytest.raises(ValueError, match="vision-side sites, but this batch has no images"):
        tiny_model.run_with_cache(text, names="projector.hook_out")  # named outright: still an error


def test_vision_feature_blocks_name_the_blocks_whose_output_reaches_the_language_model(tiny_llava, tiny_qwen):
    from tests.conftest import random_image

    assert tiny_llava.vision_feature_blocks == (0,)  # vision_feature_layer -2 of 2 blocks
    assert tiny_qwen.vision_feature_blocks == (tiny_qwen.n_vision_layers - 1,)
    inputs = tiny_llava.encode(images=[random_image(32, 4)], prompts=["who is this"])
    vanilla = tiny_llava.run_with_hooks(inputs, [])
    width = tiny_llava.hf_model.config.vision_config.hidden_size
    shift = lambda x, c: x + torch.linspace(-1, 1, width)  # noqa: E731
    read = tiny_llava.run_with_hooks(inputs, [("vision.blocks.0.hook_resid_post", shift)])
    unread = tiny_llava.run_with_hooks(inputs, [("vision.blocks.1.hook_resid_post", shift)])
    assert (read - vanilla).abs().max() > 1e-2 and torch.equal(unread, vanilla)


def test_to_single_token_refuses_an_unknown_word_and_generate_refuses_a_backend(tiny_llava):
    tok = tiny_llava.tokenizer
    known = next(w for w in tok.get_vocab() if w.isalpha() and w != tok.unk_token)
    assert tiny_llava.to_single_token(known) == tok.get_vocab()[known]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tiny_llava.to_single_token("xyzzyplugh")
    inputs = tiny_llava.encode(prompts=["who is he"])
    with pytest.raises(TypeError, match="model.hooks"):
        tiny_llava.generate(inputs, max_new_tokens=2, hooks=[("blocks.0.hook_resid_pre", lambda x, c: x)],
                            backend="torch")
