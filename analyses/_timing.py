"""Interleaved timing: run competing variants in alternation and compare medians.

Why interleaved: on a shared 2-core machine, load drifts over seconds; timing
A then B confounds the drift with the difference.  Alternating A, B, A, B...
exposes both to the same drift, and medians ignore the odd stall.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternation."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def synced(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` followed by a CUDA synchronise (when CUDA is there): a timing then covers the queued GPU work."""
    def run() -> object:
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return run
