"""Portraits: identities far apart, rendering deterministic, jitter a small change, and fast."""
from __future__ import annotations

import itertools
import random
import time

import numpy as np
import pytest

from eraser.data.portraits import ATTRIBUTE_VALUES, Jitter, PortraitAttrs, draw_portrait, sample_distinct_attrs


def _min_hamming(attrs: list[PortraitAttrs]) -> int:
    return min(a.hamming(b) for a, b in itertools.combinations(attrs, 2))


@pytest.mark.parametrize("rng", [random.Random(0), np.random.default_rng(0)], ids=["random", "numpy"])
def test_130_identities_pairwise_hamming_at_least_2(rng: random.Random | np.random.Generator) -> None:
    attrs = sample_distinct_attrs(130, rng, min_hamming=2)
    assert len(attrs) == 130
    assert _min_hamming(attrs) >= 2


def test_min_hamming_3_is_reachable_and_impossible_requests_fail() -> None:
    assert _min_hamming(sample_distinct_attrs(130, random.Random(1), min_hamming=3)) >= 3
    # differing in all 7 attributes: at most 4 identities (the smallest alphabet has 4 values)
    with pytest.raises(ValueError, match="could only place"):
        sample_distinct_attrs(5, random.Random(0), min_hamming=7, max_tries=2000)
    with pytest.raises(ValueError):
        sample_distinct_attrs(3, random.Random(0), min_hamming=8)


def test_attrs_validate_and_hamming() -> None:
    a = PortraitAttrs("oval", "pale", "black", "short", "blue", "none", "red")
    assert a.hamming(a) == 0
    assert a.hamming(PortraitAttrs("round", "pale", "black", "short", "blue", "hat", "red")) == 2
    with pytest.raises(ValueError, match="hair_colour"):
        PortraitAttrs("oval", "pale", "purple", "short", "blue", "none", "red")


def test_draw_is_deterministic_rgb_and_distinguishes_every_attribute() -> None:
    base = PortraitAttrs("oval", "light", "brown", "short", "green", "none", "blue")
    img = draw_portrait(base, 64)
    assert img.mode == "RGB" and img.size == (64, 64)
    assert img.tobytes() == draw_portrait(base, 64).tobytes()
    assert draw_portrait(base, 32).size == (32, 32)
    for name, values in ATTRIBUTE_VALUES.items():
        for v in values:
            if v != getattr(base, name):
                other = PortraitAttrs(**{**base.__dict__, name: v})
                assert draw_portrait(other, 64).tobytes() != img.tobytes(), (name, v)


def test_jitter_is_seeded_small_and_never_identity() -> None:
    j1 = [Jitter.sample(random.Random(7)) for _ in range(2)]
    assert j1[0] == j1[1]
    attrs = PortraitAttrs("square", "tan", "red", "spiky", "grey", "glasses", "yellow")
    clean = np.asarray(draw_portrait(attrs, 64), dtype=float)
    rng = random.Random(3)
    for _ in range(50):
        j = Jitter.sample(rng)
        assert not j.is_identity
        assert abs(j.dx) <= 3 and abs(j.dy) <= 3 and abs(j.scale - 1) <= 0.08 and max(map(abs, j.colour)) <= 12
        diff = np.abs(np.asarray(draw_portrait(attrs, 64, j), dtype=float) - clean).mean()
        assert 0 < diff < 40


def test_drawing_is_fast() -> None:
    attrs = sample_distinct_attrs(50, random.Random(0))
    rng = random.Random(0)
    t = time.perf_counter()
    for a in attrs * 4:
        draw_portrait(a, 64, Jitter.sample(rng))
    per_image = (time.perf_counter() - t) / 200
    assert per_image < 0.003  # ~0.2 ms measured; generous for slow CI
