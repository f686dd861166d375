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
    vision_faithfulness_curve,
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
    with pytest.raises(NotImplementedError, match="per head"):
        VisionEdgeGraph(2, 2, qkv=True)


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
