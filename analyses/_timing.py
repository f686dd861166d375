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


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 30,
                      warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of every call of each function, measured in alternation (repeat ``i`` of each is adjacent)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternation."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, repeats, warmup).items()}


def paired_ratios(times: dict[str, list[float]], name: str, base: str) -> list[float]:
    """Per repeat, ``name``'s time over ``base``'s from the same round of :func:`interleaved_times`.

    Why paired: the two calls of one round ran a few milliseconds apart, so load that drifts over seconds
    cancels in their ratio; a ratio of two medians keeps it whenever the drift is not symmetric.  On a
    30 ms call on a shared 2-core machine, ratios of medians of the same two functions spread over 1.007-1.070
    in three runs.
    """
    if len(times[name]) != len(times[base]):
        raise ValueError(f"{name!r} and {base!r} have {len(times[name])} and {len(times[base])} repeats")
    return [t / b for t, b in zip(times[name], times[base])]


def ratio_summary(ratios: list[float]) -> tuple[float, float, float]:
    """``(lower quartile, median, upper quartile)`` of a list of ratios (all three the value for one repeat)."""
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, statistics.median(ratios), q3


def synced(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` followed by a CUDA synchronise (when CUDA is there): a timing then covers the queued GPU work."""
    def run() -> object:
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return run
