"""Regenerate every figure a run folder has data for: ``python -m figures.make_all --from DIR [--out OUT_DIR]``.

Nothing is recomputed; figures without their input file are skipped with a message.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from eraser.argtypes import out_dir


def main(argv: Sequence[str] | None = None) -> int:
    from eraser.plots import ANALYSIS_FIGURES, FIGURES, FiguresFailed, make_all

    ap = argparse.ArgumentParser(prog="python -m figures.make_all", description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="src", required=True, help="run folder holding the saved results")
    ap.add_argument("--out", type=out_dir, default=None, help="output folder (default: the run folder)")
    ap.add_argument("--only", nargs="+", choices=sorted({**FIGURES, **ANALYSIS_FIGURES}), default=None,
                    help="a subset of figures (the demo's and the analyses')")
    args = ap.parse_args(argv)
    try:
        paths = make_all(args.src, args.out, only=args.only)
    except FileNotFoundError as e:
        ap.error(str(e))
    except FiguresFailed as e:  # each failure was printed in one line as it happened
        for p in e.made:
            print(p)
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    print(f"{len(paths)} figure(s) written", file=sys.stderr)
    if not paths:  # like the single-figure scripts: nothing to draw from is a failure, not a success
        print(f"no figure had data in {args.src}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
