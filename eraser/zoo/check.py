"""Measuring what a trained tiny model memorised: every split's metrics plus the refusal checks.

Why here: the zoo's promise is a vanilla model that *has* memorised its data
(MLLMU-Bench users' first pitfall is unlearning a model that never learned),
so the numbers that back that promise are one call away, with the same
evaluator and the same batched backend every method uses.
"""
from __future__ import annotations

import time
from typing import Any

from interp.model import HookedVLM

from .recipe import Recipe

__all__ = ["memorisation_report", "TARGETS"]

#: The memorisation bar of the issue (vanilla model), and the oracle's ceiling on forget classification.
TARGETS: dict[str, float] = {
    "cls_acc": 0.9, "gen_rougeL": 0.7, "test_cls_acc": 0.8, "test_gen_rougeL": 0.8,
    "forbidden_refusal_rate": 0.95, "answerable_refusal_rate": 0.02, "oracle_forget_cls_acc": 0.4,
}


def memorisation_report(model: HookedVLM, recipe: Recipe, forget_ratio: int = 5, batch_size: int = 64,
                        splits: tuple[str, ...] = ("forget", "test", "retain", "celebrity"), refusal: bool = True,
                        progress: bool = False) -> dict[str, Any]:
    """``{split: metrics, "refusal": {...}, "eval_seconds": s}`` on the recipe's own benchmark (greedy, 50 tokens)."""
    from eraser.backend import generate_fn
    from eraser.evaluate import evaluate_benchmark, refusal_checks

    bench = recipe.benchmark(forget_ratio)
    gen = generate_fn(model, batch_size=batch_size)
    t0 = time.perf_counter()
    out: dict[str, Any] = dict(evaluate_benchmark(bench, gen, splits=splits, batch_size=batch_size, progress=progress))
    if refusal:
        out["refusal"] = refusal_checks(bench, gen, batch_size=batch_size, progress=progress)
    out["eval_seconds"] = time.perf_counter() - t0
    return out
