"""Regenerate timing.png from a run folder: ``python -m figures.fig_timing --from DIR [--out OUT_DIR]``."""
from figures import run

if __name__ == "__main__":
    run("timing")
