"""NullSpaceGate (eraser/gate.py), the gate stage as a value object: the same weights and values as the eraser's
own, the null space's numbers, the window, save / load, and an eraser rebuilt from its two parts.
(The pure solve, fit_gate and the projector: tests/eraser/test_nullspace_gate.py.)"""
from __future__ import annotations

import pytest
import torch

from eraser import ArtifactError, ArtifactMismatchError, EraserConfig, MLLMEraser
from eraser.direction import ErasureDirection
from eraser.gate import NullSpaceGate
from tests.eraser.test_method import _queries


@pytest.fixture(scope="module")
def data():
    return _queries(12, 1, 100, text_only_every=0), _queries(40, 2, 200), _queries(6, 3, 300), _queries(6, 4, 400)


@pytest.fixture(scope="module")
def stats(tiny_llava, data):
    return MLLMEraser.collect_stats(tiny_llava, *data, EraserConfig(layers=(1, 2)))


def test_from_stats_is_the_erasers_gate(tiny_llava, data, stats):
    forget, retain = data[:2]
    # energy 1e-6 keeps the retain moment's exact null space (40 retain queries, rank 40 of d 128: 88 directions)
    gate = NullSpaceGate.from_stats(stats, gamma=1e-3, energy=1e-6)
    eraser = MLLMEraser.from_stats(stats, EraserConfig(layers=(1, 2), gamma=1e-3, energy=1e-6))
    assert torch.equal(gate.w, eraser.w) and torch.equal(eraser.gate.w, eraser.w)
    assert gate.settings == {"gamma": 1e-3, "rho": 0.3, "energy": 1e-6, "use_null_space": True}
    assert eraser.gate.settings == gate.settings and gate.projector["1"]["rank"] == tiny_llava.d_model - 40
    assert gate.projector == eraser.info["projector"] and gate.counts == {"forget": 12, "retain": 40}
    g_f, g_r = gate.values(tiny_llava, forget), gate.values(tiny_llava, retain)
    assert torch.equal(g_f, eraser.gate_values(tiny_llava, forget))
    # the closed form: ~1 on the forget queries it was fitted on (measured 0.967 / 0.991), and in the exact null
    # space of the retain queries exactly 0 up to float32 rounding (measured max 1.5e-7)
    assert g_f.shape == (12, 2) and (g_f.mean(0) - 1).abs().max() < 0.05
    assert g_r.abs().max() < 1e-5
    # without the null space the retain queries are not protected (measured mean |g| 0.79)
    open_gate = NullSpaceGate.from_stats(stats, gamma=1e-3, use_null_space=False)
    assert open_gate.projector["1"]["rule"] == "identity"
    assert open_gate.values(tiny_llava, retain).abs().mean() > 0.3


def test_window_and_raw_scores(tiny_llava, data, stats):
    forget = data[0]
    gate = NullSpaceGate.from_stats(stats, gamma=1e-3, energy=1e-6, window=(0.25, 0.75))
    raw = gate.values(tiny_llava, forget, raw=True)
    assert torch.allclose(gate.values(tiny_llava, forget), ((raw - 0.25) / 0.5).clamp(0, 1))
    with pytest.raises(ValueError, match="lo < hi"):
        NullSpaceGate([1], "resid_pre", torch.zeros(1, 8), window=(1.0, 0.5))
    with pytest.raises(ValueError, match=r"do not fit 2 gate row"):
        NullSpaceGate([1, 2], "resid_pre", torch.zeros(1, 8))
    with pytest.raises(ValueError, match="the gate-value set is empty"):
        gate.values(tiny_llava, [])


def test_stacked_and_concept_gates_round_trip(tiny_llava, data, tmp_path):
    forget, retain, recall, erase = data
    concepts = [f"p{i % 3}" for i in range(len(forget))]
    eraser = MLLMEraser.fit(tiny_llava, forget, retain, recall, erase,
                            EraserConfig(layers=(2,), energy=0.01, gate_stack=(1, 2), concept_gates=True),
                            forget_concepts=concepts)
    gate = eraser.gate
    assert gate.stack == [1, 2] and gate.concepts == ["p0", "p1", "p2"] and gate.w.shape == (1, 3, 2 * tiny_llava.d_model)
    back = NullSpaceGate.load(gate.save(tmp_path / "g.safetensors"), tiny_llava)
    assert torch.equal(back.w, gate.w) and back.stack == [1, 2] and back.concepts == gate.concepts
    assert torch.equal(back.values(tiny_llava, forget), eraser.gate_values(tiny_llava, forget))
    from dataclasses import replace

    unnamed = replace(eraser, info={})  # an artifact whose info lost the concepts' names still has a gate
    assert unnamed.gate.concepts == ["concept 0", "concept 1", "concept 2"]
    assert torch.equal(unnamed.gate_values(tiny_llava, forget), eraser.gate_values(tiny_llava, forget))


def test_save_load_refusals(tiny_llava, tiny_qwen, stats, tmp_path):
    gate = NullSpaceGate.from_stats(stats, gamma=0.1, energy=0.01, window=(0.2, 0.8))
    path = gate.save(tmp_path / "g.safetensors")
    back = NullSpaceGate.load(path, tiny_llava)
    assert torch.equal(back.w, gate.w) and back.window == (0.2, 0.8) and back.settings == gate.settings
    assert back.projector == gate.projector and back.data_hashes == gate.data_hashes
    with pytest.raises(ArtifactMismatchError, match="this gate was fitted on a different model"):
        NullSpaceGate.load(path, tiny_qwen)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="not a readable null-space gate"):
        NullSpaceGate.load(path)


def test_an_eraser_from_its_parts(tiny_llava, tiny_qwen, data, stats):
    eraser = MLLMEraser.from_stats(stats, EraserConfig(layers=(1, 2), gamma=1e-3, energy=0.01, strength=-3.0))
    rebuilt = MLLMEraser.from_parts(eraser.direction, eraser.gate, strength=-3.0)
    assert rebuilt.digest() == eraser.digest() and rebuilt.info["data_hashes"] == eraser.info["data_hashes"]
    # a direction read from other pairs, with this gate: steers along the new direction, gated the same way
    other = ErasureDirection.fit(tiny_llava, _queries(4, 8, 800), _queries(4, 9, 900), layers=[1, 2])
    mixed = MLLMEraser.from_parts(other, eraser.gate)
    assert torch.equal(mixed.d, other.vectors.float()) and torch.equal(mixed.w, eraser.w)
    with pytest.raises(ValueError, match="must match"):
        MLLMEraser.from_parts(ErasureDirection([1], "resid_pre", other.vectors[:1]), eraser.gate)
    with pytest.raises(ValueError, match="application settings only .*the rest comes from the direction and the gate"):
        MLLMEraser.from_parts(eraser.direction, eraser.gate, gamma=1.0)
    with pytest.raises(ValueError, match="the window is the gate's"):
        MLLMEraser.from_parts(eraser.direction, eraser.gate, gate_window=(0.1, 0.9))
    # from an audit: parts without fingerprints were never compared, so a 64-wide direction met a 128-wide gate
    # and failed inside the hook; and a zero direction made a silent no-op
    narrow = ErasureDirection([1, 2], "resid_pre", torch.randn(2, 64))
    with pytest.raises(ArtifactMismatchError, match="64 wide and the gate reads 128-wide"):
        MLLMEraser.from_parts(narrow, eraser.gate)
    with pytest.raises(ValueError, match="exactly zero at layers \\[1, 2\\]"):
        MLLMEraser.from_parts(ErasureDirection([1, 2], "resid_pre", torch.zeros(2, tiny_llava.d_model)), eraser.gate)
    with pytest.raises(ValueError, match="needs answer directions"):
        MLLMEraser.from_parts(eraser.direction, eraser.gate, answer_steps=1)
    qwen_direction = ErasureDirection(other.layers, other.site, other.vectors,
                                      fingerprint={**other.fingerprint, "arch": "qwen2_5_vl"})
    with pytest.raises(ArtifactMismatchError, match="different models: arch: direction has 'qwen2_5_vl', gate has"):
        MLLMEraser.from_parts(qwen_direction, eraser.gate)


def test_constructor_and_loader_refuse_what_cannot_steer(tiny_llava, tiny_qwen, stats, tmp_path):
    """From an audit of the value objects: each of these was accepted."""
    with pytest.raises(ValueError, match="gamma must be a finite number"):  # inf gave an all-zero gate, silently
        NullSpaceGate.from_stats(stats, gamma=float("inf"))
    with pytest.raises(ValueError, match="finite floating-point"):
        NullSpaceGate([1], "resid_pre", torch.full((1, 8), float("nan")))
    with pytest.raises(ValueError, match="increasing order"):
        NullSpaceGate([2], "resid_pre", torch.zeros(1, 16), stack=[2, 1])
    with pytest.raises(ValueError, match="reads 2 x d features"):
        NullSpaceGate([2], "resid_pre", torch.zeros(1, 9), stack=[1, 2])
    with pytest.raises(ValueError, match="finite lo < hi"):
        NullSpaceGate([1], "resid_pre", torch.zeros(1, 8), window=(0.0, float("inf")))
    gate = NullSpaceGate.from_stats(stats, gamma=0.1, energy=0.01)
    assert gate == gate and gate != NullSpaceGate.from_stats(stats, gamma=0.1, energy=0.01)  # identity, no error
    bare = NullSpaceGate([1, 2], "resid_pre", torch.zeros(2, 64))  # no fingerprint: shapes are still checked
    with pytest.raises(ValueError, match="is 64 wide, but the model has d_model 128"):
        bare.values(tiny_llava, [(None, "who is this")])
    with pytest.raises(ValueError, match="this gate was fitted on a different model"):
        gate.values(tiny_qwen, [(None, "who is this")])
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = gate.save(tmp_path / "g.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, w = json.loads(f.metadata()["mllmeraser_gate"]), f.get_tensor("w")
    meta["layers"] = [1, 99]  # tampered: a layer the fingerprinted model does not have
    save_file({"w": w}, str(path), metadata={"mllmeraser_gate": json.dumps(meta)})
    with pytest.raises(ArtifactError, match=rf"covers layers \[1, 99\], but the model its fingerprint names has {tiny_llava.n_layers} decoder"):
        NullSpaceGate.load(path)


def test_answer_directions_and_their_prefix_survive_the_parts(tiny_llava, data):
    """From an audit: the rebuilt eraser said answer_prefix 'I' for directions read at 'No', and dropped the answer
    directions unless answer_steps was passed again."""
    forget, retain, recall, erase = data
    eraser = MLLMEraser.fit(tiny_llava, forget, retain, recall, erase,
                            EraserConfig(layers=(1, 2), energy=0.01, answer_steps=2, answer_prefix="No", strength=-2.0))
    assert eraser.direction.answer_prefix == "No"
    rebuilt = MLLMEraser.from_parts(eraser.direction, eraser.gate, strength=-2.0, answer_steps=2)
    assert rebuilt.config.answer_prefix == "No" and rebuilt.digest() == eraser.digest()
    unused = MLLMEraser.from_parts(eraser.direction, eraser.gate, strength=-2.0)
    assert unused.config.answer_steps == 0 and torch.equal(unused.direction.answer, eraser.d_answer)
    with pytest.raises(ValueError, match="need their answer_prefix"):
        ErasureDirection([1, 2], "resid_pre", eraser.d, answer=eraser.d_answer)


def test_gate_score_is_the_dot_product_or_the_max_over_concepts():
    """From a mutation audit: per-concept gates summed instead of maxed were caught only by test_method."""
    from eraser.gate import gate_score

    h = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    assert gate_score(h, w[1]).tolist() == [2.0, 2.0]
    assert gate_score(h, w).tolist() == [2.0, 2.0]  # max(1, 2) and max(0, 2)
    assert gate_score(h, -w).tolist() == [-1.0, 0.0]  # max(-1, -2) and max(0, -2)
