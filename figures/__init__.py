"""Runnable scripts that regenerate each paper-style figure from a run folder's saved results.

    python -m figures.make_all --from runs/demo            # every figure it has data for
    python -m figures.fig_tradeoff --from runs/demo        # one figure (also fig_gates, fig_timing, fig_heatmap)

The drawing lives in :mod:`eraser.plots`; these scripts only parse arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from eraser.argtypes import out_dir


def figure_main(name: str, argv: Sequence[str] | None = None) -> int:
    """``--from DIR [--out OUT_DIR]``: draw figure ``name`` of :data:`eraser.plots.FIGURES`; 0 drawn, 1 skipped."""
    from eraser.plots import FIGURES

    fn, filename = FIGURES[name]
    ap = argparse.ArgumentParser(prog=f"python -m figures.fig_{name}", description=(fn.__doc__ or "").split("\n")[0])
    ap.add_argument("--from", dest="src", required=True, help="run folder holding the saved results")
    ap.add_argument("--out", type=out_dir, default=None, help="output folder (default: the run folder)")
    args = ap.parse_args(argv)
    src = Path(args.src)
    if not src.is_dir():
        ap.error(f"no run folder {src}")
    path = fn(src, Path(args.out or src) / filename)
    if path is None:
        return 1
    print(path)
    return 0


def run(name: str) -> None:
    sys.exit(figure_main(name))
