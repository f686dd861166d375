"""analyses/circuit.py end to end on the quick model (tiny --limit), its helpers, and its figure."""
from __future__ import annotations

import numpy as np
import pytest

from analyses import circuit
from eraser.plots import ANALYSIS_FIGURES, plot_circuit
from interp.edge_attribution import edge_cut_sum
from interp.edges import EdgeScores

from . import is_png, read_json

N_EDGES = 114  # the quick LLaVA: 4 blocks of 4 heads


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("circuit")
    from . import one_thread

    with one_thread():
        res = circuit.main(["--quick", "--out", str(out), "--limit", "2", "--no-progress", "--pairs", "2",
                            "--steps", "8"])
    return out, res


def test_ladder_and_fewest():
    assert circuit.ladder(114) == [1, 2, 3, 5, 8, 12, 20, 30, 50, 80, 114]
    assert circuit.ladder(532)[-3:] == [300, 400, 532]
    assert circuit.ladder(5) == [1, 2, 3, 5]
    assert circuit.fewest([1, 5, 20], [0.1, 0.85, 1.0]) == 5
    assert circuit.fewest([1, 5], [0.1, 0.5]) is None


def test_help_and_refused_flags(capsys):
    with pytest.raises(SystemExit) as e:
        circuit.main(["--help"])
    assert e.value.code == 0 and "--steps" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="vanilla model"):
        circuit.main(["--quick", "--strength", "-1"])
    with pytest.raises(SystemExit) as e:
        circuit.main(["--steps", "0"])
    assert e.value.code == 2


def test_edges_and_agreement(run):
    out, res = run
    data = read_json(out / "circuit.json")
    assert data["n_edges"] == N_EDGES and len(data["edges"]) == N_EDGES and data["n_pairs"] >= 1
    assert data["clean"] - data["corrupted"] > 5  # the model knows who is who
    scores = {m: EdgeScores.from_dict(data["scores"][m]) for m in circuit.METHODS}
    assert scores["integrated"].meta == {"method": "integrated", "n_rows": data["n_pairs"], "steps": 8}
    for m in circuit.METHODS:
        assert len(data["effects"][m]) == N_EDGES and np.isfinite(data["effects"][m]).all()
        assert scores[m].clean == pytest.approx(data["clean"])
    # every edge into the logits patched alone: close to the whole difference (the final residual is their sum,
    # and the interactions are small); integrated closer to it than first order
    assert 0.8 < edge_cut_sum(scores["patching"]) < 1.2
    assert abs(edge_cut_sum(scores["integrated"]) - 1) < abs(edge_cut_sum(scores["attribution"]) - 1)
    ag = data["agreement"]
    assert ag["integrated"]["pearson_r"] > 0.8 and ag["integrated"]["pearson_r"] > ag["attribution"]["pearson_r"]
    assert [r["edge"] for r in data["top_edges"]] == [list(e) for e in scores["patching"].top(10)]


def test_circuits(run):
    _, res = run
    counts = res["counts"]
    assert counts[-1] == N_EDGES
    for build in circuit.BUILDS:
        curves = res["faithfulness"][build]
        assert set(curves) == {"patching", "attribution", "integrated", "random"}
        for f in curves.values():
            assert f[-1] == pytest.approx(1.0, abs=1e-3)  # every edge kept: the clean run
        i = counts.index(50)
        assert curves["patching"][i] > 0.6 and curves["random"][i] < 0.3  # the ranking finds the paths
        assert res["fewest_for_80pct"][build]["patching"] <= 80
        assert res["fewest_for_80pct"][build]["random"] == N_EDGES


def test_figure(run, tmp_path):
    out, res = run
    assert is_png(out / "circuit.png")
    assert ANALYSIS_FIGURES["circuit"][1:] == ("circuit.png", "circuit.json")
    assert is_png(plot_circuit(out, tmp_path / "again.png"))
    assert plot_circuit(tmp_path / "nothing_here", tmp_path / "none.png") is None


def test_split_per_head(run, tmp_path):
    """``--qkv``: the same pairs on the graph split per head; the readers both graphs share (MLP inputs, logits)
    get the same patched effects, and the attention input's effect now divides among queries, keys and values."""
    _, plain = run
    from . import one_thread

    with one_thread():
        res = circuit.main(["--quick", "--out", str(tmp_path), "--limit", "2", "--no-progress", "--pairs", "2",
                            "--steps", "4", "--qkv"])
    assert res["config"]["qkv"] is True and res["n_edges"] == 532 and res["counts"][-1] == 532
    assert set(res["by_input"]["patching"]) == {"q", "k", "v", "mlp_in", "logits"}
    assert set(plain["by_input"]["patching"]) == {"attn_in", "mlp_in", "logits"}
    for kind in ("mlp_in", "logits"):
        assert res["by_input"]["patching"][kind] == pytest.approx(plain["by_input"]["patching"][kind], abs=1e-5)
    shared = {f"{u} -> {v}": x for (u, v), x in zip(plain["edges"], plain["effects"]["patching"]) if "attn_in" not in v}
    split = {f"{u} -> {v}": x for (u, v), x in zip(res["edges"], res["effects"]["patching"])}
    assert all(split[k] == pytest.approx(x, abs=1e-5) for k, x in shared.items())
    # measured on the quick LLaVA model: the portrait reaches the heads through their values, not their queries
    v, q = res["by_input"]["patching"]["v"], res["by_input"]["patching"]["q"]
    assert v > 0.2 and v > 5 * abs(q)
    for build in circuit.BUILDS:
        assert res["faithfulness"][build]["patching"][-1] == pytest.approx(1.0, abs=1e-3)
