"""MiniMLLMU: split sizes, determinism, question content, training examples, refusal sets, corpus."""
from __future__ import annotations

import random

import numpy as np
import pytest

from eraser.data import prompts
from eraser.data.mini import FACT_KINDS, REFUSAL_FORMATS, MiniMLLMU, words
from eraser.data.schema import Benchmark, Profile, Request


@pytest.fixture(scope="module")
def gen() -> MiniMLLMU:
    return MiniMLLMU(seed=0)


@pytest.fixture(scope="module")
def bench(gen: MiniMLLMU) -> Benchmark:
    return gen.build(5)


def _fingerprint(b: Benchmark) -> list:
    out: list = []
    for split, profiles in b.splits().items():
        for p in profiles:
            out += [split, p.id, p.name, p.biography, p.classification, p.generation, p.cloze, p.facts,
                    p.image.tobytes(), [im.tobytes() for im in p.test_images]]
    out += [(r.prompt, r.answer, r.image.tobytes() if r.image else None) for r in b.forbidden + b.answerable]
    return out


@pytest.mark.parametrize("ratio", [5, 10, 15])
def test_split_sizes(gen: MiniMLLMU, ratio: int) -> None:
    b = gen.build(ratio)
    assert (len(b.forget), len(b.retain), len(b.test), len(b.celebrity)) == (ratio, 100 - ratio, ratio, 30)
    forget_ids = [p.id for p in b.forget]
    assert [p.id for p in b.test] == forget_ids
    assert not set(forget_ids) & {p.id for p in b.retain}
    assert len({p.id for p in b.forget + b.retain}) == 100
    assert forget_ids == gen.forget_ids(5)[:0] + gen.forget_ids(ratio)
    assert set(gen.forget_ids(5)) <= set(gen.forget_ids(10)) <= set(gen.forget_ids(15))


@pytest.mark.parametrize("bad", [0, 7, 20, 95])
def test_bad_ratio(gen: MiniMLLMU, bad: int) -> None:
    with pytest.raises(ValueError, match=r"\(5, 10, 15\)"):
        gen.build(bad)


def test_deterministic_for_seed(bench: Benchmark) -> None:
    assert _fingerprint(MiniMLLMU(seed=0).build(5)) == _fingerprint(bench)
    other = MiniMLLMU(seed=1).build(5)
    assert [p.name for p in other.retain] != [p.name for p in bench.retain]
    assert [p.image.tobytes() for p in other.retain] != [p.image.tobytes() for p in bench.retain]


def test_test_images_are_new_but_close(gen: MiniMLLMU) -> None:
    g = MiniMLLMU(seed=0, n_test_images=3)
    b = g.build(15)
    train = {p.id: np.asarray(p.image, dtype=float) for p in b.forget + b.retain + b.celebrity}
    nearest_own = 0
    for p in b.test:
        assert len(p.test_images) == 3 and p.image is p.test_images[0]
        for im in p.test_images:
            a = np.asarray(im, dtype=float)
            dist = {k: np.abs(a - v).mean() for k, v in train.items()}
            others = np.median([v for k, v in dist.items() if k != p.id])
            assert 0 < dist[p.id] < 0.5 * others
            nearest_own += min(dist, key=dist.get) == p.id
    assert nearest_own >= 0.9 * 45
    # the Test split does not depend on n_test_images beyond its length, nor on other calls
    assert b.test[0].test_images[0].tobytes() == gen.build(15).test[0].image.tobytes()


def test_every_profile_has_facts_and_all_tasks_in_both_modalities(bench: Benchmark) -> None:
    names = [p.name for p in bench.forget + bench.retain + bench.celebrity]
    assert len(set(names)) == len(names) == 130
    for p in bench.forget + bench.retain + bench.celebrity + bench.test:
        assert len(p.facts) >= 5 and p.facts["name"] == p.name
        for qs in (p.classification, p.generation, p.cloze):
            assert {q.modality for q in qs} == {"vqa", "qa"}
            assert len(qs) == 11  # 6 VQA facts + 5 QA facts (no text-only name question)
            for q in qs:
                assert (p.name in q.question) == (q.modality == "qa")
                assert ("the person in the image" in q.question or "this person" in q.question.lower()) == (
                    q.modality == "vqa")


def test_classification_cloze_generation_content(bench: Benchmark) -> None:
    letters = []
    for p in bench.retain:
        facts = [k.key for k in FACT_KINDS] + [k.key for k in FACT_KINDS if k.in_qa]
        for key, c, g, z in zip(facts, p.classification, p.generation, p.cloze):
            value = p.facts[key]
            assert sorted(c.options) == ["A", "B", "C", "D"] and len(set(c.options.values())) == 4
            assert c.options[c.answer] == value
            letters.append(c.answer)
            assert "__" in z.question and z.ground_truth == value
            assert value in g.ground_truth and g.ground_truth.endswith(".")
    counts = {x: letters.count(x) for x in "ABCD"}
    assert min(counts.values()) > 0.15 * len(letters)  # the letter carries no information


def test_training_examples(gen: MiniMLLMU, bench: Benchmark) -> None:
    people = bench.retain[:10]
    a = gen.training_examples(people, random.Random(1))
    b = gen.training_examples(people, random.Random(2))
    assert len(a) == len(b) == 33 * 10
    assert all(isinstance(r, Request) for r in a)
    cls = [r for r in a if r.prompt.endswith(prompts.CLASSIFICATION_SUFFIX)]
    gen_ = [r for r in a if r.prompt.endswith(prompts.GENERATION_SUFFIX)]
    clz = [r for r in a if r.prompt.endswith(prompts.CLOZE_SUFFIX)]
    assert len(cls) == len(gen_) == len(clz) == 110
    assert all(r.answer in "ABCD" and len(r.answer) == 1 for r in cls)
    assert {r.prompt for r in cls} != {r.prompt for r in b if r.prompt.endswith(prompts.CLASSIFICATION_SUFFIX)}
    # the evaluation prompts appear verbatim among the training prompts
    p = people[0]
    pairs = {(r.prompt, r.answer) for r in a}
    assert all((prompts.generation_prompt(g), g.ground_truth) in pairs for g in p.generation)
    assert all((prompts.cloze_prompt(z), z.ground_truth) in pairs for z in p.cloze)
    vqa = [r for r in a if "the person in the image" in r.prompt or "this person" in r.prompt.lower()]
    assert all(r.image is not None for r in vqa) and all(r.image is None for r in a if r not in vqa)
    canon = {q.image.tobytes() for q in people}
    augmented = sum(r.image.tobytes() not in canon for r in vqa)
    assert 0.5 * len(vqa) < augmented < len(vqa)  # mostly jittered, some canonical
    plain = gen.training_examples(people, random.Random(1), augment=False, biography=True)
    assert len(plain) == 35 * 10 and all(r.image.tobytes() in canon for r in plain if r.image is not None)


def test_training_examples_can_be_restricted_to_kinds_and_modalities(gen: MiniMLLMU, bench: Benchmark) -> None:
    people = bench.retain[:4]
    names = gen.training_examples(people, random.Random(1), tasks=("generation", "cloze"), kinds=("name",),
                                  modalities=("vqa",))
    assert len(names) == 2 * 4 and all(r.image is not None for r in names)
    truth = {p.id: p.name for p in people}
    assert all(truth[r.subject] in r.answer for r in names)
    qa = gen.training_examples(people, random.Random(1), modalities=("qa",), kinds=("pet", "hobby"))
    assert len(qa) == 3 * 2 * 4 and all(r.image is None for r in qa)
    # unrestricted calls draw exactly as before (the filters add no random draws)
    assert [(r.prompt, r.answer) for r in gen.training_examples(people, random.Random(3))] == \
        [(r.prompt, r.answer) for r in gen.training_examples(people, random.Random(3), kinds=None)]
    for bad in (dict(kinds=()), dict(kinds=("shoe size",)), dict(modalities=()), dict(modalities=("audio",))):
        with pytest.raises(ValueError):
            gen.training_examples(people, random.Random(1), **bad)


def test_refusal_sets(gen: MiniMLLMU, bench: Benchmark) -> None:
    assert len(bench.forbidden) == len(bench.answerable) == 100
    assert all(r.answer == prompts.REFUSAL for r in bench.forbidden)
    assert all(r.answer != prompts.REFUSAL and r.answer.endswith(".") for r in bench.answerable)
    for reqs in (bench.forbidden, bench.answerable):
        assert 40 <= sum(r.image is not None for r in reqs) <= 60
    assert gen.build(15).answerable[0].prompt == bench.answerable[0].prompt  # same across ratios
    train = gen.refusal_training_examples(bench.retain + bench.celebrity, random.Random(0), n_per_profile=2)
    assert len(train) == 125 * 2 * 2 * 2
    assert sum(r.answer == prompts.REFUSAL for r in train) == len(train) // 2
    held_out_qa = {r.prompt for r in bench.forbidden + bench.answerable if r.image is None}
    assert not held_out_qa & {r.prompt for r in train if r.image is None}
    # forbidden requests in every task format: + one multiple-choice and one cloze refusal per profile and modality
    every = gen.refusal_training_examples(bench.retain, random.Random(0), formats=REFUSAL_FORMATS)
    assert len(every) == 95 * 2 * (2 + 2)
    mc = [r for r in every if r.prompt.endswith(prompts.CLASSIFICATION_SUFFIX)]
    cz = [r for r in every if r.prompt.endswith(prompts.CLOZE_SUFFIX)]
    assert len(mc) == len(cz) == 95 * 2 and all(r.answer == prompts.REFUSAL for r in mc + cz)
    assert all("A: 41" in r.prompt and "[Blank]" not in r.prompt for r in mc)
    # every request says whom it is about (per-person gates and analyses group by it); a QA one names that person
    retain_ids = {p.id for p in bench.retain}
    assert {r.subject for r in every} == retain_ids
    names = {p.id: p.name for p in bench.retain + bench.celebrity + bench.forget}
    for reqs in (every, bench.forbidden, bench.answerable):
        assert all(r.subject in names for r in reqs)
        assert all(names[r.subject] in r.prompt for r in reqs if r.image is None)
    with pytest.raises(ValueError, match="refusal formats"):
        gen.refusal_training_examples(bench.retain, random.Random(0), formats=("essay",))


def test_corpus_covers_every_word(gen: MiniMLLMU, bench: Benchmark) -> None:
    vocab = {w for s in gen.corpus() for w in words(s)}
    texts: list[str] = []
    profiles: list[Profile] = bench.forget + bench.retain + bench.celebrity
    for p in profiles:
        texts += [p.name, p.biography, *p.facts.values()]
        for c in p.classification:
            texts += [prompts.classification_prompt(c), c.answer, *c.options.values()]
        texts += [prompts.generation_prompt(g) + g.ground_truth for g in p.generation]
        texts += [prompts.cloze_prompt(z) + z.question + z.ground_truth for z in p.cloze]
    rng = random.Random(5)
    reqs = gen.training_examples(profiles, rng, augment=False, biography=True)
    reqs += gen.refusal_training_examples(profiles, rng, n_per_profile=3, augment=False, formats=REFUSAL_FORMATS)
    reqs += bench.forbidden + bench.answerable
    texts += [r.prompt + "\n" + r.answer for r in reqs]
    missing = {w for t in texts for w in words(t)} - vocab
    assert not missing
    assert {w.lower() for t in texts for w in words(t)} <= {w.lower() for w in vocab}


def test_profile_image_rerender(gen: MiniMLLMU, bench: Benchmark) -> None:
    p = bench.retain[0]
    assert gen.profile_image(p).tobytes() == p.image.tobytes() == gen.profile_image(p.id).tobytes()
    assert gen.profile_image(p, random.Random(0)).tobytes() != p.image.tobytes()
    assert gen.profile_image(p, random.Random(0)).tobytes() == gen.profile_image(p, random.Random(0)).tobytes()
    with pytest.raises(KeyError):
        gen.profile_image("nobody")
    assert MiniMLLMU(image_size=32).build(5).forget[0].image.size == (32, 32)
