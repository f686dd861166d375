"""Argument types for command lines: a flag out of range fails at parse time, with its value in the message.

Shared by the ``mllmeraser`` CLI and the ``analyses`` scripts, so ``--seed -1`` or ``--strength nan`` is refused
the same way everywhere instead of running (a NaN strength steers every activation to NaN).

>>> positive_int("3"), nonneg_int("0"), finite_float("-0.25")
(3, 0, -0.25)
"""
from __future__ import annotations

import argparse
import math


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
