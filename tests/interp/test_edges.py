"""interp.edges: the graph's nodes and edges, and the EdgeScores value object."""
from __future__ import annotations

import numpy as np
import pytest

from interp.edges import (EdgeGraph, EdgeScores, edge_graph, edge_names, greedy_circuit, input_reader, input_readers,
                          reader_input_name, reader_norm_name)


def test_graph_of_a_model(tiny_model):
    g = edge_graph(tiny_model)
    n, h = tiny_model.n_layers, tiny_model.head_counts["lm"][0]
    assert (g.n_layers, g.n_heads) == (n, h)
    assert len(g.upstream) == 2 + n * (h + 1) and len(g.downstream) == 2 * n + 1
    names = edge_names(tiny_model)
    assert names[0] == "hook_embed" and len(names) == 1 + 2 * n
    assert all(x in tiny_model.hook_names() for x in names)
    assert reader_input_name(tiny_model, "logits") == f"blocks.{n - 1}.hook_resid_post"
    assert reader_norm_name(tiny_model, "L1.mlp_in") == "blocks.1.ln2.hook_normalized"


def test_edges_run_forward_only():
    g = EdgeGraph(n_layers=3, n_heads=2)
    edges = g.edges()
    # readers: L0.attn_in 2, L0.mlp_in 4, L1.attn_in 5, L1.mlp_in 7, L2.attn_in 8, L2.mlp_in 10, logits 11
    assert len(edges) == 2 + 4 + 5 + 7 + 8 + 10 + 11
    assert ("L0H1", "L0.mlp_in") in edges and ("L0.mlp", "L0.mlp_in") not in edges
    assert ("L1H0", "L1.attn_in") not in edges and ("L2.mlp", "logits") in edges
    assert g.is_edge("image", "L0.attn_in") and not g.is_edge("L2H1", "L2.attn_in")
    assert len(set(edges)) == len(edges)


@pytest.mark.parametrize("bad, match", [
    (("L0H5", "logits"), "unknown writer"),
    (("L3H0", "logits"), "unknown writer"),
    (("L0.mlp", "L0.attn_out"), "unknown reader"),
    (("L0H0", "L3.attn_in"), "3 blocks"),
    (("L2.mlp", "L1.attn_in"), "runs after"),
    (("L0H0",), "pair"),
    (("L0H0", ["logits"]), "pair"),
])
def test_bad_edges_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        EdgeGraph(n_layers=3, n_heads=2).check_edges([bad])


def test_scores_rank_normalise_and_round_trip(tmp_path):
    g = EdgeGraph(n_layers=1, n_heads=1)  # writers image, text, L0H0, L0.mlp; readers L0.attn_in, L0.mlp_in, logits
    patched = np.full((4, 3), np.nan)
    patched[0, 0], patched[2, 1], patched[3, 2], patched[1, 2] = 3.0, -1.0, 1.5, 2.0
    s = EdgeScores(g.upstream, g.downstream, patched, clean=3.0, corrupted=1.0, meta={"method": "x"})
    assert s.value("image", "L0.attn_in") == pytest.approx(1.0)
    assert s.value("L0H0", "L0.mlp_in") == pytest.approx(-1.0)
    assert s.top(2) == [("image", "L0.attn_in"), ("L0H0", "L0.mlp_in")]  # |1| ties |-1|: graph order
    assert s.top(2, by_abs=False) == [("image", "L0.attn_in"), ("text", "logits")]
    assert [r[2] for r in s.ranked()] == pytest.approx([1.0, -1.0, 0.5, 0.25])
    s.save(tmp_path / "s.json")
    back = EdgeScores.load(tmp_path / "s.json")
    assert np.array_equal(np.isnan(back.patched), np.isnan(s.patched))
    assert np.allclose(np.nan_to_num(back.patched), np.nan_to_num(s.patched)) and back.meta == {"method": "x"}
    with pytest.raises(KeyError, match="no edge"):
        s.value("L0.mlp", "L0.attn_out")
    with pytest.raises(ValueError, match="writers x readers"):
        EdgeScores(g.upstream, g.downstream, patched[:3], clean=1.0, corrupted=0.0)
    with pytest.raises(ValueError, match="k must be"):
        s.top(-1)
    assert np.isnan(EdgeScores(g.upstream, g.downstream, patched, 1.0, 1.0).effects).all()


def test_greedy_circuits_grow_from_the_logits():
    g = EdgeGraph(n_layers=2, n_heads=1)  # writers image, text, L0H0, L0.mlp, L1H0, L1.mlp
    patched = np.full((len(g.upstream), len(g.downstream)), np.nan)
    up, down = g.upstream.index, g.downstream.index
    for u, v in g.edges():
        patched[up(u), down(v)] = 0.01
    patched[up("image"), down("L0.attn_in")] = 0.9      # the best edge, but nothing it feeds is kept yet
    patched[up("L0H0"), down("logits")] = 0.5
    patched[up("L1.mlp"), down("logits")] = 0.3
    patched[up("image"), down("L1.mlp_in")] = 0.2
    s = EdgeScores(g.upstream, g.downstream, patched, clean=1.0, corrupted=0.0)
    assert s.graph == g
    assert s.top(1) == [("image", "L0.attn_in")]
    circuit = greedy_circuit(s, 4)
    assert circuit == [("L0H0", "logits"), ("image", "L0.attn_in"), ("L1.mlp", "logits"), ("image", "L1.mlp_in")]
    assert input_reader(g, "L0H0") == "L0.attn_in" and input_reader(g, "L1.mlp") == "L1.mlp_in"
    assert input_reader(g, "text") is None
    assert len(greedy_circuit(s, 1000)) == len(g.edges())  # every edge is on a path to the logits
    assert greedy_circuit(s, 0) == []
    with pytest.raises(ValueError, match="k must be"):
        greedy_circuit(s, -2)


def test_graph_split_per_head_with_grouped_keys():
    g = EdgeGraph(n_layers=2, n_heads=4, n_kv_heads=2, qkv=True)
    assert g.attention_readers(1) == ["L1H0.q", "L1H1.q", "L1H2.q", "L1H3.q", "L1H0.k", "L1H1.k", "L1H0.v", "L1H1.v"]
    assert len(g.downstream) == 2 * (8 + 1) + 1 and "L0.attn_in" not in g.downstream
    # key/value head g serves query heads 2g and 2g + 1 (transformers' repeat_kv)
    assert g.head_inputs(1, 3) == ["L1H3.q", "L1H1.k", "L1H1.v"] and g.head_inputs(0, 0) == ["L0H0.q", "L0H0.k", "L0H0.v"]
    assert g.is_edge("L0H2", "L1H1.v") and not g.is_edge("L1H2", "L1H0.q") and g.is_edge("image", "L0H3.q")
    assert g.reader_parts("L1H1.k") == ("k", 1, 1) and g.reader("L0H3.q") == ("q", 0)
    plain = EdgeGraph(n_layers=2, n_heads=4, n_kv_heads=2)
    # every edge into a block's attention input becomes one per query, key and value reader
    n_attn = sum(1 for _, v in plain.edges() if v.endswith("attn_in"))
    assert len(g.edges()) == len(plain.edges()) + 7 * n_attn
    s = EdgeScores(g.upstream, g.downstream, np.zeros((len(g.upstream), len(g.downstream))), 1.0, 0.0)
    assert s.graph == g and EdgeScores(plain.upstream, plain.downstream, np.zeros((12, 5)), 1.0, 0.0).graph == plain
    with pytest.raises(ValueError, match="input_readers"):
        input_reader(g, "L0H0")
    assert input_readers(g, "L1H2") == ["L1H2.q", "L1H1.k", "L1H1.v"] and input_readers(plain, "L1H2") == ["L1.attn_in"]


@pytest.mark.parametrize("graph, edge, match", [
    (EdgeGraph(2, 4, 2, qkv=True), ("image", "L0.attn_in"), "split per head"),
    (EdgeGraph(2, 4, 2), ("image", "L0H1.q"), "qkv=True"),
    (EdgeGraph(2, 4, 2, qkv=True), ("image", "L0H2.k"), "2 key/value heads"),
    (EdgeGraph(2, 4, 2, qkv=True), ("image", "L0H4.q"), "4 query heads"),
    (EdgeGraph(2, 4, 2, qkv=True), ("image", "L0H0.x"), "unknown reader"),
    (EdgeGraph(2, 4, 2, qkv=True), ("L1H0", "L1H0.q"), "runs after"),
])
def test_bad_head_readers_are_named(graph, edge, match):
    with pytest.raises(ValueError, match=match):
        graph.check_edges([edge])


def test_bad_key_value_head_counts():
    with pytest.raises(ValueError, match="n_kv_heads must divide"):
        EdgeGraph(2, 4, 3)


def test_greedy_circuit_split_per_head_follows_the_keys_and_values():
    g = EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=1, qkv=True)
    patched = np.full((len(g.upstream), len(g.downstream)), np.nan)
    up, down = g.upstream.index, g.downstream.index
    for u, v in g.edges():
        patched[up(u), down(v)] = 0.01
    patched[up("L1H1"), down("logits")] = 0.9
    patched[up("L0.mlp"), down("L1H0.k")] = 0.5   # the key L1H1 shares with L1H0: reachable once L1H1 is in
    patched[up("image"), down("L1H0.q")] = 0.4    # L1H0's own query: not reachable (L1H0 is not in)
    s = EdgeScores(g.upstream, g.downstream, patched, clean=1.0, corrupted=0.0)
    assert greedy_circuit(s, 2) == [("L1H1", "logits"), ("L0.mlp", "L1H0.k")]
    assert greedy_circuit(s, 3)[2] != ("image", "L1H0.q")


@pytest.mark.parametrize("graph", [EdgeGraph(3, 2), EdgeGraph(2, 4, 2, qkv=True), EdgeGraph(1, 1, qkv=True)])
def test_edge_mask_is_every_pair_checked(graph):
    up, down = graph.upstream, graph.downstream
    want = np.array([[graph.is_edge(u, v) for v in down] for u in up])
    assert np.array_equal(graph.edge_mask(), want)
    assert graph.edges() == [(u, v) for v in down for u in up if graph.is_edge(u, v)]
