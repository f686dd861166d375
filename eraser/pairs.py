"""From a benchmark to the four query sets MLLMEraser is fitted on.

- forget: every question about the forget identities, as evaluated (VQA with
  the profile image, QA text-only);
- retain: every question about retain identities and celebrities (the Test
  split is never used for fitting);
- erase pairs: clean forget-identity images with requests of the kind the
  model refuses (private contact details);
- recall pairs: forget-identity images perturbed by PGD towards the correct
  answer, with questions the model answers.  ``pgd=None`` keeps the images
  clean: the text-only ablation.

All sampling is seeded (the release chose Test images without a seed).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from .data.mini import PRIVATE_ITEMS, REQUEST_TEMPLATES
from .data.prompts import generation_prompt
from .data.schema import Benchmark, GenerationQ, Profile
from .evaluate import build_items

Query = tuple[Any, str]


@dataclass
class FitData:
    forget: list[Query]
    retain: list[Query]
    recall: list[Query]
    erase: list[Query]

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("forget", "retain", "recall", "erase")}


def queries(profiles: Sequence[Profile]) -> list[Query]:
    """Every evaluated question about ``profiles`` as (image or None, prompt)."""
    return [(it.image, it.prompt) for it in build_items(profiles)]


def forget_queries(bench: Benchmark) -> list[Query]:
    if not bench.forget:
        raise ValueError("the benchmark's forget split is empty")
    return queries(bench.forget)


def retain_queries(bench: Benchmark, limit: int | None = None, seed: int = 0) -> list[Query]:
    """Retain + celebrity questions; ``limit`` samples that many (seeded) for a cheaper fit."""
    out = queries(bench.retain) + queries(bench.celebrity)
    if not out:
        raise ValueError("the benchmark has no retain or celebrity questions")
    if limit is not None and limit < len(out):
        out = random.Random(seed).sample(out, limit)
    return out


def refused_prompts() -> list[str]:
    """Requests of the forbidden kind, about the person in the image, in the evaluation's generation format."""
    return [generation_prompt(GenerationQ(t.format(item=item, s="the person in the image"), "", "vqa"))
            for t in REQUEST_TEMPLATES for item in PRIVATE_ITEMS]


def erase_pairs(bench: Benchmark, n: int = 17, seed: int = 0, prompts: Sequence[str] | None = None) -> list[Query]:
    """``n`` (clean forget image, refused request) pairs."""
    prompts = list(prompts or refused_prompts())
    rng = random.Random(seed)
    people = [p for p in bench.forget if p.image is not None]
    if not people:
        raise ValueError("no forget profile has an image to build erasure pairs with")
    return [(people[i % len(people)].image, rng.choice(prompts)) for i in range(n)]


def recall_questions(bench: Benchmark, n: int = 17, seed: int = 0) -> list[tuple[Any, str, str]]:
    """``n`` (clean image, VQA generation prompt, ground truth) about forget identities, seeded."""
    items = [it for it in build_items(bench.forget, tasks=("generation",)) if it.modality == "vqa"]
    if not items:
        raise ValueError("the forget split has no VQA generation questions to build recall pairs from")
    rng = random.Random(seed)
    chosen = [items[i % len(items)] for i in rng.sample(range(len(items)), min(n, len(items)))]
    while len(chosen) < n:
        chosen.append(items[len(chosen) % len(items)])
    return [(it.image, it.prompt, it.reference) for it in chosen]


def recall_pairs(model: Any, bench: Benchmark, n: int = 17, seed: int = 0, pgd: Any = None) -> list[Query]:
    """Recall pairs; with a :class:`~eraser.pgd.PGDConfig` the images are attacked towards the correct answers."""
    rows = recall_questions(bench, n, seed)
    if pgd is None:
        return [(img, prompt) for img, prompt, _ in rows]
    from .pgd import pgd_attack

    result = pgd_attack(model, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], pgd)
    return list(zip(result.images, [r[1] for r in rows]))


def fit_data(model: Any, bench: Benchmark, n_pairs: int = 17, seed: int = 0, pgd: Any = None,
             retain_limit: int | None = None) -> FitData:
    return FitData(
        forget=forget_queries(bench),
        retain=retain_queries(bench, retain_limit, seed),
        recall=recall_pairs(model, bench, n_pairs, seed, pgd),
        erase=erase_pairs(bench, n_pairs, seed),
    )
