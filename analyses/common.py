"""Shared plumbing of the analysis scripts: CLI arguments, the setup, and the eraser (fitted or loaded).

Why one module: probing, patching and leakage must look at *the same* model
and *the same* eraser, so they share how the setup is loaded, how the eraser
is obtained (``--eraser PATH`` loads a fitted artifact, else the ``--variant``
is fitted with :func:`eraser.pipeline.fit_variant` and saved next to the
results), which strength steers, and how the steered model is run (the
deployed path, :meth:`Context.steered`).  Every script takes::

    --arch llava|qwen2_5_vl  --seed N  --forget-ratio 5|10|15  --quick
    --model PATH --mllmu DIR [--dtype D]   (a local checkpoint on a local MLLMU-Bench, e.g. LLaVA-1.5-7B)
    --out DIR  --eraser PATH  --variant NAME  --strength L  --limit N  --threads N  --no-progress

Why ``--variant`` defaults to ``mllmeraser_stacked_gate``: the analyses ask
what a *forgetting* model still knows or leaks, and on the embedded default
that is the variant that forgets (refusal >= 0.997 on forget at 5/10/15 %);
the paper's ``mllmeraser`` refuses 16 % there, so a leakage number against it
measures little.  ``--variant mllmeraser`` studies the paper's method.

``--quick`` defaults to on when ``MLLMERASER_QUICK=1`` is set (for the embedded default: with ``--model``
the checkpoint is the model, and ``--quick`` is an error).

>>> ap = base_parser("probing", "demo")
>>> args = ap.parse_args(["--quick", "--limit", "3"])
>>> (args.quick, args.limit, str(args.out))
(True, 3, 'runs/probing')
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from analyses._cli import script_parser
from eraser.argtypes import add_local_args, finite_float, nonneg_int, positive_int
from eraser.argtypes import out_dir as out_folder
from eraser.data.schema import Profile
from eraser.method import ArtifactError, MLLMEraser
from eraser.pairs import forget_queries
from eraser.data.mllmu import BenchmarkFormatError
from eraser.pipeline import LocalSetupError, Setup, fit_variant, setup_from_args
from eraser.variants import GATED_VARIANTS
from eraser.zoo import CorruptCheckpointError

QUICK_ENV = "MLLMERASER_QUICK"

#: The variant fitted when no ``--eraser`` is given (why: the module docstring).
DEFAULT_VARIANT = "mllmeraser_stacked_gate"

#: What every leakage/probing result says about the attacker, so a number is never read out of its context.
THREAT_MODEL = ("The steered model is served behind an API: the attacker chooses images and prompt text and reads "
                "the greedy answers, but cannot remove the steering hooks, change the strength, or read activations "
                "or weights. (With weight access, the hooks are simply not attached and the model is vanilla.)")


def env_quick() -> bool:
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The arguments every analysis script shares; scripts add their own on the returned parser."""
    ap = script_parser(name, description)
    ap.add_argument("--arch", default=None, choices=["llava", "qwen2_5_vl"],
                    help="model architecture (default: llava; with --model, the checkpoint's own)")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="model and data seed")
    ap.add_argument("--forget-ratio", type=int, default=5, choices=[5, 10, 15], help="forget split, in %%")
    ap.add_argument("--quick", action="store_true", default=None,
                    help=f"use the quick (smaller, faster) model; on by default when {QUICK_ENV}=1")
    ap.add_argument("--out", type=out_folder, default=Path("runs") / name,
                    help="output folder (checked when parsed: not an existing file)")
    ap.add_argument("--eraser", type=Path, default=None,
                    help="a fitted eraser artifact (.safetensors) to load; without it one is fitted on the "
                         "model and saved as OUT/eraser.safetensors")
    ap.add_argument("--variant", default=DEFAULT_VARIANT, choices=GATED_VARIANTS,
                    help="the MLLMEraser variant to fit when no --eraser is given (mllmeraser: the paper's; the "
                         "default is the one that forgets on the embedded default model)")
    ap.add_argument("--strength", type=finite_float, default=None,
                    help="steering strength; None: the eraser's own (chosen by the autotuner when fitted)")
    add_local_args(ap)
    ap.add_argument("--limit", type=positive_int, default=None,
                    help="small config for tests: at most N profiles per split (and fewer pairs/queries)")
    ap.add_argument("--batch-size", type=positive_int, default=32, help="rows per forward pass")
    ap.add_argument("--cache-dir", default=None, help="model cache; None: $MLLMERASER_CACHE, else ~/.cache/mllmeraser")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads; None: torch's choice")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


@dataclass
class Context:
    """What a script works on: the setup, the eraser, the strength used and how the eraser was obtained."""

    setup: Setup
    eraser: MLLMEraser
    strength: float
    eraser_source: str
    fit_s: float | None
    args: argparse.Namespace

    @property
    def model(self):
        return self.setup.model

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    @property
    def variant(self) -> str | None:
        """The variant the eraser was fitted as (recorded in its artifact), or None for an older artifact."""
        return self.eraser.info.get("variant")

    def hooks(self) -> list:
        """The eraser's steering hooks at the strength in use, for one forward pass (prefill).

        For generation use :meth:`steered`: an eraser with ``answer_steps`` also steers decode steps.
        """
        return self.eraser.hooks(self.strength)

    def steered(self):
        """A context in which every call on the model is steered as deployed (torch hooks, every step the
        eraser acts on: the prefill, and the first answer tokens for an eraser with ``answer_steps``)."""
        return self.eraser.attached(self.model, self.strength)

    def config(self) -> dict[str, Any]:
        return {**self.setup.config(), "quick": bool(self.args.quick), "limit": self.args.limit,
                "eraser": {"source": self.eraser_source, "variant": self.variant, "layers": list(self.eraser.layers),
                           "gate_stack": list(self.eraser.config.gate_stack or []),
                           "answer_steps": self.eraser.config.answer_steps,
                           "site": self.eraser.config.site, "strength": self.strength, "fit_s": self.fit_s}}


def set_threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise SystemExit(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def load_setup_only(args: argparse.Namespace) -> Setup:
    """The setup named by ``args`` (the embedded default, quick or not, or ``--model`` + ``--mllmu``), for scripts
    that study the vanilla model and need no eraser; a bad checkpoint or benchmark exits in one line."""
    if args.quick is None:  # not given: $MLLMERASER_QUICK decides, for the embedded default only
        args.quick = env_quick() and not args.model
    try:  # the embedded default, or --model + --mllmu (a local checkpoint on a local MLLMU-Bench)
        return setup_from_args(args)
    except (LocalSetupError, BenchmarkFormatError, CorruptCheckpointError) as e:  # one line, before any model work
        raise SystemExit(str(e)) from None


def load_context(args: argparse.Namespace) -> Context:
    """Load the setup and the eraser named by ``args`` (fit and save one under ``args.out`` if none is given)."""
    set_threads(args.threads)
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {args.limit}")
    given = None
    if args.eraser is not None:  # a bad artifact fails in one line, before the model is loaded
        if not Path(args.eraser).exists():
            raise SystemExit(f"--eraser {args.eraser}: no such file")
        try:
            given = MLLMEraser.load(args.eraser)
        except ArtifactError as e:
            raise SystemExit(f"--eraser {args.eraser}: {e}") from None
    setup = load_setup_only(args)
    fit_s = None
    if given is not None:
        try:  # an eraser fitted on another model, or on another forget split (the analyses count its people)
            given.check_model(setup.model)
            given.check_forget_set(forget_queries(setup.bench))
        except ValueError as e:
            raise SystemExit(f"--eraser {args.eraser}: {e}") from None
        eraser = given
        source = str(args.eraser)
    else:
        t0 = time.perf_counter()
        eraser, _, _ = fit_variant(setup, args.variant)
        fit_s = time.perf_counter() - t0
        path = eraser.save(Path(args.out) / "eraser.safetensors")
        source = f"fitted ({path})"
    strength = float(args.strength if args.strength is not None else eraser.config.strength)
    if strength == 0.0:
        print("[warning] steering strength is 0: the steered model equals the vanilla one "
              "(the autotuner found no feasible strength); pass --strength to force one")
    return Context(setup, eraser, strength, source, fit_s, args)


def limited(profiles: Sequence[Profile], limit: int | None) -> list[Profile]:
    """The first ``limit`` profiles (all when ``limit`` is None): splits are already seeded permutations."""
    return list(profiles) if limit is None else list(profiles)[:limit]


def out_dir(args: argparse.Namespace) -> Path:
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_json(path: str | os.PathLike, obj: Any) -> dict:
    """Write ``obj`` as strict JSON, atomically (:func:`interp.io.write_json`); returns what was written."""
    from interp.io import strict_json, write_json

    obj = strict_json(obj)
    write_json(path, obj)
    return obj


def write_outputs(args: argparse.Namespace, name: str, result: dict, summary: Any, plot: Any, figure: str) -> dict:
    """Save ``result`` as ``OUT/<name>.json`` (strict JSON, atomic), print it with ``summary``, draw ``figure``
    with ``plot`` from what was saved, and say what was written; returns what was written."""
    out = out_dir(args)
    res = save_json(out / f"{name}.json", result)
    summary(res)
    png = plot(res, out / figure)
    print(f"  wrote {out / f'{name}.json'}" + (f" and {png}" if png else ""))
    return res


def rate(values: Sequence[bool | float]) -> float | None:
    """Mean of ``values`` as a float in [0, 1]; None (JSON null) when there is nothing to average."""
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else None
