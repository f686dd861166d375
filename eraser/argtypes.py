"""Argument types for command lines: a flag out of range fails at parse time, with its value in the message.

Shared by the ``mllmeraser`` CLI and the ``analyses`` scripts, so ``--seed -1`` or ``--strength nan`` is refused
the same way everywhere instead of running (a NaN strength steers every activation to NaN).

>>> positive_int("3"), nonneg_int("0"), finite_float("-0.25")
(3, 0, -0.25)
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def nonneg_int(text: str) -> int:
    return _int_at_least(text, 0, "a non-negative integer")


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def out_dir(text: str) -> Path:
    """An output folder: it may not exist yet, but it must not be a file, and the nearest existing folder above it
    must be writable; checked at parse time, so a long run cannot fail at its very end when it writes."""

    if not text:
        raise argparse.ArgumentTypeError("expected an output folder, got an empty path")
    path = Path(text).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise argparse.ArgumentTypeError(
                    f"{text!r} cannot be an output folder: {str(p)!r} is an existing file" if p != path else
                    f"{text!r} is an existing file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise argparse.ArgumentTypeError(f"cannot write under {str(p)!r} (permission denied)")
            break
    return path


DTYPES = ("float32", "bfloat16", "float16")


def add_local_args(parser: argparse.ArgumentParser, oracle: bool = False) -> None:
    """The flags :func:`eraser.pipeline.setup_from_args` reads for a local checkpoint, declared once for the CLI
    and the analyses.

    ``oracle`` adds ``--oracle-model`` (the CLI's evaluations use it; the analyses compute no forget quality).
    """
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a local checkpoint (a LLaVA-1.5 or Qwen2.5-VL folder, e.g. the real 7B) instead of "
                             "the embedded default; with --mllmu")
    parser.add_argument("--mllmu", default=None, metavar="DIR",
                        help="a local MLLMU-Bench copy (parquet splits); with --model")
    if oracle:
        parser.add_argument("--oracle-model", default=None, metavar="PATH",
                            help="with --model: a checkpoint fine-tuned without the forget set (forget quality, "
                                 "oracle check)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="with --model: load the checkpoint in this dtype (default: as saved)")
