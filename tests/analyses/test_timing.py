"""Interleaved timing: rounds alternate the functions, and paired ratios divide within a round."""
from __future__ import annotations

import pytest

import analyses._timing as timing
from analyses._timing import interleaved, interleaved_times, paired_ratios, ratio_summary


def test_rounds_alternate_and_skip_the_warmup(monkeypatch):
    order: list[str] = []
    fns = {k: (lambda k=k: order.append(k)) for k in ("a", "b")}
    times = interleaved_times(fns, repeats=3, warmup=2)
    assert order == ["a", "b"] * 5 and {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="repeats"):
        interleaved_times(fns, repeats=0)


def test_paired_ratios_divide_within_a_round(monkeypatch):
    # load changes from round to round (x1, x3, x0.5, x8, x2); b always costs 1.02x a in the same round
    now = [0.0]
    load = iter([1, 1, 3, 3, 0.5, 0.5, 8, 8, 2, 2])
    cost = {"a": 1.0, "b": 1.02}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def make(k):
        def fn():
            now[0] += cost[k] * next(load)
        return fn

    times = interleaved_times({"a": make("a"), "b": make("b")}, repeats=5, warmup=0)
    assert times["a"] == pytest.approx([1, 3, 0.5, 8, 2])
    ratios = paired_ratios(times, "b", "a")
    assert ratios == pytest.approx([1.02] * 5)
    assert ratio_summary(ratios) == pytest.approx((1.02, 1.02, 1.02))


def test_ratio_summary_quartiles_and_mismatched_lengths():
    assert ratio_summary([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert ratio_summary([1.5]) == (1.5, 1.5, 1.5)
    with pytest.raises(ValueError, match="repeats"):
        paired_ratios({"a": [1.0], "b": [1.0, 2.0]}, "a", "b")


def test_interleaved_returns_medians(monkeypatch):
    ticks = iter(range(100))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(ticks)))
    assert interleaved({"a": lambda: None}, repeats=3, warmup=0) == {"a": 1.0}
