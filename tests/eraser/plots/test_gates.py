"""eraser.plots.gates: per-set gate summaries and the choice of the layer shown."""
from __future__ import annotations

import json

import numpy as np
import pytest

from eraser import plots

from .saved_runs import assert_png


def test_gates_summary_and_layer_choice(run_dir, tmp_path):
    gates = json.loads((run_dir / "gates.json").read_text())
    s = plots.gate_summary(gates)
    for name in ("forget", "retain", "test"):
        np.testing.assert_allclose(s["mean"][name], np.mean(gates["sets"][name]["gate"], axis=0))
    assert s["n"] == {"forget": 40, "retain": 60, "test": 30}
    p = plots.plot_gates(gates, tmp_path / "g.png")
    assert plots.png_annotations(p)["layer"] == 6  # middle of [2, 4, 6, 8, 10]
    p = plots.plot_gates(gates, tmp_path / "g2.png", layer=10)
    assert_png(p)
    assert plots.png_annotations(p)["layer"] == 10
    with pytest.raises(ValueError, match="not a steered layer"):
        plots.plot_gates(gates, tmp_path / "g3.png", layer=3)
    # no projections, one layer, constant gates: still a figure
    flat = {"layers": [5], "sets": {"forget": {"gate": [[1.0]] * 5}, "retain": {"gate": [[1.0]] * 5}}}
    assert_png(plots.plot_gates(flat, tmp_path / "g4.png"))
