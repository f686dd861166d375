"""The command line every research script shares: ``python -m analyses.NAME --help`` prints the script's whole
docstring (what it measures, what it writes, how long it takes) and every option's default.

Why not the docstring's first line: that was all ``--help`` said, cut mid-sentence where a summary wraps,
and the options showed no defaults.
"""
from __future__ import annotations

import argparse

import torch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring as written (its lists and paragraphs kept), and ``(default: ...)`` after every option."""


def script_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser named as the script is run (``python -m analyses.NAME``), described by its docstring."""
    return argparse.ArgumentParser(prog=f"python -m analyses.{name}", description=(doc or "").strip(),
                                   formatter_class=HelpFormatter)


def torch_device(text: str) -> str:
    """A ``--device`` torch can use here, checked when parsed (before any model is built)."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text} asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda are supported")
    return text
