"""Paper-style figures from saved results: data in, PNG out, nothing recomputed.

Why a package of pure functions: the expensive part of a run (fitting,
evaluating, sweeping) writes JSON; every figure is a cheap, deterministic view
of those files, so a figure can be restyled or regenerated long after the run
without touching a model.  Each ``plot_*`` takes either the loaded data or a
path (the file itself or the run folder holding it), writes one PNG at 120 dpi
and returns its path, or prints why it skipped and returns ``None`` when its
input is absent.  Figures are drawn on the Agg canvas directly (no pyplot
state, no global backend switch), so they are safe in scripts, tests and
notebooks alike.

============  ==========================================  =============================
figure        input (in the run folder)                   paper
============  ==========================================  =============================
tradeoff.png  tradeoff.json, else results.json selection  Fig. 3 forgetting vs utility
gates.png     gates.json                                  Fig. 4 gate and projection
timing.png    results.json ``timing``                     Fig. 5 fit / inference cost
heatmap.png   sweep.jsonl                                 layer x strength sweep
============  ==========================================  =============================

One module per figure (:mod:`.tradeoff`, :mod:`.gates`, :mod:`.timing`,
:mod:`.heatmap`; the analysis scripts' figures in :mod:`.analyses`), all drawn
and written through :mod:`.canvas`.

Example::

    >>> from eraser.plots import make_all
    >>> paths = make_all("runs/demo")          # doctest: +SKIP
    >>> [p.name for p in paths]                # doctest: +SKIP
    ['tradeoff.png', 'gates.png', 'timing.png', 'heatmap.png']
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

from .analyses import FIGURES as ANALYSIS_FIGURES  # probing, patching, leakage, heads, PGD budget (analyses/*.py outputs)
from .analyses import (plot_answer_shift, plot_attribution, plot_circuit, plot_gate_attribution,
                       plot_heads_heatmap, plot_leakage, plot_patching_heatmap, plot_pgd_budget,
                       plot_probe_accuracy)
from .canvas import DPI, PathLike, png_annotations
from .gates import gate_summary, plot_gates
from .heatmap import plot_heatmap, sweep_grid
from .timing import plot_timing, timing_ratios
from .tradeoff import Curve, plot_tradeoff, tradeoff_curves

__all__ = [
    "FiguresFailed",
    "ANALYSIS_FIGURES", "plot_answer_shift", "plot_attribution", "plot_circuit", "plot_gate_attribution", "Curve", "DPI", "FIGURES", "gate_summary", "make_all", "plot_gates", "plot_heads_heatmap",
    "plot_heatmap",
    "plot_leakage", "plot_patching_heatmap", "plot_pgd_budget", "plot_probe_accuracy", "plot_timing", "plot_tradeoff",
    "png_annotations", "sweep_grid", "timing_ratios", "tradeoff_curves",
]

# -- all figures --------------------------------------------------------------------------------------------
#: figure name -> (plot function taking (run_dir, out_path), output file name)
FIGURES: dict[str, tuple[Callable[..., Path | None], str]] = {
    "tradeoff": (plot_tradeoff, "tradeoff.png"),
    "gates": (plot_gates, "gates.png"),
    "timing": (plot_timing, "timing.png"),
    "heatmap": (plot_heatmap, "heatmap.png"),
}


class FiguresFailed(RuntimeError):
    """Some figures' data could not be drawn (each was reported as it failed); ``made`` holds the others."""

    def __init__(self, failed: Sequence[str], made: Sequence[Path]) -> None:
        super().__init__(f"figures failed: {', '.join(failed)} (made {[p.name for p in made]})")
        self.failed, self.made = list(failed), list(made)


def make_all(run_dir: PathLike, out_dir: PathLike | None = None,
             only: Sequence[str] | None = None) -> list[Path]:
    """Regenerate every figure whose input is in ``run_dir`` (into ``out_dir``, default ``run_dir``).

    Nothing is recomputed; figures without data are skipped with a message.
    A figure whose data is malformed does not stop the others: all are
    attempted, then :class:`FiguresFailed` is raised (from the first error).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run_dir}")
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    figures = {**FIGURES, **{k: v[:2] for k, v in ANALYSIS_FIGURES.items()}}
    made: list[Path] = []
    errors: list[tuple[str, BaseException]] = []
    for name in only or figures:
        if name not in figures:
            raise ValueError(f"unknown figure {name!r}; choose from {sorted(figures)}")
        fn, filename = figures[name]
        try:
            p = fn(run_dir, out_dir / filename)
        except Exception as e:  # noqa: BLE001 -- report, finish the others, then re-raise
            print(f"[plots] {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            errors.append((name, e))
            continue
        if p is not None:
            made.append(p)
    if errors:
        raise FiguresFailed([n for n, _ in errors], made) from errors[0][1]
    return made
