"""The analyses' figures say which eraser they show."""
from __future__ import annotations

from eraser.plots import plot_leakage, png_annotations


def test_leakage_figure_names_the_variant_and_strength(tmp_path):
    data = {"attacks": {"mcq": {"vanilla": 0.9, "steered": 0.1, "label": "multiple choice"}},
            "collateral": {"retain": {"vanilla": 1.0, "steered": 0.95}},
            "config": {"eraser": {"variant": "mllmeraser_stacked_gate", "strength": -1.5}}}
    notes = png_annotations(plot_leakage(data, tmp_path / "leak.png"))
    assert notes["eraser"] == "mllmeraser_stacked_gate, λ=-1.5"
    assert notes["attacks"] == {"mcq": {"vanilla": 0.9, "steered": 0.1}}
    del data["config"]
    assert png_annotations(plot_leakage(data, tmp_path / "bare.png"))["eraser"] == ""
