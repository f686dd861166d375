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
    assert data.retain == retain_queries(bench) + reqs
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
