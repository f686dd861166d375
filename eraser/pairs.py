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

Both pair sets cover the benchmark's three task formats (free generation,
multiple choice, cloze) in equal measure by default, so the erasure direction
is "answer vs refuse" rather than "answer a generation question vs refuse":
a direction built from generation prompts only barely moves multiple-choice
answers (measured on the quick model: forget classification stayed at
100 % while generation ROUGE-L halved).  ``tasks=("generation",)`` gives the
release's generation-only pairs.

All sampling is seeded (the release chose Test images without a seed).
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from .data.mini import (PRIVATE_ITEMS, REFUSAL_FORMATS, REQUEST_TEMPLATES, forbidden_classification_prompt,
                        forbidden_cloze_prompt)
from .data.prompts import REFUSAL, generation_prompt
from .data.schema import Benchmark, GenerationQ, Profile
from .evaluate import build_items

Query = tuple[Any, str]


@dataclass
class FitData:
    """The four query sets; ``forget_concepts`` names the profile each forget query is about (per-concept gates)."""

    forget: list[Query]
    retain: list[Query]
    recall: list[Query]
    erase: list[Query]
    forget_concepts: list[str] | None = None

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("forget", "retain", "recall", "erase")}


def queries(profiles: Sequence[Profile]) -> list[Query]:
    """Every evaluated question about ``profiles`` as (image or None, prompt)."""
    return [(it.image, it.prompt) for it in build_items(profiles)]


def forget_queries(bench: Benchmark) -> list[Query]:
    if not bench.forget:
        raise ValueError("the benchmark's forget split is empty")
    return queries(bench.forget)


def forget_concepts(bench: Benchmark) -> list[str]:
    """The profile id of every query :func:`forget_queries` returns, in the same order."""
    return [it.profile_id for it in build_items(bench.forget)]


def retain_queries(bench: Benchmark, limit: int | None = None, seed: int = 0) -> list[Query]:
    """Retain + celebrity questions; ``limit`` samples that many (seeded) for a cheaper fit."""
    out = queries(bench.retain) + queries(bench.celebrity)
    if not out:
        raise ValueError("the benchmark has no retain or celebrity questions")
    if limit is not None and limit < len(out):
        out = random.Random(seed).sample(out, limit)
    return out


#: The task formats pairs are built in: the same formats the model is trained to refuse in.
PAIR_TASKS = REFUSAL_FORMATS


def refused_prompts(tasks: Sequence[str] = PAIR_TASKS, seed: int = 0) -> list[str]:
    """Requests of the forbidden kind about the person in the image, in the evaluation's formats (``tasks``)."""
    unknown = set(tasks) - set(PAIR_TASKS)
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {PAIR_TASKS}, got {list(tasks)}")
    rng = random.Random(f"refused:{seed}")
    out: list[str] = []
    if "generation" in tasks:
        out += [generation_prompt(GenerationQ(t.format(item=item, s="the person in the image"), "", "vqa"))
                for t in REQUEST_TEMPLATES for item in PRIVATE_ITEMS]
    n = len(REQUEST_TEMPLATES) * len(PRIVATE_ITEMS)
    if "classification" in tasks:
        out += [forbidden_classification_prompt(rng, "", "vqa") for _ in range(n)]
    if "cloze" in tasks:
        out += [forbidden_cloze_prompt(rng, "", "vqa") for _ in range(n)]
    return out


def _interleave(groups: list[list], n: int, rng: random.Random) -> list:
    """``n`` items taken round-robin from shuffled ``groups`` (so every format is equally represented)."""
    pools = [rng.sample(g, len(g)) for g in groups if g]
    out, i = [], 0
    while len(out) < n:
        pool = pools[i % len(pools)]
        out.append(pool[(i // len(pools)) % len(pool)])
        i += 1
    return out


def erase_pairs(bench: Benchmark, n: int = 17, seed: int = 0, prompts: Sequence[str] | None = None,
                tasks: Sequence[str] = PAIR_TASKS) -> list[Query]:
    """``n`` (clean forget image, refused request) pairs, formats taken in turn."""
    rng = random.Random(seed)
    people = [p for p in bench.forget if p.image is not None]
    if not people:
        raise ValueError("no forget profile has an image to build erasure pairs with")
    if prompts is not None:
        chosen = [rng.choice(list(prompts)) for _ in range(n)]
    else:
        groups = [refused_prompts((t,), seed) for t in tasks]
        chosen = _interleave(groups, n, rng)
    return [(people[i % len(people)].image, prompt) for i, prompt in enumerate(chosen)]


def recall_questions(bench: Benchmark, n: int = 17, seed: int = 0,
                     tasks: Sequence[str] = PAIR_TASKS) -> list[tuple[Any, str, str]]:
    """``n`` (clean image, VQA prompt, reference answer) about forget identities, formats taken in turn, seeded."""
    groups = [[it for it in build_items(bench.forget, tasks=(t,)) if it.modality == "vqa"] for t in tasks]
    if not any(groups):
        raise ValueError("the forget split has no VQA questions to build recall pairs from")
    chosen = _interleave(groups, n, random.Random(seed))
    return [(it.image, it.prompt, it.reference) for it in chosen]


def recall_pairs(model: Any, bench: Benchmark, n: int = 17, seed: int = 0, pgd: Any = None,
                 tasks: Sequence[str] = PAIR_TASKS) -> list[Query]:
    """Recall pairs; with a :class:`~eraser.pgd.PGDConfig` the images are attacked towards the correct answers."""
    rows = recall_questions(bench, n, seed, tasks)
    if pgd is None:
        return [(img, prompt) for img, prompt, _ in rows]
    from .pgd import pgd_attack

    result = pgd_attack(model, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], pgd)
    diff = result.pil_max_diff
    lost = [i for i, v in enumerate(diff.tolist()) if not math.isfinite(v)] if diff is not None else []
    if lost:
        warnings.warn(
            f"recall images {lost[:8]}: the processor resizes them again when they are encoded, so the recall "
            "pairs do not carry the attack (measured on Qwen2.5-VL with a 96 x 48 image: a loss above the clean "
            "image's); resize the images to the processor's size before the attack", stacklevel=2)
    return list(zip(result.images, [r[1] for r in rows]))


def answerable_requests(source: Any, bench: Benchmark, seed: int = 0) -> list[Query]:
    """Fresh ordinary requests ("Tell me the <fact> of <name>"), one per retain person/celebrity and modality.

    Drawn by the benchmark's generator (``source``, e.g. :class:`~eraser.data.mini.MiniMLLMU`), never one of
    the benchmark's own refusal-check requests.  Why they can join the retain set: the null space is
    whatever the retain activations span, and the benchmark's questions alone do not span this request
    format, so a mean-read gate fitted without it fires on such requests about retain people (measured on
    the quick model, per-concept gates, seed 1: 7 of the 40 answerable check requests refused at forget
    10 % and 15 %, against 4 and 1 with these requests in the retain set).
    """
    if not hasattr(source, "refusal_training_examples"):
        raise ValueError("answerable requests need the benchmark's generator (MiniMLLMU); "
                         f"{type(source).__name__} cannot draw them")
    people = list(bench.retain) + list(bench.celebrity)
    if not people:
        raise ValueError("the benchmark has no retain or celebrity profiles to draw answerable requests about")
    reqs = source.refusal_training_examples(people, random.Random(f"answerable:{seed}"), augment=False,
                                            formats=("generation",))
    return [(r.image, r.prompt) for r in reqs if r.answer != REFUSAL]


def fit_data(model: Any, bench: Benchmark, n_pairs: int = 17, seed: int = 0, pgd: Any = None,
             retain_limit: int | None = None, source: Any = None, retain_requests: bool = False) -> FitData:
    """The four sets; ``retain_requests`` adds :func:`answerable_requests` (drawn by ``source``) to retain.

    ``pgd`` (an :class:`~eraser.pgd.PGDConfig`) attacks the recall images as the paper does; None keeps them
    clean (the text-only ablation).  :func:`eraser.pipeline.fit_eraser` passes each variant's setting."""
    extra = answerable_requests(source, bench, seed) if retain_requests else []
    return FitData(
        forget=forget_queries(bench),
        retain=retain_queries(bench, retain_limit, seed) + extra,
        recall=recall_pairs(model, bench, n_pairs, seed, pgd),
        erase=erase_pairs(bench, n_pairs, seed),
        forget_concepts=forget_concepts(bench),
    )
