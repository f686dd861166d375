"""The checkpoint cache: train once per recipe, load afterwards.

Layout: ``$MLLMERASER_CACHE`` (default ``~/.cache/mllmeraser``) ``/<recipe
hash>/`` holds the safetensors weights, config, tokenizer and image processor
(``HookedVLM.save_pretrained``) plus ``recipe.json`` and ``train_log.json``.

Why atomic: a run killed mid-training (Ctrl-C on a 5-minute train) must never
leave a directory that a later run loads as if it were complete.  Training
writes into a hidden temporary directory next to the final one and renames
it into place only when every file is written (``recipe.json`` last); a
directory is only ever loaded under its final name and with its
``recipe.json`` matching the recipe.  A per-hash lock file stops two
processes from training the same recipe at once (the second waits, then
loads).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from interp.model import HookedVLM

from .recipe import Recipe

__all__ = ["CorruptCheckpointError", "cache_root", "checkpoint_dir", "cached_path", "load_or_train", "default_model",
           "load_checkpoint", "weights_digest"]

ENV_VAR = "MLLMERASER_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$MLLMERASER_CACHE``, else ``~/.cache/mllmeraser``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mllmeraser"


def checkpoint_dir(recipe: Recipe, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the recipe's checkpoint lives (whether or not it exists yet)."""
    return cache_root(cache_dir) / recipe.hash()


def cached_path(recipe: Recipe, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The recipe's complete checkpoint directory, or None if there is none."""
    path = checkpoint_dir(recipe, cache_dir)
    meta = path / "recipe.json"
    if not meta.is_file():
        return None
    try:
        saved = Recipe.from_dict(json.loads(meta.read_text())["recipe"])
    except (ValueError, KeyError, TypeError):
        return None
    return path if saved == recipe else None


class CorruptCheckpointError(RuntimeError):
    """A cached checkpoint whose files are damaged (truncated, or changed since training); the message names the
    folder and says how to recover (delete it: the next run retrains it)."""


#: The weight files whose sha256 ``recipe.json`` records at training time and :func:`load_checkpoint` verifies.
WEIGHT_FILES = ("model.safetensors",)


def weights_digest(path: Path) -> dict[str, str]:
    """sha256 of each of :data:`WEIGHT_FILES` in checkpoint ``path`` (a few ms for the embedded models)."""
    out = {}
    for name in WEIGHT_FILES:
        h = hashlib.sha256()
        with open(path / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[name] = h.hexdigest()
    return out


def load_checkpoint(path: str | os.PathLike, progress: bool = True) -> HookedVLM:
    """Load a checkpoint directory written by :func:`load_or_train` (eval mode).

    Why verify: a flipped bit in cached weights still loads, and silently changes every number measured on the
    model (an audit: vanilla generation ROUGE-L 1.00 -> 0.60).  A checkpoint whose ``recipe.json`` records its
    weights' sha256 (every one trained since this check exists) is verified against it first; a damaged one is a
    :class:`CorruptCheckpointError` naming the folder, as is one that does not load at all.
    """
    path = Path(path)
    recorded = _recorded_digest(path)
    if recorded:
        try:
            actual = weights_digest(path)
        except OSError as e:
            raise CorruptCheckpointError(f"the cached checkpoint {path} is incomplete ({e}); delete the folder and "
                                         "the next run retrains it") from None
        bad = sorted(k for k, v in recorded.items() if actual.get(k) != v)
        if bad:
            raise CorruptCheckpointError(f"the cached checkpoint {path} is damaged: {', '.join(bad)} changed since "
                                         "it was trained (sha256 differs); delete the folder and the next run "
                                         "retrains it")
    try:
        model = HookedVLM.from_pretrained(path, progress=progress)
    except Exception as e:  # noqa: BLE001 - whatever transformers or safetensors raise for damaged files
        first = str(e).splitlines()[0] if str(e) else ""
        raise CorruptCheckpointError(f"the cached checkpoint {path} does not load ({type(e).__name__}: {first}); "
                                     "delete the folder and the next run retrains it") from None
    model.hf_model.eval()
    if recorded is None:
        _record_digest(path)
    return model


def _record_digest(path: Path) -> None:
    """Record the weights' sha256 in the ``recipe.json`` of a checkpoint trained before the check existed, the
    first time it loads, so later loads are verified (atomic; a read-only cache is left as it is)."""
    from interp.io import write_json

    try:
        meta = json.loads((path / "recipe.json").read_text())
        if isinstance(meta, dict) and "recipe" in meta:
            write_json(path / "recipe.json", {**meta, "weights_sha256": weights_digest(path)})
    except (OSError, ValueError):
        pass


def _recorded_digest(path: Path) -> dict[str, str] | None:
    try:
        meta = json.loads((path / "recipe.json").read_text())
    except (OSError, ValueError):
        return None
    digest = meta.get("weights_sha256") if isinstance(meta, dict) else None
    return digest if isinstance(digest, dict) else None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sweep(root: Path, key: str) -> None:
    """Remove temp dirs of earlier, dead runs of this recipe (we hold its lock, so none is live)."""
    for p in root.glob(f".{key}.*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _save(model: HookedVLM, recipe: Recipe, log: dict, tmp: Path) -> None:
    """Write every file of a checkpoint into ``tmp``; ``recipe.json`` goes last (the completeness marker)."""
    model.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    (tmp / "recipe.json").write_text(json.dumps({"recipe": recipe.to_dict(), "hash": recipe.hash(),
                                                 "code_version": _code_version(),
                                                 "weights_sha256": weights_digest(tmp)}, indent=2) + "\n")


def _code_version() -> str:
    from .recipe import CODE_VERSION

    return CODE_VERSION


def load_or_train(recipe: Recipe, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> HookedVLM:
    """The recipe's trained model: loaded from the cache, or trained, saved atomically and returned.

    The returned model is always the one loaded back from disk, so a cache
    hit and a fresh train give bit-identical weights.
    """
    path = cached_path(recipe, cache_dir)
    if path is not None:
        return load_checkpoint(path, progress)
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    key = recipe.hash()
    with _lock(root / f".{key}.lock"):
        path = cached_path(recipe, cache_dir)  # another process may have finished it while we waited
        if path is not None:
            return load_checkpoint(path, progress)
        _sweep(root, key)
        from .train import train

        # said even without a progress bar: a default model is ~45 min of training, and nothing else says why
        print(f"[zoo] no cached checkpoint for {recipe.describe()}; training it once (cached in {root / key})",
              file=sys.stderr, flush=True)
        model, log = train(recipe, progress=progress)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint is an ordinary shared directory
            _save(model, recipe, log.to_dict(), tmp)
            final = root / key
            if final.exists():  # an incomplete or foreign directory under the final name: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return load_checkpoint(final, progress)


def train_log(recipe: Recipe, cache_dir: str | os.PathLike | None = None) -> dict | None:
    """The saved :class:`~eraser.zoo.train.TrainLog` of a cached recipe (steps, losses, seconds), if any."""
    path = cached_path(recipe, cache_dir)
    if path is None or not (path / "train_log.json").is_file():
        return None
    return json.loads((path / "train_log.json").read_text())


def default_model(arch: str = "llava", quick: bool = False, oracle_for: int | None = None,
                  cache_dir: str | os.PathLike | None = None, progress: bool = True) -> HookedVLM:
    """The cached default (or quick) vanilla model, or its retain-only oracle for a forget ratio (5, 10, 15)."""
    recipe = Recipe.quick(arch) if quick else Recipe.default(arch)
    if oracle_for is not None:
        recipe = recipe.oracle_for(oracle_for)
    return load_or_train(recipe, cache_dir=cache_dir, progress=progress)
