"""analyses/gate_attribution.py end to end on the quick model (tiny --limit), its helpers, and its figure."""
from __future__ import annotations

import types

import pytest
import torch

from analyses import gate_attribution
from analyses.gate_attribution import family, gate_readouts
from eraser.plots import ANALYSIS_FIGURES, plot_gate_attribution

from . import is_png, quick_eraser, read_json, script_args  # noqa: F401


@pytest.fixture(scope="module")
def run(quick_eraser, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate_attribution")
    from . import one_thread

    with one_thread():
        res = gate_attribution.main(script_args(out, quick_eraser, 2))
    return out, res


def test_families():
    assert [family(l) for l in ("image", "text", "other", "L0H3", "L12H0", "L2.mlp")] == \
        ["image", "text", "other", "L0 heads", "L12 heads", "L2 mlp"]


def test_per_concept_gates_read_the_winning_concept():
    w = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]])  # one row, 2 concepts, 2 sites of d 2
    gate = types.SimpleNamespace(w=w)
    feats = [torch.tensor([[3.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 5.0]])]
    (readout, raw), = gate_readouts(gate, [["a", "b"]], feats)
    assert raw.tolist() == [3.0, 10.0]  # max over concepts: 3 vs 2, then 0 vs 10
    assert readout["a"].tolist() == [[1.0, 0.0], [0.0, 0.0]] and readout["b"].tolist() == [[0.0, 0.0], [0.0, 2.0]]


def test_shares_add_up_and_the_gate_separates(run):
    out, _ = run
    data = read_json(out / "gate_attribution.json")
    assert data["read"] in ("last", "mean") and data["n_items"] > 0
    for row in data["rows"]:
        assert row["max_abs_gap"] < 1e-3  # the components add up to the eraser's own gate value
        groups = row["groups"]
        assert {"forget/vqa", "forget/qa", "retain/vqa", "retain/qa"} <= set(groups)
        for g in groups.values():
            assert sum(g["families"].values()) == pytest.approx(g["gate"], abs=1e-4)
            assert sum(g["components"].values()) == pytest.approx(g["gate"], abs=1e-4)
            assert abs(g["families"]["other"]) < 1e-3
        assert groups["forget/qa"]["families"]["image"] == 0.0  # no picture, no image share
        assert groups["forget/vqa"]["gate"] > 0.5 > abs(groups["retain/vqa"]["gate"])
        # ablation: the last family before the gate's last site reaches it only directly, so total == direct;
        # the image's total effect on a forget picture question goes through later components
        ablation = row["ablation"]
        last = list(ablation)[-1]
        assert last.endswith("mlp")
        for g in ablation[last].values():
            assert g["total"] == pytest.approx(g["direct"], abs=1e-4)
        assert ablation["image"]["forget/qa"] == {"total": 0.0, "direct": 0.0}
        assert ablation["image"]["forget/vqa"]["total"] < -0.3
        for m, diff in row["contrast"].items():  # the families' differences add up to the gates' difference
            gap = groups[f"forget/{m}"]["gate"] - groups[f"retain/{m}"]["gate"]
            assert sum(diff.values()) == pytest.approx(gap, abs=1e-4)


def test_figure(run, tmp_path):
    out, _ = run
    assert is_png(out / "gate_attribution.png")
    assert ANALYSIS_FIGURES["gate_attribution"][1:] == ("gate_attribution.png", "gate_attribution.json")
    assert is_png(plot_gate_attribution(out, tmp_path / "again.png"))
    assert plot_gate_attribution(tmp_path / "none", tmp_path / "none.png") is None
