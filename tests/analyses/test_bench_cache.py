"""The cache benchmark runs end to end on a small random model (no timing is asserted)."""
from __future__ import annotations

import pytest

from analyses.bench_cache import main


def test_bench_cache_reports_both_timings_and_their_ratio(capsys):
    out = main(["--d-model", "64", "--n-layers", "2", "--batch", "2", "--repeats", "1"])
    assert out["plain"] > 0 and out["run_with_cache"] > 0
    assert out["ratio"] == pytest.approx(out["run_with_cache"] / out["plain"])
    assert out["n_names"] == 6  # resid_pre, resid_mid and resid_post of each of the 2 blocks
    text = capsys.readouterr().out
    assert "batch 2" in text and "6 resid names cached" in text and "(target <= 1.3)" in text
