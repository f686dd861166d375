"""A cheap, stable identity for a model's weights, so artifacts can refuse the wrong model.

Shapes alone cannot tell a fine-tuned model from its base; hashing all of a
7B model takes too long.  We hash a fixed strided sample of a few tensors
(embeddings, first and last block, unembedding), which changes when any of
them is retrained and costs milliseconds.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from .adapters import get_module


def _sample(t: torch.Tensor, n: int = 4096) -> bytes:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    return flat[::step][:n].to(torch.float32).cpu().numpy().tobytes()


def model_fingerprint(model: Any) -> dict[str, Any]:
    """``{arch, d_model, n_layers, n_vision_layers, vocab_size, weights}`` for a :class:`~interp.HookedVLM`."""
    hf = model.hf_model
    layers = get_module(hf, model.adapter.lm_layers)
    tensors = [
        hf.get_input_embeddings().weight,
        next(layers[0].parameters()),
        next(layers[-1].parameters()),
        get_module(hf, model.adapter.lm_head).weight,
    ]
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(_sample(t))
    return {
        "arch": model.arch,
        "d_model": model.d_model,
        "n_layers": model.n_layers,
        "n_vision_layers": model.n_vision_layers,
        "vocab_size": int(hf.get_input_embeddings().weight.shape[0]),
        "weights": h.hexdigest()[:16],
    }


def fingerprint_mismatch(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable differences, empty when the fingerprints agree."""
    return [f"{k}: artifact has {expected.get(k)!r}, model has {actual.get(k)!r}"
            for k in expected if expected.get(k) != actual.get(k)]
