"""The erasure direction (eraser/direction.py): the pure maths, and ErasureDirection checked against a plain
Hugging Face forward, against the eraser's own fit, and through save / load."""
from __future__ import annotations

import pytest
import torch

from eraser import ArtifactError, ArtifactMismatchError, EraserConfig, MLLMEraser
from eraser.direction import ErasureDirection, mean_difference, projection
from tests.conftest import random_image
from tests.eraser.test_method import _queries


@pytest.fixture(scope="module")
def pairs():
    return _queries(5, 3, 300), _queries(7, 4, 400)


def _hf_last_token(model, queries, layer):
    """``hidden_states[layer]`` at the last prompt token, from a plain HF forward (no hooks at all)."""
    rows = []
    for image, prompt in queries:
        enc = model.encode(images=[image], prompts=[prompt])
        with torch.no_grad():
            out = model.hf_model(**enc.model_kwargs(), output_hidden_states=True)
        rows.append(out.hidden_states[layer][0, int(enc.last_index[0])].double())
    return torch.stack(rows)


def test_mean_difference_and_projection():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 1.0]])
    assert mean_difference(a, b).tolist() == [2.0, 2.0]
    assert float(projection(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]))) == 4.0
    with pytest.raises(ValueError, match="at least one pair on each side"):
        mean_difference(a[:0], b)


def test_fit_matches_a_plain_forward_and_the_eraser(tiny_llava, pairs):
    recall, erase = pairs
    direction = ErasureDirection.fit(tiny_llava, recall, erase, layers=[1, 2], batch_size=3)
    assert direction.vectors.dtype == torch.float64  # the eraser keeps float32 of the same numbers
    assert direction.layers == [1, 2] and direction.site == "resid_pre"
    assert direction.counts == {"recall": 5, "erase": 7}
    for i, layer in enumerate((1, 2)):  # resid_pre of block l is hidden_states[l]
        expected = _hf_last_token(tiny_llava, recall, layer).mean(0) - _hf_last_token(tiny_llava, erase, layer).mean(0)
        assert torch.allclose(direction.vectors[i], expected, atol=1e-6, rtol=0)
        assert torch.equal(direction[layer], direction.vectors[i])
    eraser = MLLMEraser.fit(tiny_llava, _queries(6, 1, 100), _queries(30, 2, 200), recall, erase,
                            EraserConfig(layers=(1, 2), energy=0.01, batch_size=3))
    assert torch.equal(eraser.direction.vectors, direction.vectors.float())  # the eraser's stage 1, bit for bit
    assert eraser.direction.data_hashes == direction.data_hashes
    assert torch.allclose(direction.cosine(eraser.direction), torch.ones(2, dtype=torch.float64))


def test_cosine_norms_unit_and_project(tiny_llava, pairs):
    direction = ErasureDirection.fit(tiny_llava, *pairs, layers=[1, 2])
    flipped = ErasureDirection(direction.layers, direction.site, -direction.vectors)
    assert torch.allclose(direction.cosine(flipped), -torch.ones(2, dtype=torch.float64))
    assert torch.allclose(direction.unit().norm(dim=-1), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(direction.norms(), direction.vectors.norm(dim=-1))
    h = 3.0 * direction.unit()[0] + 0.0
    assert abs(float(direction.project(h, 1)) - 3.0) < 1e-9
    with pytest.raises(KeyError, match="no direction at layer 3"):
        direction[3]
    with pytest.raises(ValueError, match="different sites"):
        direction.cosine(ErasureDirection([1], "resid_pre", direction.vectors[:1]))


def test_hooks_steer_statically_like_the_ungated_eraser(tiny_llava, pairs):
    recall, erase = pairs
    eraser = MLLMEraser.fit(tiny_llava, _queries(6, 1, 100), _queries(30, 2, 200), recall, erase,
                            EraserConfig(layers=(1, 2), energy=0.01))
    enc = tiny_llava.encode(images=[random_image(32, 7)], prompts=["who is the person in this image"])
    vanilla = tiny_llava.run_with_hooks(enc, hooks=[])
    a = tiny_llava.run_with_hooks(enc, hooks=eraser.direction.hooks(strength=-2.0))
    b = tiny_llava.run_with_hooks(enc, hooks=eraser.hooks(strength=-2.0, gated=False))
    assert torch.equal(a, b) and (a - vanilla).abs().max() > 1e-3
    for bad in (float("nan"), float("inf"), "1"):  # inf was let through (an audit)
        with pytest.raises(ValueError, match="finite number"):
            eraser.direction.hooks(strength=bad)
    import numpy as np

    c = tiny_llava.run_with_hooks(enc, hooks=eraser.direction.hooks(strength=np.float32(-2.0)))  # was refused
    assert torch.equal(c, a)


def test_answer_directions_match_the_eraser(tiny_llava, pairs):
    recall, erase = pairs
    direction = ErasureDirection.fit(tiny_llava, recall, erase, layers=[2], answer_prefix="I")
    eraser = MLLMEraser.fit(tiny_llava, _queries(6, 1, 100), _queries(30, 2, 200), recall, erase,
                            EraserConfig(layers=(2,), energy=0.01, answer_steps=1))
    assert torch.equal(direction.answer.float(), eraser.d_answer)
    assert torch.equal(eraser.direction.answer, eraser.d_answer)


def test_save_load_and_refusals(tiny_llava, tiny_qwen, pairs, tmp_path):
    direction = ErasureDirection.fit(tiny_llava, *pairs, layers=[1, 2])
    path = direction.save(tmp_path / "d.safetensors")
    back = ErasureDirection.load(path, tiny_llava)
    assert torch.equal(back.vectors, direction.vectors) and back.layers == [1, 2]
    assert back.fingerprint == direction.fingerprint and back.counts == direction.counts and back.answer is None
    with pytest.raises(ArtifactMismatchError, match="this direction was fitted on a different model"):
        ErasureDirection.load(path, tiny_qwen)
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(ArtifactError, match="not a readable erasure direction"):
        ErasureDirection.load(path)
    eraser_file = MLLMEraser(layers=[1, 2], w=torch.zeros(2, 8), d=torch.ones(2, 8), config=EraserConfig(),
                             fingerprint={}).save(tmp_path / "e.safetensors")
    with pytest.raises(ArtifactError, match="not a readable erasure direction"):  # an eraser is not a direction
        ErasureDirection.load(eraser_file)
    with pytest.raises(ValueError, match="vectors of shape"):
        ErasureDirection([1, 2], "resid_pre", torch.zeros(3, 8))
    with pytest.raises(ValueError, match="site must be one of"):
        ErasureDirection([1], "hook_z", torch.zeros(1, 8))
    with pytest.raises(ValueError, match="the recall set is empty"):
        ErasureDirection.fit(tiny_llava, [], pairs[1])
    with pytest.raises(ValueError, match=r"layers \[9\] are not decoder layers"):
        ErasureDirection.fit(tiny_llava, *pairs, layers=[9])
    with pytest.raises(ValueError, match="finite floating-point"):
        ErasureDirection([1], "resid_pre", torch.ones(1, 8, dtype=torch.long))
    import numpy as np

    assert ErasureDirection.fit(tiny_llava, *pairs, layers=np.array([1])).layers == [1]  # numpy layers (an audit)
    bare = ErasureDirection([1, 2], "resid_pre", direction.vectors[:, :64])  # no fingerprint: shapes still checked
    with pytest.raises(ArtifactMismatchError, match="is 64 wide, but the model has d_model 128"):
        bare.check_model(tiny_llava)
