"""The steering benchmark runs end to end on the 1M-parameter random model (no timing is asserted)."""
from __future__ import annotations

import math

from analyses.bench_steer import main


def test_bench_steer_with_answer_steering_reports_every_ratio(capsys):
    out = main(["--small", "--repeats", "1", "--new-tokens", "4", "--variant", "mllmeraser_stacked_gate"])
    assert out["variant"] == "mllmeraser_stacked_gate"
    assert out["fast_ratio"] > 0 and out["graph_ratio"] > 0
    # stacked gate on the 4-layer model: one steered layer (3), w [1 row, 2 people, 3 * 128], d and d_answer [1, 128]
    assert out["artifact_bytes"] == (2 * 3 * 128 + 2 * 128) * 4
    assert math.isclose(out["size_ratio"], 128 * 128 * 4 / out["artifact_bytes"])
    assert out["fit_peak_small"] > 0 and out["fit_peak_large"] > 0
    text = capsys.readouterr().out
    assert "3 answer steps" in text and "target <= 1.02" in text
