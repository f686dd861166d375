"""Shared helpers of the analysis-script tests.

The scripts run end to end on the quick model, in-process (``main(argv)``),
with a tiny ``--limit``.  Fitting an eraser is the slow part, so it happens
once per test session: :func:`quick_eraser_path` fits one on the quick model,
saves it under the session's base temp folder and hands the same path to
every test module (modules import the ``quick_eraser`` fixture below; the
path is memoised at module level, so importing the fixture into several
modules still fits once).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch

_CACHE: dict[str, Path] = {}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run with one torch thread (the test machine is shared), restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quick_eraser_path(base: Path) -> Path:
    """Fit the scripts' default variant on the quick model once per session; return the saved artifact's path."""
    if "path" not in _CACHE:
        from analyses.common import DEFAULT_VARIANT
        from eraser.pipeline import fit_variant, load_setup

        with one_thread():
            setup = load_setup(quick=True, progress=False)
            eraser, _, _ = fit_variant(setup, DEFAULT_VARIANT)
        _CACHE["path"] = eraser.save(base / "quick_eraser" / "eraser.safetensors")
    return _CACHE["path"]


@pytest.fixture(scope="session")
def quick_eraser(tmp_path_factory) -> Path:
    return quick_eraser_path(tmp_path_factory.getbasetemp())


def script_args(out: Path, eraser: Path, limit: int = 3, *extra: str) -> list[str]:
    return ["--quick", "--eraser", str(eraser), "--out", str(out), "--limit", str(limit), "--no-progress", *extra]


def read_json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"

    def no_nan(token: str):
        raise AssertionError(f"{path} is not strict JSON: it contains {token}")

    return json.loads(path.read_text(), parse_constant=no_nan)


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def in_unit(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and 0.0 <= x <= 1.0)
