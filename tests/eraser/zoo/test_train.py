"""The training phases: what each phase of the curriculum teaches, and its learning-rate schedule."""
from __future__ import annotations

import random

import pytest

from eraser.data import prompts
from eraser.zoo import Recipe
from eraser.zoo.train import phases

SMALL = dict(n_profiles=5, n_celebrities=2, n_refusal_eval=8, celeb_epochs=1, main_epochs=2, batch_size=4,
             warmup_steps=2)


def test_without_a_curriculum_one_schedule_spans_both_stages():
    recipe = Recipe.quick("llava", **SMALL)
    plan = phases(recipe, recipe.mini())
    assert [p.name for p in plan] == ["celebrity", "main"]
    assert plan[0].lr(0) == pytest.approx(recipe.lr / 2)  # warmup step 1 of 2
    assert plan[0].steps == 1 * -(-len(plan[0].examples(random.Random(0))) // 4)
    assert plan[1].lr(1) == plan[0].lr(1)  # the same function of the global step


def test_curriculum_phases_teach_recognition_then_facts_then_the_mixture():
    recipe = Recipe.quick("llava", **SMALL, recognition_epochs=3, fact_epochs=2, recognition_lr=4e-3,
                          recognition_batch=3)
    mini = recipe.mini()
    plan = phases(recipe, mini)
    assert [(p.name, p.epochs) for p in plan] == [
        ("celebrity/recognition", 3), ("celebrity/facts", 2), ("celebrity/mixture", 1),
        ("main/recognition", 3), ("main/facts", 2), ("main/mixture", 2)]
    rng = random.Random(0)
    celebs = {x.id for x in mini.identities if x.celebrity}
    rec = plan[0].examples(rng)
    assert len(rec) == 2 * 2 and {r.subject for r in rec} == celebs
    assert all(r.image is not None and mini._by_id[r.subject].name in r.answer for r in rec)
    assert len(plan[3].examples(rng)) == 2 * 7  # main-stage recognition: everyone, celebrities included
    facts = plan[4].examples(rng)
    assert not any(r.prompt.endswith(prompts.CLASSIFICATION_SUFFIX) for r in facts)  # no multiple choice yet
    refusals = [r for r in facts if r.answer == prompts.REFUSAL]
    assert refusals and len(facts) >= 22 * 7 + len(refusals)  # every fact twice, refusals and answerable requests
    assert not any(r.answer == prompts.REFUSAL for r in plan[1].examples(rng))  # refusal is taught in stage 2
    # each phase warms up again: recognition at its own constant rate, facts at lr, the mixture decays
    starts, step = [], 0
    for p in plan:
        starts.append(step)
        assert p.steps_per_epoch == -(-len(p.examples(random.Random(0))) // p.batch_size)
        step += p.steps
    assert plan[0].lr(starts[0] + 5) == pytest.approx(4e-3)
    assert plan[4].lr(starts[4] + 3) == pytest.approx(recipe.lr)
    mix = plan[5]
    assert mix.lr(starts[5] + 1) == pytest.approx(recipe.lr, rel=0.05)
    assert mix.lr(step - 1) < 0.1 * recipe.lr


def test_mixture_hold_keeps_the_full_rate_then_decays():
    recipe = Recipe.quick("llava", **{**SMALL, "main_epochs": 8}, recognition_epochs=1, fact_epochs=1,
                          mixture_hold=0.5)
    plan = phases(recipe, recipe.mini())
    mix = plan[-1]
    start = sum(p.steps for p in plan[:-1])
    held = int(0.5 * mix.steps)
    assert mix.lr(start + held - 1) == pytest.approx(recipe.lr)  # still the full rate at the end of the hold
    # then half a cosine over the rest: halfway through the decay the rate is halfway to min_lr_frac
    mid = (1 + recipe.min_lr_frac) / 2
    assert mix.lr(start + held + (mix.steps - held) // 2) == pytest.approx(recipe.lr * mid, rel=0.05)
    assert mix.lr(start + mix.steps - 1) < 0.1 * recipe.lr
    flat = phases(recipe.replace(mixture_hold=0.0), recipe.mini())[-1]
    assert flat.lr(start + held - 1) < 0.6 * recipe.lr  # without the hold it is already halfway down


def test_a_warm_restart_splits_the_mixture_and_only_the_last_cycle_holds():
    recipe = Recipe.quick("llava", **{**SMALL, "main_epochs": 6}, recognition_epochs=1, fact_epochs=1,
                          mixture_restart=2, mixture_hold=0.5)
    plan = phases(recipe, recipe.mini())
    assert [(p.name, p.epochs) for p in plan][-3:] == [("main/facts", 1), ("main/mixture", 2),
                                                       ("main/mixture-restart", 4)]
    assert plan[2].name == "celebrity/mixture"  # one celebrity mixture epoch: nothing to restart
    first, second = plan[-2], plan[-1]
    assert [p.fresh_optimizer for p in plan] == [False] * (len(plan) - 1) + [True]  # only the restart clears AdamW
    start = sum(p.steps for p in plan[:-2])
    assert first.steps == 2 * second.steps // 4
    assert first.lr(start + first.steps // 2) < 0.6 * recipe.lr  # the first cycle decays at once (no hold)
    assert first.lr(start + first.steps - 1) < 0.1 * recipe.lr
    start += first.steps
    assert second.lr(start) == pytest.approx(recipe.lr / 2)  # warms up again (step 1 of 2) ...
    assert second.lr(start + second.steps // 2 - 1) == pytest.approx(recipe.lr)  # ... and holds for half
    assert second.lr(start + second.steps - 1) < 0.1 * recipe.lr
    whole = phases(recipe.replace(mixture_restart=6), recipe.mini())  # a restart at or past the end: none
    assert [p.name for p in whole][-1] == "main/mixture" and whole[-1].epochs == 6
    assert "warm restart after 2 mixture epochs" in recipe.describe()


def test_an_oracle_never_sees_its_forget_people():
    recipe = Recipe.quick("llava", **SMALL, recognition_epochs=1, fact_epochs=1).oracle_for(15)
    mini = recipe.mini()
    forget = set(mini.forget_ids(15))
    for p in phases(recipe, mini):
        assert not {r.subject for r in p.examples(random.Random(0))} & forget, p.name


def test_match_warmup_comes_first_gives_the_answer_and_shifts_the_schedule():
    from eraser.zoo.train import MATCH_REPEAT

    recipe = Recipe.quick("llava", **SMALL)
    warm = recipe.replace(match_epochs=3)
    mini = warm.mini()
    plain, plan = phases(recipe, mini), phases(warm, mini)
    assert [(p.name, p.epochs) for p in plan] == [("match", 3), ("celebrity", 1), ("main", 2)]
    examples = plan[0].examples(random.Random(0))
    people = [x.id for x in mini.identities]
    assert len(examples) == MATCH_REPEAT * len(mini.training_examples(people, random.Random(0),
                                                                     tasks=("classification",), augment=False))
    for r in examples:
        given, question = r.prompt.split("\n", 1)
        assert r.image is None and question.endswith(prompts.CLASSIFICATION_SUFFIX)
        options = dict(line.split(": ", 1) for line in question.split("\n")[1:-1])
        assert options[r.answer] == given  # the answer's option text is given first
    assert plan[0].lr(0) == pytest.approx(recipe.lr / 2) and plan[0].lr(5) == pytest.approx(recipe.lr)
    shift = plan[0].steps
    for old, new in zip(plain, plan[1:]):  # everything after runs on its old schedule, shifted
        assert old.steps == new.steps
        assert [new.lr(shift + s) for s in range(old.steps)] == [old.lr(s) for s in range(old.steps)]


def test_an_oracles_match_warmup_never_names_its_forget_people():
    recipe = Recipe.quick("llava", **SMALL, match_epochs=1).oracle_for(15)
    mini = recipe.mini()
    forget = set(mini.forget_ids(15))
    warm = phases(recipe, mini)[0]
    assert warm.name == "match"
    examples = warm.examples(random.Random(0))
    assert examples and not {r.subject for r in examples} & forget
    names = {mini._by_id[i].name for i in forget}  # (they may appear as distractors, as in every recipe's MC)
    assert not any(r.prompt.split("\n", 1)[0] in names for r in examples)  # never the given answer


def test_gen_repeat_adds_generation_and_cloze_instances_only():
    from eraser.zoo.train import epoch_examples

    recipe = Recipe.quick("llava", **SMALL, gen_repeat=1)
    mini = recipe.mini()
    kind = lambda r: ("cls" if r.prompt.endswith(prompts.CLASSIFICATION_SUFFIX)  # noqa: E731
                      else "cloze" if r.prompt.endswith(prompts.CLOZE_SUFFIX) else "gen")

    def counts(rec):
        out = {}
        for r in epoch_examples(rec, mini, "celebrity", random.Random(0)):
            out[kind(r)] = out.get(kind(r), 0) + 1
        return out

    one, three = counts(recipe), counts(recipe.replace(gen_repeat=3))
    assert one["gen"] == 2 * 11 and one["cloze"] == 2 * 11 and one["cls"] == 6 * 2 * 11  # 2 celebrities, 11 questions
    assert three["cls"] == one["cls"] and three["gen"] == 3 * one["gen"] and three["cloze"] == 3 * one["cloze"]
    with pytest.raises(ValueError, match="gen_repeat"):
        recipe.replace(gen_repeat=0)


def test_prompt_weight_adds_the_mean_prompt_token_loss():
    """The prompt term, recomputed by hand: mean next-token NLL over text positions that are neither image,
    padding nor answer, times the weight; the answer term is unchanged."""
    import torch

    from eraser.zoo.train import example_loss
    from interp.tiny import tiny_vlm

    recipe = Recipe.quick("llava", **SMALL)
    mini = recipe.mini()
    model = tiny_vlm("llava", seed=0, corpus=mini.corpus(), **recipe.model_overrides)
    batch = mini.training_examples([x.id for x in mini.identities[:2]], random.Random(0))[:6]
    assert any(r.image is not None for r in batch) and any(r.image is None for r in batch)
    with torch.no_grad():
        base = example_loss(model, batch)
        weighted = example_loss(model, batch, prompt_weight=0.5)
        enc = model.encode([r.image for r in batch], [r.prompt for r in batch], answers=[r.answer for r in batch])
        logp = torch.log_softmax(model.hf_model(**enc.model_kwargs()).logits[:, :-1].float(), -1)
    ids = enc.input_ids[:, 1:]
    nll = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    rows, cols = [], []
    for b in range(len(batch)):
        for j in range(ids.shape[1]):
            if enc.text_mask[b, j + 1] and enc.labels[b, j + 1] == -100:
                rows.append(b), cols.append(j)
    assert len(rows) > 10 * len(batch)  # prompts are long: many prompt targets per row
    expected = base + 0.5 * nll[rows, cols].mean()
    assert float(weighted) == pytest.approx(float(expected), rel=1e-5)
    assert not enc.image_mask[:, 1:][rows, cols].any()
    with pytest.raises(ValueError, match="prompt_weight"):
        recipe.replace(prompt_weight=-1.0)
