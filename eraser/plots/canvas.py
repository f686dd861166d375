"""What every figure shares: the style, the Agg canvas, atomic PNG writes with annotations, JSON input.

Why one module: each figure module (trade-off, gates, timing, heatmap, analyses) draws
with the same look and writes the same way, so a restyle or a change of file format is one edit here.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120
ERASER = "mllmeraser"
STYLE = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.5, "figure.titlesize": 10,
}
SET_COLORS = {"forget": "#d62728", "retain": "#1f77b4", "test": "#2ca02c", "celebrity": "#9467bd"}
SET_ORDER = ("forget", "retain", "test", "celebrity")
PathLike = str | os.PathLike


def say_skipped(fig: str, why: str) -> None:
    print(f"[plots] skipping {fig}: {why}", file=sys.stderr)


def read_json(src: Any, filename: str) -> tuple[Any, Path | None]:
    """``src`` is data (returned as is), a file, or a run folder holding ``filename``; missing -> ``(None, path)``."""
    if src is None:
        return None, None
    if not isinstance(src, (str, os.PathLike)):
        return src, None
    p = Path(src)
    if p.is_dir():
        p = p / filename
    if not p.is_file():
        return None, p
    try:
        return json.loads(p.read_text()), p
    except (ValueError, UnicodeDecodeError) as e:  # a truncated or foreign file: name it (an audit saw a bare error)
        raise ValueError(f"{p} is not readable JSON ({type(e).__name__}: {e}); was its run interrupted?") from None


def run_folder(src: Any) -> Path | None:
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        return p if p.is_dir() else p.parent
    return None


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, out_path: PathLike, notes: Mapping[str, Any] | None = None) -> Path:
    """Write the PNG atomically; ``notes`` go into PNG text chunks (read back with :func:`png_annotations`)."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"Software": f"eraser.plots (matplotlib {matplotlib.__version__})"}
    for k, v in (notes or {}).items():
        meta[k] = json.dumps(v, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI, format="png", metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a figure is for sharing
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def png_annotations(path: PathLike) -> dict[str, Any]:
    """The numbers a figure annotated, as stored in its PNG text chunks (e.g. ``{"ratios": {...}}``)."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    out = {}
    for k, v in text.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def as_number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def fmt_strength(s: float) -> str:
    return f"{s:g}"

def looks_like_results(data: Any) -> bool:
    return isinstance(data, Mapping) and ("methods" in data or "config" in data)
