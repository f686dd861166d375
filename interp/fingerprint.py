"""A cheap, stable identity for a model's weights, so artifacts can refuse the wrong model.

Shapes alone cannot tell a fine-tuned model from its base; hashing all of a
7B model takes too long.  We hash a fixed strided sample of a few tensors
(embeddings, first and last block, unembedding), which changes when any of
them is retrained and costs milliseconds.
"""
from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch

from .adapters import get_module


def _sample(t: torch.Tensor, n: int = 4096) -> bytes:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    return flat[::step][:n].to(torch.float32).cpu().numpy().tobytes()


#: the last weight hash per model, with what it was computed from (see :func:`_weights_key`)
_HASHES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, tuple, str]]" = weakref.WeakKeyDictionary()


def _weights_key(tensors: list[torch.Tensor]) -> tuple:
    """What the weight hash depends on, besides each tensor's identity: storage, in-place version, shape, dtype, device.

    Why a version key: ``eraser.attached`` checks the fingerprint on every attach, and sampling and
    hashing the four tensors was a third of what attaching cost (0.13 of 0.41 ms on the 1M-parameter
    models).  PyTorch bumps ``_version`` on every in-place write (optimizer steps, ``load_state_dict``,
    ``no_grad`` edits), and replacing a tensor or its ``.data`` changes its identity or storage, so a
    changed weight always misses the cache.  Identity is checked through weak references (a freed
    tensor's ``id`` can be reused by a new one), so a replaced tensor misses too.
    """
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device) for t in tensors)


def _weights_hash(hf: torch.nn.Module, tensors: list[torch.Tensor]) -> str:
    key = _weights_key(tensors)
    hit = _HASHES.get(hf)
    if hit is not None and hit[1] == key and all(r() is t for r, t in zip(hit[0], tensors)):
        return hit[2]
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(_sample(t))
    digest = h.hexdigest()[:16]
    _HASHES[hf] = (tuple(weakref.ref(t) for t in tensors), key, digest)
    return digest


def model_fingerprint(model: Any) -> dict[str, Any]:
    """``{arch, d_model, n_layers, n_vision_layers, vocab_size, dtype, weights}`` for a :class:`~interp.HookedVLM`.

    Artifacts saved before ``dtype`` was recorded carry no such key, and :func:`fingerprint_mismatch` only
    compares the keys an artifact has, so they still load."""
    hf = model.hf_model
    layers = get_module(hf, model.adapter.lm_layers)
    embed = hf.get_input_embeddings().weight
    tensors = [
        embed,
        next(layers[0].parameters()),
        next(layers[-1].parameters()),
        get_module(hf, model.adapter.lm_head).weight,
    ]
    return {
        "arch": model.arch,
        "d_model": model.d_model,
        "n_layers": len(layers),
        "n_vision_layers": model.n_vision_layers,
        "vocab_size": int(embed.shape[0]),
        # before the weights: the same checkpoint in another dtype has other weights, and this says why
        "dtype": str(embed.dtype).removeprefix("torch."),
        "weights": _weights_hash(hf, tensors),
    }


def fingerprint_mismatch(expected: dict[str, Any], actual: dict[str, Any], names: tuple[str, str] = ("artifact", "model")
                         ) -> list[str]:
    """Human-readable differences over ``expected``'s keys, empty when the fingerprints agree; ``names`` say what
    each side is in the messages."""
    return [f"{k}: {names[0]} has {expected.get(k)!r}, {names[1]} has {actual.get(k)!r}"
            for k in expected if expected.get(k) != actual.get(k)]
