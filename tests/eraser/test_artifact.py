"""The method's file format (eraser/artifact.py): one safetensors file, JSON metadata in its header, and the
checks every value object shares."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from eraser.artifact import (ArtifactError, ArtifactMismatchError, check_shape, layer_indices, read_artifact,
                             write_artifact)


def test_round_trip_and_refusals(tmp_path):
    path = write_artifact(tmp_path / "a.safetensors", {"x": torch.arange(6.0).reshape(2, 3), "none": None}, "k",
                          {"format": "f.v1", "n": 2})
    tensors, meta = read_artifact(path, "k", "f.v1", "thing", tensors=("x",), fields=("n",))
    assert list(tensors) == ["x"] and torch.equal(tensors["x"], torch.arange(6.0).reshape(2, 3)) and meta["n"] == 2
    with pytest.raises(ArtifactError, match="unknown format 'f.v1', expected 'g.v1'"):
        read_artifact(path, "k", "g.v1", "thing")
    with pytest.raises(ArtifactError, match="an incomplete thing \\(no m, y\\)"):
        read_artifact(path, "k", "f.v1", "thing", tensors=("y",), fields=("m",))
    with pytest.raises(ArtifactError, match="is not a readable thing"):  # another header key: another kind of file
        read_artifact(path, "other", "f.v1", "thing")
    write_artifact(path, {"x": torch.tensor([1.0, float("nan")])}, "k", {"format": "f.v1"})
    with pytest.raises(ArtifactError, match="hold NaN or infinite values"):
        read_artifact(path, "k", "f.v1", "thing")
    crafted = tmp_path / "p.safetensors"  # a pickle never gets unpickled: safetensors cannot even parse it
    crafted.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ArtifactError, match="is not a readable thing"):
        read_artifact(crafted, "k", "f.v1", "thing")
    with pytest.raises(FileNotFoundError):
        read_artifact(tmp_path / "missing.safetensors", "k", "f.v1", "thing")


def test_changed_bytes_or_an_edited_header_are_caught_by_the_checksum(tmp_path):
    """From an audit: a byte flipped in an artifact's tensor data (or a value set to 6e37) loaded and steered."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from eraser.artifact import CHECKSUM_KEY, content_digest

    path = write_artifact(tmp_path / "a.safetensors", {"x": torch.arange(6.0)}, "k", {"format": "f.v1", "n": 2})
    good = path.read_bytes()
    for offset in (-1, -9, -24):  # inside the tensor data, which ends the file
        bad = bytearray(good)
        bad[offset] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(ArtifactError, match="a damaged thing .*sha256 differs"):
            read_artifact(path, "k", "f.v1", "thing")
    path.write_bytes(good)
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    tensors = load_file(str(path))
    edited = {**header, "k": json.dumps({"format": "f.v1", "n": 3})}  # the same bytes, another header
    save_file(tensors, str(path), metadata=edited)
    with pytest.raises(ArtifactError, match="a damaged thing"):
        read_artifact(path, "k", "f.v1", "thing")
    assert header[CHECKSUM_KEY] == content_digest("k", header["k"], tensors)
    save_file(tensors, str(path), metadata={"k": header["k"]})  # written before the checksum existed: still read
    assert read_artifact(path, "k", "f.v1", "thing")[1]["n"] == 2
    # the digest covers names, dtypes and shapes, not only the bytes
    x = torch.arange(6.0)
    assert len({content_digest("k", "{}", {"x": x}), content_digest("k", "{}", {"y": x}),
                content_digest("k", "{}", {"x": x.reshape(2, 3)}), content_digest("k", "{}", {"x": x.double()}),
                content_digest("j", "{}", {"x": x})}) == 5


def test_layer_indices():
    assert layer_indices([3, 1]) == [3, 1] and layer_indices(np.array([1, 2])) == [1, 2]
    assert layer_indices(l for l in (0, 2)) == [0, 2]  # a generator is read once
    assert layer_indices(torch.tensor([4])) == [4]
    for bad in ([], [1, 1], [-1], [True], [1.5], "12", None):
        with pytest.raises(ValueError, match="distinct decoder layer indices"):
            layer_indices(bad)


def test_check_shape():
    check_shape([0, 3], 128, 4, 128, "it", "the model")
    check_shape([9], 64, None, None, "it", "the model")  # nothing known, nothing checked
    with pytest.raises(ArtifactMismatchError, match="covers layers \\[0, 4\\], but the model has 4 decoder layers"):
        check_shape([0, 4], 128, 4, 128, "it", "the model")
    with pytest.raises(ArtifactMismatchError, match="it is 64 wide, but the model has d_model 128"):
        check_shape([0], 64, 4, 128, "it", "the model")
