"""The fit-time benchmark runs on the quick model and reports a ratio per baseline (no timing is asserted)."""
from __future__ import annotations

import math

from analyses.bench_fit import BASELINES, main


def test_bench_fit_reports_every_ratio(capsys):
    out = main(["--model", "quick", "--repeats", "1", "--epochs", "1", "--threads", "1"])
    assert out["variant"] == "mllmeraser_stacked_gate"  # the variant that forgets on the default model
    assert out["mllmeraser_s"] > 0
    for m in BASELINES:
        assert out[f"{m}_s"] > 0
        assert math.isclose(out[f"{m}_ratio"], out[f"{m}_s"] / out["mllmeraser_s"])
    assert out["cheapest_ratio"] == min(out[f"{m}_ratio"] for m in BASELINES)
    assert "target >= 20x" in capsys.readouterr().out
