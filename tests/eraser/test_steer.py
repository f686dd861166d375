"""Answer steering (``EraserConfig.answer_steps``): the first generated tokens steered with the prefill's gate."""
from __future__ import annotations

import pytest
import torch

from eraser import ArtifactError, EraserConfig, MLLMEraser
from eraser.direction import first_answer_means
from interp.hooks import plan_last_step
from tests.conftest import random_image
from tests.eraser.test_method import _queries

NAME = "blocks.2.hook_resid_pre"


@pytest.fixture(scope="module")
def answering(tiny_llava):
    forget = _queries(12, 1, 100, text_only_every=0)
    retain = _queries(60, 2, 200)
    recall, erase = _queries(6, 3, 300), _queries(6, 4, 400)
    config = EraserConfig(rho=0.5, gamma=1e-3, strength=-4.0, batch_size=16, answer_steps=2, answer_prefix="who")
    eraser = MLLMEraser.fit(tiny_llava, forget, retain, recall, erase, config)
    stacked = MLLMEraser.fit(tiny_llava, forget, retain, recall, erase,
                             EraserConfig(layers=(2,), gate_stack=(1, 2), gate_read="mean", rho=0.5, gamma=1e-3,
                                          strength=-4.0, batch_size=16, answer_steps=2, answer_prefix="who"))
    return eraser, stacked, forget, recall, erase


def test_answer_direction_is_read_one_token_into_the_forced_answer(answering, tiny_llava):
    eraser, _, _, recall, erase = answering
    imgs, prompts = zip(*recall)
    means = first_answer_means(tiny_llava, imgs, prompts, [NAME], "who", batch_size=4)
    # the same position read by hand from a longer forced answer: causal, so what follows does not matter
    enc = tiny_llava.encode(images=list(imgs), prompts=list(prompts), answers=["who is this"] * len(prompts))
    _, cache = tiny_llava.run_with_cache(enc, names=[NAME])
    by_hand = cache[NAME][torch.arange(len(prompts)), enc.last_index + 1].double().mean(0)
    torch.testing.assert_close(means[NAME], by_hand, rtol=1e-5, atol=1e-5)
    e_imgs, e_prompts = zip(*erase)
    expected = by_hand - first_answer_means(tiny_llava, e_imgs, e_prompts, [NAME], "who")[NAME]
    assert eraser.d_answer.shape == eraser.d.shape
    torch.testing.assert_close(eraser.d_answer[1].double(), expected, rtol=1e-4, atol=1e-4)
    assert (eraser.d_answer - eraser.d).abs().max() > 1e-3  # another direction than the prompt's
    with pytest.raises(ValueError, match="empty"):
        first_answer_means(tiny_llava, [], [], [NAME], "who")
    with pytest.raises(ValueError, match="prefix"):
        first_answer_means(tiny_llava, imgs, prompts, [NAME], " ")


@pytest.mark.parametrize("which", ["per_layer", "stacked"])
def test_generated_tokens_are_steered_for_answer_steps_only(answering, tiny_llava, which):
    """The eraser's decode steps equal hand-written hooks adding strength * prefill gate * d_answer at steps 1-2."""
    eraser = answering[0] if which == "per_layer" else answering[1]
    forget = answering[2]
    inputs = tiny_llava.encode(images=[q[0] for q in forget[:3]], prompts=[q[1] for q in forget[:3]])
    last = eraser.config.hook_name(eraser.layers[-1])

    def run(hooks):
        seen: list = []
        with tiny_llava.hooks(hooks + [(last, lambda x, ctx: seen.append((ctx.step, x[:, -1].clone())))]):
            out = tiny_llava.generate(inputs, max_new_tokens=5, eos_token_id=None)
        return out.sequences, seen

    record: list = []
    seq, seen = run(eraser.hooks(record=record))
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4] and {step for _, step, _ in record} == {0}

    by_hand_record: list = []

    def answer_hook(i):
        def hook(x, ctx):
            if 1 <= ctx.step <= 2:
                g = [g for layer, _, g in by_hand_record if layer == eraser.layers[i]][0]
                return x + (-4.0 * g)[:, None, None] * eraser.d_answer[i]
            return None
        return hook

    prefill = eraser.with_config(answer_steps=0)
    by_hand = prefill.hooks(record=by_hand_record) + [
        (eraser.config.hook_name(l), answer_hook(i)) for i, l in enumerate(eraser.layers)]
    seq_hand, seen_hand = run(by_hand)
    assert torch.equal(seq, seq_hand)
    for (s1, x1), (s2, x2) in zip(seen, seen_hand):
        torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-4)
    # prefill-only steering leaves the decode steps alone: step 1 differs (same token in, no answer push)
    _, seen_plain = run(prefill.hooks())
    assert torch.equal(seen_plain[0][1], seen[0][1])
    assert (seen_plain[1][1] - seen[1][1]).abs().max() > 1e-3
    if which == "stacked":  # one steered layer: the shift at its input is exactly the answer push
        torch.testing.assert_close(seen[1][1] - seen_plain[1][1], (-4.0 * record[0][2])[:, None] * eraser.d_answer[0],
                                   rtol=1e-3, atol=1e-3)
    # the nnsight graph applies the same steering, whether or not generate is asked to visit every step: the
    # answer hooks are marked first_steps(fn, 2), and a plain generate honours the mark
    with eraser.attached(tiny_llava, backend="nnsight"):
        graph = tiny_llava.generate(inputs, max_new_tokens=5, eos_token_id=None, every_step=True)
        plain = tiny_llava.generate(inputs, max_new_tokens=5, eos_token_id=None)
    assert torch.equal(graph.sequences, seq) and torch.equal(plain.sequences, seq)
    direct = tiny_llava.generate(inputs, max_new_tokens=5, eos_token_id=None, hooks=eraser.hooks())
    assert torch.equal(direct.sequences, seq)
    # both backends stop dispatching after the last answer step (the hooks say so), and after prefill without
    assert plan_last_step(fn for _, fn in eraser.hooks()) == 2
    assert plan_last_step(fn for _, fn in prefill.hooks()) == 0


def test_answer_directions_round_trip_and_are_required(answering, tiny_llava, tmp_path):
    eraser, stacked, forget, _, _ = answering
    for e, name in ((eraser, "a"), (stacked, "s")):
        back = MLLMEraser.load(e.save(tmp_path / f"{name}.safetensors"), tiny_llava)
        assert back.config.answer_steps == 2 and torch.equal(back.d_answer, e.d_answer)
    d = tiny_llava.d_model
    assert eraser.nbytes == 3 * 2 * d * 4  # w, d and d_answer, per steered layer
    # as dense matrices (the release's form): S = w d^T and S_answer = w d_answer^T, d x d each, per layer
    assert eraser.release_form_nbytes == 2 * 2 * d * d * 4
    # the stacked gate: one 2d-wide gate, one steered layer, a direction and an answer direction: 4d floats,
    # against a 2d x d matrix for each direction
    assert stacked.nbytes == (2 * d + 2 * d) * 4 and stacked.release_form_nbytes == 2 * (2 * d * d) * 4
    bare = MLLMEraser(eraser.layers, eraser.w, eraser.d, eraser.config, eraser.fingerprint)
    bare.save(tmp_path / "bare.safetensors")
    with pytest.raises(ArtifactError, match="answer directions"):
        MLLMEraser.load(tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="no answer directions"):
        bare.hooks()
    assert bare.with_config(answer_steps=0).hooks()  # without answer steering it needs none
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="answer_steps"):
            EraserConfig(answer_steps=bad)
    with pytest.raises(ValueError, match="answer_prefix"):
        EraserConfig(answer_steps=1, answer_prefix="")


ANSWERS = ["who is this", "a", "the person in the image is a red cat"]


def test_teacher_forced_answers_leave_the_prefill_gate_alone(answering, tiny_llava):
    """From a mutation audit: the gate read at the last position instead of ``last_index`` went unnoticed, since
    no test scored answers under the eraser (answer_prob, forget quality).  With answers appended the gate read
    at the last prompt token must equal the gate without them."""
    eraser, _, forget, _, _ = answering
    imgs, prompts = [q[0] for q in forget[:3]], [q[1] for q in forget[:3]]
    enc = tiny_llava.encode(images=imgs, prompts=prompts, answers=ANSWERS)
    enc0 = tiny_llava.encode(images=imgs, prompts=prompts)
    assert not torch.equal(enc.last_index, torch.full((3,), enc.input_ids.shape[1] - 1))
    gates = []
    for e in (enc, enc0):
        rec: list = []
        tiny_llava.run_with_hooks(e, eraser.hooks(record=rec))
        assert [(layer, step) for layer, step, _ in rec] == [(1, 0), (2, 0)]
        gates.append(torch.stack([g for _, _, g in rec]))
    assert gates[1].abs().min() > 1e-2  # the gates are not trivially zero
    torch.testing.assert_close(gates[0], gates[1], rtol=1e-5, atol=1e-5)


def test_gated_hook_steers_prompt_positions_only(tiny_llava):
    """From a mutation audit: steering the teacher-forced answer tokens (or padding), or reading the gate at the
    last position, went unnoticed.  Prompt positions move by strength * (w . x[b, last_index[b]]) * d; answer
    and padding positions stay bit for bit."""
    from eraser.steer import gated_hook
    from interp.hooks import HookContext

    enc = tiny_llava.encode(images=[random_image(32, 0), None, random_image(32, 1)],
                            prompts=["who is this person", "tell me the city", "who"], answers=ANSWERS)
    b_n, n_pos = enc.input_ids.shape
    d = tiny_llava.d_model
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b_n, n_pos, d, generator=gen)
    w, direction = torch.randn(d, generator=gen) / d ** 0.5, torch.randn(d, generator=gen)
    rec: list = []
    out = gated_hook(w, direction, -1.0, record=rec)(x, HookContext("blocks.1.hook_resid_pre", 1, 0, enc))
    gates = torch.stack([x[b, enc.last_index[b]] @ w for b in range(b_n)])
    assert len(rec) == 1 and (rec[0][0], rec[0][1]) == (1, 0)
    torch.testing.assert_close(rec[0][2], gates)
    n_prompt = n_answer = n_pad = 0
    for b in range(b_n):
        for t in range(n_pos):
            if not enc.attention_mask[b, t]:
                n_pad += 1
                assert torch.equal(out[b, t], x[b, t])
            elif t > enc.last_index[b]:
                n_answer += 1
                assert torch.equal(out[b, t], x[b, t])
            else:
                n_prompt += 1
                torch.testing.assert_close(out[b, t] - x[b, t], -gates[b] * direction, rtol=1e-5, atol=1e-5)
    assert n_pad > 0 and n_answer == int((enc.labels != -100).sum()) > 0 and n_prompt > 0
    # the steering preceding a padded row is not the whole batch's: the gates differ per row
    assert (gates[0] - gates[1]).abs() > 1e-3
