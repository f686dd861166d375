"""interp.vision_edges: the vision tower's edges, patched, checked against the clean and corrupted runs and hand-made
patches on both architectures."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interp.adapters import get_module
from interp.edges import EdgeScores, greedy_circuit
from interp.patching import logit_diff
from interp.tiny import tiny_vlm
from interp.vision_edges import (
    VisionEdgeGraph, apply_norm, patch_each_vision_edge, patch_vision_edge_sets, vision_edge_graph, vision_edge_names,
    vision_copy_hooks, vision_faithfulness_curve, vision_graph_of,
)
from tests.conftest import random_image

PROMPTS = ["who is he", "who is she"]
METRIC = logit_diff(10, 20)


def _pair(model):
    size = 32 if model.arch == "llava" else 64
    clean = model.encode(images=[random_image(size, 1), random_image(size, 2)], prompts=PROMPTS)
    corrupt = model.encode(images=[random_image(size, 3), random_image(size, 4)], prompts=PROMPTS)
    return clean, corrupt


def test_the_graph_ends_where_the_projector_reads():
    """LLaVA-1.5 reads the second-to-last vision block (feature layer -2): the last block is not in the graph."""
    llava = tiny_vlm("llava", n_layers=2, vision_layers=3)
    g = vision_edge_graph(llava)
    assert g.n_layers == 2 and g.upstream == ["patches", "V0H0", "V0H1", "V0.mlp", "V1H0", "V1H1", "V1.mlp"]
    assert g.downstream == ["V0.attn_in", "V0.mlp_in", "V1.attn_in", "V1.mlp_in", "projector"]
    assert g.is_edge("V0H1", "V0.mlp_in") and not g.is_edge("V0.mlp", "V0.mlp_in") and g.is_edge("V0.mlp", "projector")
    assert len(g.edges()) == 1 * 5 + 2 * 4 + 1 * 3 + 2 * 2 + 1 * 1  # patches; block 0 heads, MLP; block 1's
    qwen = tiny_vlm("qwen2_5_vl", n_layers=2, vision_layers=3)
    assert vision_edge_graph(qwen).n_layers == 3  # Qwen2.5-VL's merger reads the last block
    assert vision_edge_names(llava)[0] == "vision.blocks.0.hook_resid_pre" and len(vision_edge_names(llava)) == 5
    with pytest.raises(ValueError, match="unknown vision writer"):
        g.check_edges([("L0H0", "projector")])
    with pytest.raises(ValueError, match="unknown vision reader"):
        g.check_edges([("patches", "V2.attn_in")])
    with pytest.raises(ValueError, match="no edge 'V1.mlp' -> 'V1.attn_in'"):
        g.check_edges([("V1.mlp", "V1.attn_in")])
    split = vision_edge_graph(llava, qkv=True)
    assert split.downstream[:7] == ["V0H0.q", "V0H1.q", "V0H0.k", "V0H1.k", "V0H0.v", "V0H1.v", "V0.mlp_in"]
    assert split.head_inputs(1, 0) == ["V1H0.q", "V1H0.k", "V1H0.v"] and split.is_edge("V0H1", "V1H0.k")
    with pytest.raises(ValueError, match="qkv=True"):
        g.check_edges([("patches", "V1H0.q")])
    with pytest.raises(ValueError, match="not in a graph split per head"):
        split.check_edges([("patches", "V1.attn_in")])
    assert vision_graph_of(llava, [("patches", "V1H0.v")]).qkv and not vision_graph_of(llava, g.edges()).qkv


def test_every_edge_is_the_clean_run_and_none_the_corrupted(tiny_model):
    clean, corrupt = _pair(tiny_model)
    g = vision_edge_graph(tiny_model)
    _, cache = tiny_model.run_with_cache(clean, names=vision_edge_names(tiny_model))
    with torch.no_grad():
        clean_rows = METRIC(tiny_model.run_with_hooks(clean, []), clean)
        corrupt_rows = METRIC(tiny_model.run_with_hooks(corrupt, []), corrupt)
    every, none = patch_vision_edge_sets(tiny_model, corrupt, cache, [g.edges(), []], METRIC, max_rows=None)
    assert np.allclose(every, clean_rows.tolist(), atol=1e-5) and np.allclose(none, corrupt_rows.tolist(), atol=1e-6)
    assert abs(float(clean_rows.mean() - corrupt_rows.mean())) > 1e-3  # the images matter
    assert vision_faithfulness_curve(tiny_model, clean, corrupt, [g.edges(), []], METRIC) == pytest.approx([1, 0],
                                                                                                            abs=1e-4)


def test_one_edge_is_the_hand_patch(tiny_model):
    """A head's edge into the projector: the read block's output plus that head's clean - corrupted share of the
    output projection; the patch embeddings into the last block's attention: its norm of the corrupted input plus
    the embeddings' difference.  Both by hand."""
    clean, corrupt = _pair(tiny_model)
    g = vision_edge_graph(tiny_model)
    last = g.n_layers - 1
    names = vision_edge_names(tiny_model)
    _, c_cache = tiny_model.run_with_cache(clean, names=names)
    resid = f"vision.blocks.{last}.hook_resid_pre"
    _, x_cache = tiny_model.run_with_cache(corrupt, names=sorted(set(names) | {resid}))
    z = "vision.blocks.0.attn.hook_z"
    w = get_module(tiny_model.hf_model, tiny_model.site(z).module).weight
    diff = (c_cache[z] - x_cache[z])[..., 1, :]  # head 1
    head_share = F.linear(diff, w[:, diff.shape[-1]:2 * diff.shape[-1]])
    out_site = f"vision.blocks.{last}.hook_resid_post"
    emb = c_cache["vision.blocks.0.hook_resid_pre"] - x_cache["vision.blocks.0.hook_resid_pre"]
    ln1_site = f"vision.blocks.{last}.ln1.hook_normalized"
    ln1 = get_module(tiny_model.hf_model, tiny_model.site(ln1_site).module)
    by_hand = {
        ("V0H1", "projector"): [(out_site, lambda x, ctx: x + head_share)],
        ("patches", f"V{last}.attn_in"): [(ln1_site, lambda y, ctx: apply_norm(ln1, x_cache[resid] + emb))],
    }
    got = patch_vision_edge_sets(tiny_model, corrupt, c_cache, [[e] for e in by_hand], METRIC, max_rows=2)
    for rows, (edge, hooks) in zip(got, by_hand.items()):
        with torch.no_grad():
            want = METRIC(tiny_model.run_with_hooks(corrupt, hooks), corrupt)
        assert np.allclose(rows, want.tolist(), atol=1e-5), edge
    with torch.no_grad():
        plain = METRIC(tiny_model.run_with_hooks(corrupt, []), corrupt)
    assert not np.allclose(got[0], plain.tolist(), atol=1e-5)  # the head's edge does something


def test_each_edge_scored_batched_or_not_and_a_circuit_grown_from_the_projector(tiny_model, tmp_path):
    clean, corrupt = _pair(tiny_model)
    scores = patch_each_vision_edge(tiny_model, clean, corrupt, METRIC, max_rows=6)
    alone = patch_each_vision_edge(tiny_model, clean, corrupt, METRIC, max_rows=2)
    assert np.allclose(scores.patched, alone.patched, equal_nan=True, atol=1e-6)
    g = vision_edge_graph(tiny_model)
    assert np.isfinite(scores.effects).sum() == len(g.edges()) and scores.meta["method"] == "vision_edge_patching"
    assert scores.value("patches", "projector") == max(e for _, _, e in scores.ranked(by_abs=False))  # measured
    assert isinstance(scores.graph, VisionEdgeGraph) and scores.graph == g
    circuit = greedy_circuit(scores, 4)
    assert circuit[0][1] == "projector" and len(circuit) == 4
    path = tmp_path / "v.json"
    scores.save(path)
    assert EdgeScores.load(path).graph == g
    kept = vision_faithfulness_curve(tiny_model, clean, corrupt, [circuit], METRIC)[0]
    assert 0.0 < kept <= 1.2  # four edges keep part of the clean behaviour


def test_bad_requests_are_named(tiny_llava):
    clean, corrupt = _pair(tiny_llava)
    text = tiny_llava.encode(images=[None, None], prompts=PROMPTS)
    with pytest.raises(ValueError, match="no images"):
        patch_each_vision_edge(tiny_llava, text, text, METRIC)
    with pytest.raises(ValueError, match="no edges"):
        patch_each_vision_edge(tiny_llava, clean, corrupt, METRIC, edges=[])
    short = tiny_llava.encode(images=[random_image(32, 1), random_image(32, 2)], prompts=["who", "who is she"])
    with pytest.raises(ValueError, match="line up"):
        patch_each_vision_edge(tiny_llava, short, corrupt, METRIC)
    _, cache = tiny_llava.run_with_cache(clean, names=["vision.blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="lacks"):
        patch_vision_edge_sets(tiny_llava, corrupt, cache, [[("patches", "projector")]], METRIC)


def test_a_blocks_queries_keys_and_values_together_are_its_attention_input(tiny_model):
    """Split per head: every head's query, key and value reader of block 0 given a writer's clean value equals its
    attention input given it (``ln1`` feeds nothing else); one head's query alone changes that head's query only."""
    clean, corrupt = _pair(tiny_model)
    _, cache = tiny_model.run_with_cache(clean, names=vision_edge_names(tiny_model))
    split = vision_edge_graph(tiny_model, qkv=True)
    readers = split.attention_readers(0)
    together = patch_vision_edge_sets(tiny_model, corrupt, cache, [[("patches", v) for v in readers]], METRIC)[0]
    whole = patch_vision_edge_sets(tiny_model, corrupt, cache, [[("patches", "V0.attn_in")]], METRIC)[0]
    assert np.allclose(together, whole, atol=1e-5)
    with torch.no_grad():
        plain = METRIC(tiny_model.run_with_hooks(corrupt, []), corrupt)
    assert not np.allclose(whole, plain.tolist(), atol=1e-5)
    q = "vision.blocks.0.attn.hook_q"
    hooks = vision_copy_hooks(tiny_model, cache, [[("patches", "V0H1.q")]])
    _, got = tiny_model.run_with_cache(corrupt, names=[q], hooks=hooks)
    _, ref = tiny_model.run_with_cache(corrupt, names=[q])
    _, want = tiny_model.run_with_cache(clean, names=[q])
    assert torch.allclose(got[q][..., 0, :], ref[q][..., 0, :])  # head 0 untouched
    assert torch.allclose(got[q][..., 1, :], want[q][..., 1, :], atol=1e-5)  # head 1: the clean query


def test_split_scores_and_circuits(tiny_model):
    clean, corrupt = _pair(tiny_model)
    scores = patch_each_vision_edge(tiny_model, clean, corrupt, METRIC, qkv=True)
    g = vision_edge_graph(tiny_model, qkv=True)
    assert scores.graph == g and np.isfinite(scores.effects).sum() == len(g.edges())
    circuit = greedy_circuit(scores, 6)
    assert circuit[0][1] == "projector"
    assert vision_faithfulness_curve(tiny_model, clean, corrupt, [g.edges(), []], METRIC) == pytest.approx([1, 0],
                                                                                                            abs=1e-4)
