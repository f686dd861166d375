"""The steering benchmark runs end to end on the 1M-parameter random model (no timing is asserted)."""
from __future__ import annotations

import math

from analyses.bench_steer import main


def test_bench_steer_with_answer_steering_reports_every_ratio(capsys):
    out = main(["--small", "--repeats", "1", "--new-tokens", "4", "--variant", "mllmeraser_stacked_gate"])
    assert out["variant"] == "mllmeraser_stacked_gate"
    assert out["fast_ratio"] > 0 and out["graph_ratio"] > 0
    for k in ("fast", "graph"):  # the median of the paired ratios lies between their quartiles
        lo, hi = out[f"{k}_ratio_iqr"]
        assert 0 < lo <= out[f"{k}_ratio"] <= hi
    # stacked gate on the 4-layer model: one steered layer (3), w [1 row, 2 people, 3 * 128], d and d_answer [1, 128]
    assert out["artifact_bytes"] == (2 * 3 * 128 + 2 * 128) * 4
    assert math.isclose(out["size_ratio"], 128 * 128 * 4 / out["artifact_bytes"])
    # as dense matrices: per person a 3d x d matrix for the direction and one for the answer direction
    assert math.isclose(out["release_form_ratio"], 2 * 2 * 3 * 128 * 128 * 4 / out["artifact_bytes"])
    assert out["fit_peak_small"] > 0 and out["fit_peak_large"] > 0
    # the high-water mark is reset after the build, so the fit's own peak shows (it read "+0" when the build's hid it)
    assert out["fit_growth_small"] > 1 << 20 and out["fit_growth_large"] > 1 << 20
    text = capsys.readouterr().out
    assert "3 answer steps" in text and "target <= 1.02" in text


def test_bench_steer_n_layers_sizes_the_random_model_only(capsys):
    import pytest

    for bad in (["--model", "quick", "--n-layers", "8"], ["--small", "--n-layers", "1"], ["--seed", "1"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            main(bad)
    err = capsys.readouterr().err
    assert "--n-layers" in err and "--seed picks the zoo model" in err and "positive integer, got 0" in err
    out = main(["--small", "--n-layers", "6", "--repeats", "1", "--new-tokens", "2"])
    # the paper's eraser steers every layer from the second on: 5 of the 6 (the 4-layer model: 3)
    assert "128, mllmeraser: 5 steered layers" in capsys.readouterr().out
    assert out["release_bytes"] == 5 * 128 * 128 * 4
