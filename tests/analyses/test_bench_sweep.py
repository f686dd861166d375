"""The sweep benchmark runs end to end on the 1M-parameter random model (no timing is asserted)."""
from __future__ import annotations

import pytest

from analyses.bench_sweep import main


def test_bench_sweep_contenders_agree_and_every_ratio_is_reported(capsys):
    out = main(["--small", "--repeats", "1", "--n-coeffs", "3", "--batch", "2", "--device", "cpu"])
    # every contender computes the loop's logits (main asserts it before timing; here the numbers themselves)
    assert out["max_abs_diff"] <= 1e-4 and out["max_abs_diff_shared_prefix"] <= 1e-4
    assert out["ratio"] == pytest.approx(out["looped"] / out["batched"])
    assert out["ratio_shared_prefix"] == pytest.approx(out["looped"] / out["shared_prefix"])
    text = capsys.readouterr().out
    assert "3 strengths at blocks.2.hook_resid_pre" in text and "(target >= 3x)" in text


def test_bench_sweep_small_is_for_the_random_model_only(capsys):
    with pytest.raises(SystemExit):
        main(["--small", "--model", "quick"])
    assert "--small sizes the random model only" in capsys.readouterr().err
