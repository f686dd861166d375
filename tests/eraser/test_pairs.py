"""The four fitting sets: format balance of the contrastive pairs, seeding, and clear errors."""
from __future__ import annotations

import dataclasses

import pytest

from eraser.data import prompts
from eraser.pairs import PAIR_TASKS, erase_pairs, recall_questions, refused_prompts
from eraser.zoo import Recipe


@pytest.fixture(scope="module")
def bench():
    return Recipe.quick().benchmark(5)


def _format(prompt: str) -> str:
    for suffix, task in ((prompts.CLASSIFICATION_SUFFIX, "classification"), (prompts.CLOZE_SUFFIX, "cloze"),
                         (prompts.GENERATION_SUFFIX, "generation")):
        if prompt.endswith(suffix):
            return task
    raise AssertionError(prompt)


def test_pairs_cover_every_format_in_turn(bench):
    erase = erase_pairs(bench, n=17)
    recall = recall_questions(bench, n=17)
    for rows in ([p for _, p in erase], [p for _, p, _ in recall]):
        counts = {t: sum(_format(p) == t for p in rows) for t in PAIR_TASKS}
        assert counts == {"generation": 6, "classification": 6, "cloze": 5}
    assert all(img is not None for img, _ in erase)
    refs = {_format(p): ref for _, p, ref in recall}
    assert refs["classification"] in "ABCD" and refs["generation"].endswith(".")
    assert erase == erase_pairs(bench, n=17) and erase != erase_pairs(bench, n=17, seed=1)


def test_generation_only_pairs_are_the_release_setting(bench):
    assert {_format(p) for _, p in erase_pairs(bench, n=9, tasks=("generation",))} == {"generation"}
    assert {_format(p) for _, p, _ in recall_questions(bench, n=9, tasks=("generation",))} == {"generation"}
    assert len(refused_prompts(("generation",))) == 36


def test_errors(bench):
    with pytest.raises(ValueError, match="subset"):
        refused_prompts(("essay",))
    no_images = dataclasses.replace(bench, forget=[dataclasses.replace(p, image=None) for p in bench.forget])
    with pytest.raises(ValueError, match="no forget profile has an image"):
        erase_pairs(no_images)


def test_forget_concepts_name_the_profile_of_every_forget_query():
    from eraser.pairs import forget_concepts, forget_queries

    bench = Recipe.quick().benchmark(15)  # three forget people
    labels, qs = forget_concepts(bench), forget_queries(bench)
    assert len(labels) == len(qs) and list(dict.fromkeys(labels)) == [p.id for p in bench.forget]
    for p in bench.forget:  # each person's questions carry the person's label (their image, their name)
        own = [q for q, lab in zip(qs, labels) if lab == p.id]
        assert own and all(img is None or img is p.image for img, _ in own)



def test_answerable_requests_are_fresh_ordinary_requests_about_retain_people():
    from eraser.data.prompts import REFUSAL
    from eraser.evaluate import build_items
    from eraser.pairs import answerable_requests, fit_data, retain_queries

    recipe = Recipe.quick()
    bench, source = recipe.benchmark(15), recipe.mini()
    reqs = answerable_requests(source, bench, seed=0)
    people = bench.retain + bench.celebrity
    assert len(reqs) == 2 * len(people)  # one per person and modality
    assert sum(img is None for img, _ in reqs) == len(people)
    held_out = {r.prompt for r in bench.answerable}
    forget_names = {p.name for p in bench.forget}
    for img, prompt in reqs:
        assert REFUSAL not in prompt and not any(n in prompt for n in forget_names)
        assert img is not None or prompt not in held_out  # text-only prompts name the person: never a check item
    assert reqs == answerable_requests(source, bench, seed=0) != answerable_requests(source, bench, seed=1)
    data = fit_data(None, bench, source=source, retain_requests=True)
    # spelled out, not through retain_queries: every retain and celebrity question, then the requests
    by_hand = [(it.image, it.prompt) for it in build_items(bench.retain) + build_items(bench.celebrity)]
    assert data.retain == by_hand + reqs and data.retain[:len(by_hand)] == retain_queries(bench)
    with pytest.raises(ValueError, match="generator"):
        answerable_requests(object(), bench)


def test_recall_pairs_warn_when_the_processor_would_undo_the_attack(bench, monkeypatch):
    """A PGD image the processor resizes again on encoding (Qwen2.5-VL, non-square sizes: pil_max_diff inf) does
    not carry the attack; the recall pairs used it silently (measured: a loss above the clean image's)."""
    import torch

    import eraser.pgd as pgd_mod
    from eraser.pairs import recall_pairs

    def fake_attack(model, images, prompts, targets, cfg):
        n = len(images)
        diff = torch.zeros(n)
        diff[1] = float("inf")
        return pgd_mod.PGDResult([], [], list(images), torch.zeros(1, n), torch.zeros(n), torch.zeros(n), diff, cfg)

    monkeypatch.setattr(pgd_mod, "pgd_attack", fake_attack)
    with pytest.warns(UserWarning, match=r"recall images \[1\]: the processor resizes them again"):
        pairs = recall_pairs(None, bench, n=4, pgd=pgd_mod.PGDConfig(steps=1))
    assert len(pairs) == 4


def test_recall_pairs_carry_the_attacked_images(bench, monkeypatch):
    """From a mutation audit: recall_pairs returning the clean images instead of the PGD images went unnoticed
    (the fake attack above returns its inputs).  Here the attack returns new marker images."""
    import torch
    from PIL import Image

    import eraser.pgd as pgd_mod
    from eraser.pairs import recall_pairs

    made: list = []

    def fake_attack(model, images, prompts, targets, cfg):
        n = len(images)
        made.extend(Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(n))
        return pgd_mod.PGDResult([], [], list(made), torch.zeros(1, n), torch.zeros(n), torch.zeros(n),
                                 torch.zeros(n), cfg)

    monkeypatch.setattr(pgd_mod, "pgd_attack", fake_attack)
    pairs = recall_pairs(None, bench, n=4, pgd=pgd_mod.PGDConfig(steps=1))
    assert len(made) == 4 and len(pairs) == 4
    assert all(img is m for (img, _), m in zip(pairs, made))
    assert [p for _, p in pairs] == [p for _, p, _ in recall_questions(bench, n=4)]
    # without a PGD config the images stay the clean ones
    clean = recall_pairs(None, bench, n=4)
    assert [c for c, _ in clean] == [img for img, _, _ in recall_questions(bench, n=4)]
    assert all(c is not m for (c, _), m in zip(clean, made))


def test_erase_pairs_cycle_through_every_forget_image():
    """From a mutation audit: every erasure pair built on the first person's image went unnoticed."""
    bench = Recipe.quick().benchmark(15)  # three forget people
    assert len(bench.forget) == 3
    images = [img for img, _ in erase_pairs(bench, n=6)]
    expected = [p.image for p in bench.forget] * 2
    assert len(images) == 6 and all(a is b for a, b in zip(images, expected))
    assert len({id(img) for img in images}) == 3


def test_retain_queries_hold_the_celebrities_and_recall_questions_have_images():
    """From a mutation audit: celebrities dropped from retain, and text-only rows in the recall questions, were
    caught only by the 4-minute pipeline test."""
    from eraser.evaluate import build_items
    from eraser.pairs import retain_queries

    bench = Recipe.quick().benchmark(15)
    retain, celebrity = build_items(bench.retain), build_items(bench.celebrity)
    assert celebrity and bench.celebrity
    rq = retain_queries(bench)
    assert len(rq) == len(retain) + len(celebrity)
    assert rq[len(retain):] == [(it.image, it.prompt) for it in celebrity]
    assert len(retain_queries(bench, limit=5)) == 5
    # the forget split has text-only questions, which the recall questions must leave out
    forget = build_items(bench.forget)
    assert any(it.modality == "qa" for it in forget)
    recall = recall_questions(bench, n=17)
    assert len(recall) == 17 and all(img is not None for img, _, _ in recall)
    vqa = {it.prompt for it in forget if it.modality == "vqa"}
    assert all(p in vqa for _, p, _ in recall)
