"""The peak-memory helpers measure a stretch of work, not the process's lifetime."""
from __future__ import annotations

import pytest
import torch

from analyses._memory import current_rss, peak_rss, reset_peak

MIB = 1 << 20


def _touch(mib: int) -> None:
    t = torch.ones(mib * MIB // 4)  # written, so resident
    del t


def test_reset_peak_forgets_an_earlier_peak_and_sees_a_later_one():
    if not reset_peak():
        pytest.skip("this OS cannot reset the resident high-water mark")
    _touch(256)
    assert peak_rss() - current_rss() > 200 * MIB  # the freed 256 MiB is in the peak, not in the current size
    before = current_rss()
    assert reset_peak()
    assert peak_rss() - before < 100 * MIB  # the earlier 256 MiB peak is gone
    _touch(64)
    assert 50 * MIB < peak_rss() - before < 150 * MIB
