"""Regenerate every figure a run folder has data for: ``python -m figures.make_all --from DIR [--out OUT_DIR]``.

Nothing is recomputed; figures without their input file are skipped with a message.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from eraser.plots import FIGURES, make_all

    ap = argparse.ArgumentParser(prog="python -m figures.make_all", description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="src", required=True, help="run folder holding the saved results")
    ap.add_argument("--out", default=None, help="output folder (default: the run folder)")
    ap.add_argument("--only", nargs="+", choices=sorted(FIGURES), default=None, help="a subset of figures")
    args = ap.parse_args(argv)
    try:
        paths = make_all(args.src, args.out, only=args.only)
    except FileNotFoundError as e:
        ap.error(str(e))
    for p in paths:
        print(p)
    print(f"{len(paths)} figure(s) written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
