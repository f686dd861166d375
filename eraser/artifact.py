"""Reading and writing the method's value objects: one safetensors file each, its JSON metadata in the header.

Why one module: the eraser, its erasure direction and its gate are each a file a researcher saves, ships and
loads onto a model, and each must fail the same way on a bad file (truncated, not ours, NaN tensors) and on
the wrong model.  Nothing here executes code from a file: safetensors holds raw tensors, the header JSON.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from interp.fingerprint import fingerprint_mismatch, model_fingerprint
from interp.io import atomic_path

__all__ = ["ArtifactError", "ArtifactMismatchError", "write_artifact", "read_artifact", "check_fingerprint",
           "layer_indices", "check_shape", "content_digest", "CHECKSUM_KEY"]


class ArtifactError(ValueError):
    """An eraser file that cannot be read (corrupt, truncated, not ours)."""


class ArtifactMismatchError(ValueError):
    """An eraser fitted on a different model than the one it is loaded onto."""


#: The header entry holding :func:`content_digest` of the file's metadata and tensors, checked on read.
CHECKSUM_KEY = "sha256"


def content_digest(key: str, meta_text: str, tensors: dict[str, Tensor]) -> str:
    """sha256 over the header entry's name and JSON text and every tensor's name, dtype, shape and bytes.

    Why: safetensors checks the layout, not the values, so a flipped bit in a direction or a gate still loads
    and steers differently (an audit: a byte flipped in an artifact loaded and evaluated with exit code 0).
    """
    h = hashlib.sha256()
    h.update(key.encode())
    h.update(b"\0" + meta_text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_artifact(path: str | Path, tensors: dict[str, Tensor | None], key: str, meta: dict[str, Any]) -> Path:
    """Write ``tensors`` (None values left out) and ``meta`` (under header ``key``) atomically, with their
    :func:`content_digest`; returns the path."""
    path = Path(path)
    kept = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None}
    text = json.dumps(meta)
    with atomic_path(path) as tmp:
        save_file(kept, str(tmp), metadata={key: text, CHECKSUM_KEY: content_digest(key, text, kept)})
    return path


def read_artifact(path: str | Path, key: str, fmt: str, what: str, tensors: tuple[str, ...] = (),
                  fields: tuple[str, ...] = ()) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a file :func:`write_artifact` wrote with header ``key`` and ``meta["format"] == fmt``.

    Refused with :class:`ArtifactError` naming ``what`` (e.g. "MLLMEraser artifact"): a file safetensors cannot
    read, another format, a missing required tensor or metadata field, a floating tensor with NaN or inf.
    A missing file stays a FileNotFoundError.
    """
    path = Path(path)
    try:
        # cloned: safetensors hands back tensors at addresses a matmul kernel treats differently (measured:
        # steered logits 2-4e-7 off a fresh fit's), and "equal digests steer identically" is a promise
        out = {k: v.clone() for k, v in load_file(str(path)).items()}
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header[key])
    except FileNotFoundError:
        raise
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable {what} ({type(e).__name__}: {e})") from None
    recorded = header.get(CHECKSUM_KEY)  # files written before the checksum have none
    if recorded is not None and recorded != content_digest(key, header[key], out):
        raise ArtifactError(f"{path}: a damaged {what} (its content's sha256 differs from the one recorded when it "
                            "was saved: changed bytes, or an edited header)")
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(f"{path}: unknown format {found!r}, expected {fmt!r}")
    missing = [k for k in fields if k not in meta] + [k for k in tensors if k not in out]
    if missing:
        raise ArtifactError(f"{path}: an incomplete {what} (no {', '.join(missing)})")
    bad = [k for k, t in out.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ArtifactError(f"{path}: tensor(s) {bad} hold NaN or infinite values; a corrupt {what}")
    return out, meta


def check_fingerprint(fingerprint: dict[str, Any], model: Any, what: str = "this eraser") -> None:
    """Raise :class:`ArtifactMismatchError` unless ``model`` is the model ``fingerprint`` was taken from."""
    diffs = fingerprint_mismatch(fingerprint, model_fingerprint(model))
    if diffs:
        raise ArtifactMismatchError(f"{what} was fitted on a different model: " + "; ".join(diffs))


def layer_indices(layers: Any, what: str = "layers") -> list[int]:
    """``layers`` as a non-empty list of distinct ints >= 0 (numpy and torch integers too, never bools)."""
    try:
        items = list(layers)
        out = [int(l) for l in items if not isinstance(l, (bool, str, bytes)) and float(l) == int(l)]
        ok = len(out) == len(items)
    except (TypeError, ValueError, OverflowError):
        out, ok = [], False
    if not ok or not out or len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(f"{what} must be distinct decoder layer indices >= 0, got {layers!r}")
    return out


def check_shape(layers: list[int], width: int, n_layers: Any, d_model: Any, what: str, against: str) -> None:
    """Raise :class:`ArtifactMismatchError` when ``layers`` (max index) or ``width`` do not fit a model of
    ``n_layers`` blocks and width ``d_model`` (either None: not checked); ``against`` names that model."""
    if isinstance(n_layers, int) and max(layers) >= n_layers:
        raise ArtifactMismatchError(f"{what} covers layers {layers}, but {against} has {n_layers} decoder layers")
    if isinstance(d_model, int) and width != d_model:
        raise ArtifactMismatchError(f"{what} is {width} wide, but {against} has d_model {d_model}")
