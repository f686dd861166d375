"""Loading checkpoints offline without torchvision.

transformers' auto classes may pick a torchvision-backed ("fast") image
processor, and torchvision cannot be installed next to the pinned CPU torch.
We read the saved processor type and use its PIL twin when one exists.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import transformers

from .adapters import registered


def model_class_for(config: Any) -> type:
    """The transformers class named in ``config.architectures``, checked against the supported adapters."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in registered():
            return getattr(transformers, name)
    raise NotImplementedError(
        f"unsupported architecture {names or type(config).__name__!r}; supported: {sorted(registered())}"
    )


def local_checkpoint(path_or_id: str | Path) -> str | Path:
    """What to hand transformers for ``path_or_id``: a local checkpoint directory (``~`` expanded), checked,
    or a hub id unchanged.

    Why check: transformers treats a missing local directory as a hub id and answers with a message about
    repo id syntax, and an existing folder without ``config.json`` with one about ``model_type``; neither
    says the path is the problem.  A ``Path``, a string that starts like a path (``/``, ``.``, ``~``) or one
    naming something that exists counts as local; anything else may be a hub id and is left to transformers.
    """
    path = Path(path_or_id).expanduser()
    if not (isinstance(path_or_id, Path) or str(path_or_id).startswith(("/", ".", "~")) or path.exists()):
        return path_or_id
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: the directory does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is a file; a checkpoint is a directory (config.json, weights, "
                                 "tokenizer)")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: not a saved transformers checkpoint "
                                "(HookedVLM.save_pretrained writes one)")
    return path


def checkpoint_arch(path: str | Path) -> str | None:
    """The adapter name (``"llava"``, ``"qwen2_5_vl"``) of the checkpoint saved at ``path``, read from its
    ``config.json`` without loading any weights; None when that cannot be told (no such file, unreadable, or an
    architecture no adapter supports: loading says why).

    Why: a command line that contradicts a checkpoint (``--arch llava --model qwen-7b/``) can be refused in
    milliseconds instead of after minutes of loading 7B weights.
    """
    try:
        config = json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    adapters = registered()
    names = config.get("architectures") if isinstance(config, dict) else None
    for name in names if isinstance(names, list) else []:
        if name in adapters:
            return adapters[name].name
    return None


def load_image_processor(path: str | Path) -> Any:
    """The image processor saved at ``path`` (PIL backend), or None if the checkpoint has none."""
    cfg_file = Path(path) / "preprocessor_config.json"
    if not cfg_file.exists():
        from transformers import AutoImageProcessor

        try:  # a hub id or a layout we do not know: let transformers decide
            return AutoImageProcessor.from_pretrained(path, use_fast=False)
        except (OSError, ValueError):
            return None
    kind = json.loads(cfg_file.read_text()).get("image_processor_type", "")
    kind = kind.removesuffix("Fast")
    cls = getattr(transformers, kind + "Pil", None) if not kind.endswith("Pil") else getattr(transformers, kind, None)
    cls = cls or getattr(transformers, kind, None)
    if cls is None:
        raise ValueError(f"{cfg_file}: unknown image_processor_type {kind!r}")
    return cls.from_pretrained(path)


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars on or off inside the block, restored after (its switch is global)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
