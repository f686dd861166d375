"""Stacked gates (``EraserConfig.gate_stack``): one gate over several layers' reads, applied in one causal pass."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from eraser import ArtifactError, EraserConfig, MLLMEraser
from eraser.features import check_stack, gate_rows, read_names, row_features
from eraser.gate import fit_gate
from eraser.stats import projectors_from_stats
from eraser.steer import add_direction, prompt_mask
from interp import prefill_only
from interp.collect import query_activations
from tests.eraser.test_method import _queries

STACK = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]


@pytest.fixture(scope="module")
def stacked(tiny_llava):
    forget = _queries(12, 1, 100, text_only_every=0)
    retain = _queries(60, 2, 200)
    config = EraserConfig(layers=(2,), gate_stack=(1, 2), rho=0.5, gamma=1e-3, strength=-4.0, batch_size=16,
                          gate_read="mean")
    eraser = MLLMEraser.fit(tiny_llava, forget, retain, _queries(6, 3, 300), _queries(6, 4, 400), config)
    return eraser, forget, retain


def _inputs(model, queries):
    imgs, prompts = zip(*queries)
    return model.encode(images=list(imgs), prompts=list(prompts))


def test_rows_and_features():
    per_layer = EraserConfig(layers=(1, 2))
    assert gate_rows(per_layer, [1, 2]) == [["blocks.1.hook_resid_pre"], ["blocks.2.hook_resid_pre"]]
    assert gate_rows(EraserConfig(gate_stack=(1, 2), site="resid_post"), [2]) == [
        ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]]
    assert read_names([["a", "b"], ["b", "c"]]) == ["a", "b", "c"]
    batch = {"a": torch.ones(3, 2), "b": 2 * torch.ones(3, 2)}
    (h,) = row_features(batch, [["a", "b"]])
    assert torch.equal(h, torch.tensor([[1.0, 1, 2, 2]] * 3))
    with pytest.raises(KeyError, match="'c'"):
        row_features(batch, [["a", "c"]])


def test_stacks_that_cannot_run_causally_are_refused(tiny_llava):
    check_stack((1, 2), (2,), 3)
    with pytest.raises(ValueError, match=r"cannot steer the earlier layers \[1\]"):
        check_stack((1, 2), (1, 2), 3)
    with pytest.raises(ValueError, match=r"\[5\] are not decoder layers"):
        check_stack((1, 5), (5,), 3)
    for bad in [(), (2, 1), (1, 1), (-1, 2), ("a",)]:
        with pytest.raises(ValueError, match="gate_stack"):
            EraserConfig(gate_stack=bad)
    assert EraserConfig(gate_stack=[1, 2]).gate_stack == (1, 2)  # the JSON list an artifact stores
    q = _queries(4, 1, 100)
    with pytest.raises(ValueError, match="earlier layers"):
        MLLMEraser.fit(tiny_llava, q, q, q[:2], q[:2], EraserConfig(layers=(1, 2), gate_stack=(1, 2)))


def test_stacked_gate_is_the_ridge_gate_on_concatenated_reads(stacked, tiny_llava):
    eraser, forget, retain = stacked
    d = tiny_llava.d_model
    assert eraser.layers == [2] and eraser.w.shape == (1, 2 * d) and eraser.d.shape == (1, d)

    def H(qs):
        acts = query_activations(tiny_llava, [q[0] for q in qs], [q[1] for q in qs], STACK, 16, read="mean")
        return torch.cat([acts[n] for n in STACK], dim=1).double()

    H_f, H_r = H(forget), H(retain)
    stats = MLLMEraser.collect_stats(tiny_llava, forget, retain, _queries(6, 3, 300), _queries(6, 4, 400),
                                     eraser.config)
    assert stats.K_r.shape == (1, 2 * d, 2 * d) and stats.gate_stack == [1, 2]
    torch.testing.assert_close(stats.K_r[0], H_r.T @ H_r, rtol=1e-6, atol=1e-6)
    P = projectors_from_stats(stats, rho=0.5)[0][0]
    torch.testing.assert_close(eraser.w[0].double(), fit_gate(H_f, P, 1e-3), rtol=1e-3, atol=1e-4)
    # its values: forget near 1, retain in the null space of the stacked retain reads
    g_f, g_r = eraser.gate_values(tiny_llava, forget), eraser.gate_values(tiny_llava, retain)
    assert g_f.shape == (12, 1)
    torch.testing.assert_close(g_f[:, 0], (H_f @ eraser.w[0].double()).float(), rtol=1e-4, atol=1e-4)
    assert abs(float(g_f.mean()) - 1) < 0.1 and float(g_r.abs().mean()) < 0.25 * float(g_f.abs().mean())


def test_stacked_hooks_steer_by_hand_and_agree_across_backends(stacked, tiny_llava):
    eraser, forget, retain = stacked
    queries = forget[:3] + retain[:3]
    inputs = _inputs(tiny_llava, queries)
    vanilla = tiny_llava.run_with_hooks(inputs, [])
    g = eraser.gate_values(tiny_llava, queries)[:, 0]

    def by_hand(x, ctx):
        return add_direction(x, -4.0 * g.to(x.dtype), eraser.d[0], prompt_mask(x, ctx))

    expected = tiny_llava.run_with_hooks(inputs, [("blocks.2.hook_resid_pre", prefill_only(by_hand))])
    record: list = []
    graph = tiny_llava.run_with_hooks(inputs, eraser.hooks(record=record))
    torch.testing.assert_close(graph, expected, rtol=1e-5, atol=1e-5)
    assert (graph - vanilla).abs().max() > 1e-3
    assert [(layer, step) for layer, step, _ in record] == [(2, 0)]
    torch.testing.assert_close(record[0][2], g, rtol=1e-5, atol=1e-5)
    # the fast path gives the same logits and the same generation; detaching restores vanilla bit for bit
    graph_gen = tiny_llava.generate(inputs, max_new_tokens=4, eos_token_id=None, hooks=eraser.hooks())
    with eraser.attached(tiny_llava, backend="torch"):
        assert torch.equal(tiny_llava.run_with_hooks(inputs, []), graph)
        fast_gen = tiny_llava.generate(inputs, max_new_tokens=4, eos_token_id=None)
    assert torch.equal(fast_gen.sequences, graph_gen.sequences)
    assert torch.equal(tiny_llava.run_with_hooks(inputs, []), vanilla)
    # shipped by value (nnsight's remote serialisation), the readers and the steering still share their state
    remote = tiny_llava.run_with_hooks(inputs, eraser.hooks(), remote="local")
    assert (remote - graph).abs().max() <= 1e-5
    # a window above every gate steers nothing; strength 0 registers no hook at all
    off = eraser.with_config(gate_window=(float(g.max()) + 1, float(g.max()) + 2))
    assert torch.equal(tiny_llava.run_with_hooks(inputs, off.hooks()), vanilla)
    assert eraser.hooks(strength=0.0) == []


def test_every_step_reads_each_new_token(stacked, tiny_llava):
    eraser, forget, _ = stacked
    inputs = _inputs(tiny_llava, forget[:2])
    record: list = []
    tiny_llava.generate(inputs, max_new_tokens=3, eos_token_id=None, hooks=eraser.hooks(record=record, every_step=True),
                        every_step=True)
    assert [step for _, step, _ in record] == [0, 1, 2]
    assert all(g.shape == (2,) for _, _, g in record)


def test_stacked_artifacts_round_trip_and_bad_shapes_are_refused(stacked, tiny_llava, tmp_path):
    eraser, forget, _ = stacked
    back = MLLMEraser.load(eraser.save(tmp_path / "s.safetensors"), tiny_llava)
    assert back.config.gate_stack == (1, 2) and torch.equal(back.w, eraser.w)
    torch.testing.assert_close(back.gate_values(tiny_llava, forget[:3]), eraser.gate_values(tiny_llava, forget[:3]))
    bad = replace(eraser, config=replace(eraser.config, gate_stack=(0, 1, 2)))  # 3 layers' width claimed
    bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(ArtifactError, match="stacked over 3 layers"):
        MLLMEraser.load(tmp_path / "bad.safetensors")
    s = eraser.scaled([2.0])
    torch.testing.assert_close(s.w, 2 * eraser.w)
    with pytest.raises(ValueError, match="2 factors for 1 stacked gate"):
        eraser.scaled([1.0, 1.0])
