"""eraser.plots.timing: fit-time ratios to MLLMEraser, exactly as the figure annotates them."""
from __future__ import annotations

import pytest

from eraser import plots

from .saved_runs import TIMING, assert_png


def test_timing_ratios_annotated(run_dir, tmp_path):
    expect = {m: TIMING[m]["fit_s"] / TIMING["mllmeraser"]["fit_s"] for m in ("ga", "npo", "steer_static")}
    assert plots.timing_ratios(TIMING) == pytest.approx(expect)
    p = plots.plot_timing(run_dir, tmp_path / "timing.png")
    assert_png(p)
    notes = plots.png_annotations(p)
    assert notes["ratios"] == pytest.approx(expect)  # exactly what the figure annotated, incl. 16.0x, 22.0x, 0.50x
    assert notes["eraser"] == "mllmeraser"
    assert plots.timing_ratios({"vanilla": {"fit_s": 0.0}, "ga": {"fit_s": 1.0}}) == {}  # no eraser -> no ratios
    # the timing dict alone works too
    assert plots.plot_timing(TIMING, tmp_path / "t2.png") is not None
