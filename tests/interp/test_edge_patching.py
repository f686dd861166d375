"""interp.edge_patching: patching single edges, checked against site patching and hand-made runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.adapters import get_module
from interp.edge_patching import (circuit_faithfulness, complement, copy_hooks, edge_hooks, faithfulness_curve,
                                  norm_module, patch_each_edge, patch_edge_sets, patch_edges, rms_norm, top_circuits)
from interp.edges import edge_graph, edge_names
from interp.lens import unembed
from interp.patching import logit_diff, patch_sites
from tests.conftest import random_image

PROMPTS = ["what is the name of the person in this image ?", "who is he"]


def _pair(model):
    size = 32 if model.arch == "llava" else 64
    clean = model.encode(images=[random_image(size, 1), random_image(size, 2)], prompts=PROMPTS)
    corrupt = model.encode(images=[random_image(size, 3), random_image(size, 4)], prompts=PROMPTS)
    return clean, corrupt


def _caches(model, clean, corrupt):
    with torch.no_grad():
        cl, cc = model.run_with_cache(clean, names=edge_names(model) + [f"blocks.{model.n_layers - 1}.hook_resid_post"])
        kl, kc = model.run_with_cache(corrupt, names=edge_names(model) + [f"blocks.{model.n_layers - 1}.hook_resid_post"])
    return cl, cc, kl, kc


def test_rms_norm_is_the_modules(tiny_model):
    for reader in ("L0.attn_in", "L1.mlp_in", "logits"):
        norm = norm_module(tiny_model, reader)
        x = torch.randn(2, 5, tiny_model.d_model)
        with torch.no_grad():
            assert torch.allclose(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x), atol=1e-6)


def test_every_edge_into_a_reader_is_patching_its_input(tiny_model):
    """Giving a reader every writer's clean value is patching its normalised input with the clean run's."""
    clean, corrupt = _pair(tiny_model)
    metric = logit_diff(5, 7)
    _, cc, _, _ = _caches(tiny_model, clean, corrupt)
    g = edge_graph(tiny_model)
    for reader, site in (("L1.attn_in", "blocks.1.ln1.hook_normalized"), ("L2.mlp_in", "blocks.2.ln2.hook_normalized")):
        parents = [(u, reader) for u in g.upstream if g.is_edge(u, reader)]
        got = patch_edges(tiny_model, corrupt, cc, parents, metric)
        real = patch_sites(tiny_model, clean, corrupt, [site], metric)
        assert np.allclose(got, real.rows[site], atol=1e-4)
        assert abs(real.effects[site]) > 0.01  # not a site that does nothing


def test_an_edge_into_the_logits_is_its_direct_path(tiny_model):
    """One MLP's clean output given to the logits alone: the corrupted final residual plus the difference,
    through the final norm and the unembedding by hand."""
    clean, corrupt = _pair(tiny_model)
    metric = logit_diff(5, 7)
    _, cc, kl, kc = _caches(tiny_model, clean, corrupt)
    n = tiny_model.n_layers
    got = patch_edges(tiny_model, corrupt, cc, [("L0.mlp", "logits")], metric)
    final = kc[f"blocks.{n - 1}.hook_resid_post"] + cc["blocks.0.hook_mlp_out"] - kc["blocks.0.hook_mlp_out"]
    norm = get_module(tiny_model.hf_model, tiny_model.adapter.final_norm)
    with torch.no_grad():
        logits = unembed(tiny_model, norm(final))
    assert np.allclose(got, metric(logits, corrupt).tolist(), atol=1e-4)
    assert not np.allclose(got, metric(kl, corrupt).tolist(), atol=1e-3)  # it changed something


def test_a_head_edge_moves_only_its_reader(tiny_llava):
    """An edge into block 2's MLP leaves block 2's attention input, and every residual stream before it, as the
    corrupted run has them."""
    clean, corrupt = _pair(tiny_llava)
    _, cc, _, kc = _caches(tiny_llava, clean, corrupt)
    hooks = edge_hooks(tiny_llava, cc, [("L0H1", "L2.mlp_in")])
    names = ["blocks.2.hook_resid_mid", "blocks.2.ln2.hook_normalized", "blocks.2.ln1.hook_normalized"]
    with torch.no_grad():
        _, plain = tiny_llava.run_with_cache(corrupt, names=names)
        _, patched = tiny_llava.run_with_cache(corrupt, names=names, hooks=hooks)
    assert torch.equal(patched["blocks.2.hook_resid_mid"], plain["blocks.2.hook_resid_mid"])
    assert torch.equal(patched["blocks.2.ln1.hook_normalized"], plain["blocks.2.ln1.hook_normalized"])
    assert not torch.allclose(patched["blocks.2.ln2.hook_normalized"], plain["blocks.2.ln2.hook_normalized"])


def test_circuits_of_everything_and_nothing(tiny_model):
    clean, corrupt = _pair(tiny_model)
    metric = logit_diff(5, 7)
    every = edge_graph(tiny_model).edges()
    full, empty = faithfulness_curve(tiny_model, clean, corrupt, [every, []], metric)
    assert full == pytest.approx(1.0, abs=1e-4) and empty == pytest.approx(0.0, abs=1e-4)
    assert complement(tiny_model, every) == [] and complement(tiny_model, []) == every


def test_each_edge_and_the_top_circuits(tiny_llava):
    clean, corrupt = _pair(tiny_llava)
    metric = logit_diff(5, 7)
    g = edge_graph(tiny_llava)
    some = [("image", "L0.attn_in"), ("L0H1", "L2.mlp_in"), ("L1.mlp", "logits")]
    each = patch_each_edge(tiny_llava, clean, corrupt, metric, edges=some)
    assert each.meta["method"] == "edge_patching" and np.isfinite(each.effects).sum() == 3
    _, cc, _, _ = _caches(tiny_llava, clean, corrupt)
    for u, v in some:
        assert each.patched[g.upstream.index(u), g.downstream.index(v)] == pytest.approx(
            float(np.mean(patch_edges(tiny_llava, corrupt, cc, [(u, v)], metric))), abs=1e-5)
    circuits = top_circuits(each, [1, 3])
    assert circuits[0] == each.top(1) and len(circuits[1]) == 3
    one = circuit_faithfulness(tiny_llava, clean, corrupt, circuits[0], metric)
    assert one == pytest.approx(faithfulness_curve(tiny_llava, clean, corrupt, circuits, metric)[0], abs=1e-6)


def test_bad_input_is_refused_before_running(tiny_llava, tiny_qwen):
    clean, corrupt = _pair(tiny_llava)
    metric = logit_diff(5, 7)
    _, cc, _, _ = _caches(tiny_llava, clean, corrupt)
    with pytest.raises(ValueError, match="runs after"):
        patch_edges(tiny_llava, corrupt, cc, [("L2.mlp", "L1.attn_in")], metric)
    with pytest.raises(ValueError, match="unknown writer"):
        circuit_faithfulness(tiny_llava, clean, corrupt, [("L9H0", "logits")], metric)
    with pytest.raises(ValueError, match="no edges"):
        patch_each_edge(tiny_llava, clean, corrupt, metric, edges=[])
    with torch.no_grad():
        _, partial = tiny_llava.run_with_cache(clean, names=["hook_embed"])
    with pytest.raises(ValueError, match="lacks"):
        patch_edges(tiny_llava, corrupt, partial, [("image", "logits")], metric)
    short = tiny_llava.encode(images=[random_image(32, 1), random_image(32, 2)], prompts=["who", "who is he"])
    with pytest.raises(ValueError):
        patch_each_edge(tiny_llava, clean, short, metric, edges=[("image", "logits")])


def test_many_sets_per_pass_are_each_as_alone(tiny_model):
    clean, corrupt = _pair(tiny_model)
    metric = logit_diff(5, 7)
    some = edge_graph(tiny_model).edges()[::7]
    one_a_pass = patch_each_edge(tiny_model, clean, corrupt, metric, edges=some, max_rows=2)
    batched = patch_each_edge(tiny_model, clean, corrupt, metric, edges=some, max_rows=64)
    ok = np.isfinite(one_a_pass.patched)
    assert ok.sum() == len(some)
    assert np.allclose(one_a_pass.patched[ok], batched.patched[ok], atol=1e-5)
    circuits = [some[:3], [], some]
    assert faithfulness_curve(tiny_model, clean, corrupt, circuits, metric, max_rows=2) == pytest.approx(
        faithfulness_curve(tiny_model, clean, corrupt, circuits, metric, max_rows=None), abs=1e-5)
    _, cc, _, _ = _caches(tiny_model, clean, corrupt)
    rows = patch_edge_sets(tiny_model, corrupt, cc, [[some[0]], [], [some[1]]], metric)
    assert rows[1] == pytest.approx(patch_edges(tiny_model, corrupt, cc, [], metric), abs=1e-5)  # an empty set: plain
    assert rows[2] == pytest.approx(patch_edges(tiny_model, corrupt, cc, [some[1]], metric), abs=1e-5)
    with pytest.raises(ValueError, match="copies"):  # a hook for 2 copies on a run of one
        tiny_model.run_with_hooks(corrupt, copy_hooks(tiny_model, cc, [[some[0]], [some[1]]]))
    with pytest.raises(ValueError, match="max_rows"):
        patch_edge_sets(tiny_model, corrupt, cc, [[some[0]]], metric, max_rows=0)


def test_a_blocks_queries_keys_and_values_are_its_attention_input(tiny_model):
    """Split per head, every edge into every query, key and value reader of a block is every edge into its
    attention input (ln1's output feeds nothing else)."""
    clean, corrupt = _pair(tiny_model)
    metric = logit_diff(5, 7)
    _, cc, _, _ = _caches(tiny_model, clean, corrupt)
    plain, split = edge_graph(tiny_model), edge_graph(tiny_model, qkv=True)
    whole = [(u, "L1.attn_in") for u in plain.upstream if plain.is_edge(u, "L1.attn_in")]
    parts = [(u, v) for v in split.attention_readers(1) for u in split.upstream if split.is_edge(u, v)]
    got, want = patch_edges(tiny_model, corrupt, cc, parts, metric), patch_edges(tiny_model, corrupt, cc, whole, metric)
    assert np.allclose(got, want, atol=1e-5)
    base = patch_edges(tiny_model, corrupt, cc, [], metric)
    assert not np.allclose(want, base, atol=1e-3)  # not a reader that does nothing


def test_one_heads_query_is_its_projection_of_the_clean_input(tiny_model):
    """Every writer into ``L1H2.q`` = the clean run's query of head 2, in the corrupted run, by hand; the other
    heads' queries, and every key and value, stay as they were."""
    clean, corrupt = _pair(tiny_model)
    metric = logit_diff(5, 7)
    names = edge_names(tiny_model) + ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k"]
    with torch.no_grad():
        _, cc = tiny_model.run_with_cache(clean, names=names)
        _, kc = tiny_model.run_with_cache(corrupt, names=names)
    g = edge_graph(tiny_model, qkv=True)
    edges = [(u, "L1H2.q") for u in g.upstream if g.is_edge(u, "L1H2.q")]

    def by_hand(q, ctx):
        q = q.clone()
        q[:, :, 2] = cc["blocks.1.attn.hook_q"][:, :, 2]
        return q

    with torch.no_grad():
        want = metric(tiny_model.run_with_hooks(corrupt, [("blocks.1.attn.hook_q", by_hand)]), corrupt).tolist()
        _, patched = tiny_model.run_with_cache(corrupt, names=names, hooks=edge_hooks(tiny_model, cc, edges))
    assert np.allclose(patch_edges(tiny_model, corrupt, cc, edges, metric), want, atol=1e-4)
    q, q0 = patched["blocks.1.attn.hook_q"], kc["blocks.1.attn.hook_q"]
    assert torch.allclose(q[:, :, 2], cc["blocks.1.attn.hook_q"][:, :, 2], atol=1e-5)
    assert not torch.allclose(q[:, :, 2], q0[:, :, 2], atol=1e-3)
    assert torch.equal(q[:, :, [0, 1, 3]], q0[:, :, [0, 1, 3]])
    assert torch.equal(patched["blocks.1.attn.hook_k"], kc["blocks.1.attn.hook_k"])


def test_circuits_split_per_head(tiny_model):
    clean, corrupt = _pair(tiny_model)
    metric = logit_diff(5, 7)
    every = edge_graph(tiny_model, qkv=True).edges()
    full, empty = faithfulness_curve(tiny_model, clean, corrupt, [every, []], metric, qkv=True)
    assert full == pytest.approx(1.0, abs=1e-4) and empty == pytest.approx(0.0, abs=1e-4)
    assert complement(tiny_model, [], qkv=True) == every and complement(tiny_model, every) == []
    # a split circuit is scored in the split graph without saying so; mixing the two graphs is refused
    some = [("L1.mlp", "logits"), ("L0H1", "L1H0.v"), ("image", "L0H0.k")]
    assert circuit_faithfulness(tiny_model, clean, corrupt, some, metric) == pytest.approx(
        circuit_faithfulness(tiny_model, clean, corrupt, some, metric, qkv=True), abs=1e-6)
    with pytest.raises(ValueError, match="split per head"):
        circuit_faithfulness(tiny_model, clean, corrupt, some + [("image", "L0.attn_in")], metric)
    each = patch_each_edge(tiny_model, clean, corrupt, metric, edges=some, max_rows=2)
    batched = patch_each_edge(tiny_model, clean, corrupt, metric, edges=some, max_rows=64)
    assert each.graph == edge_graph(tiny_model, qkv=True)
    ok = np.isfinite(each.patched)
    assert ok.sum() == 3 and np.allclose(each.patched[ok], batched.patched[ok], atol=1e-5)
