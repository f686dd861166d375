"""``mllmeraser``: the command line.  Every subcommand runs on the embedded default with no download.

    mllmeraser eval --method vanilla [--arch llava|qwen2_5_vl] [--seed N] [--forget-ratio 5|10|15] [--quick] [--out DIR]
    mllmeraser eval --method mllmeraser ...      # vanilla + MLLMEraser (auto strength) + its ablations
    mllmeraser fit --out DIR ...                 # fit, choose the strength, save the artifact
    mllmeraser eval --artifact DIR ...           # vanilla + a saved artifact, as it is
    mllmeraser sweep --out DIR ...               # layer x strength sweep (resumable) and heatmap
    mllmeraser demo --out DIR [--quick] [--baselines ga,...,mmunlearner]   # the main job: table + figures
    mllmeraser figures --from DIR                # regenerate the figures from saved results
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from interp.io import write_json

from .argtypes import add_local_args, finite_float, nonneg_int, out_dir, positive_int
from .baselines.finetune import DEMO_BASELINES, METHODS
from .variants import ERASER_VARIANTS, GATED_VARIANTS

ARCHS = ("llava", "qwen2_5_vl")
#: ``eval --method``: vanilla alone, every MLLMEraser variant (``mllmeraser``), or one variant next to vanilla.
def baseline_list(text: str) -> tuple[str, ...]:
    """``--baselines``: distinct names among the training baselines, comma-separated (may be empty: none)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(set(names) - set(METHODS))
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names among {', '.join(sorted(METHODS))}, got {text!r}")
    return names


METHOD_SETS = {
    "vanilla": ["vanilla"],
    "mllmeraser": ["vanilla", *ERASER_VARIANTS],
    **{name: ["vanilla", name] for name in ERASER_VARIANTS if name != "mllmeraser"},
}


NO_ORACLE_HELP = ("skip the retain-only oracle, whose first training costs as much as the model's: no forget "
                  "quality and no oracle check (checks.memorisation.skipped says so)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=ARCHS, default=None,
                   help="model architecture (default: llava; with --model, the checkpoint's own)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="data and training seed (default: 0)")
    p.add_argument("--forget-ratio", type=int, choices=(5, 10, 15), default=5, help="forget split in percent")
    p.add_argument("--quick", action="store_true", help="small data and a short training run (for tests)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="evaluation batch size")
    p.add_argument("--cache-dir", default=None, help="model cache (default: $MLLMERASER_CACHE or ~/.cache/mllmeraser)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_local_args(p, oracle=True)
    p.add_argument("--threads", type=positive_int, default=int(os.environ.get("MLLMERASER_THREADS", "2")),
                   help="torch CPU threads (default 2, or $MLLMERASER_THREADS; use 1 when other jobs share the cores)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mllmeraser", description="Test-time unlearning for multimodal LLMs (MLLMEraser).")
    sub = ap.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="evaluate methods on the embedded default; writes results.json/.md")
    _common(ev)
    ev.add_argument("--method", choices=sorted(METHOD_SETS), default="vanilla",
                    help="vanilla alone (default), every MLLMEraser variant next to it (mllmeraser), or one variant")
    ev.add_argument("--out", type=out_dir, default=None,
                    help="output folder (default: print only); finished methods are journaled there, so a killed "
                         "evaluation run again resumes")
    ev.add_argument("--no-oracle", action="store_true", help=NO_ORACLE_HELP)
    ev.add_argument("--artifact", default=None,
                    help="also evaluate a saved eraser (a file or a folder written by `fit`), as it is: no refit; "
                         "it must have been fitted on this model (--arch/--seed/--quick)")
    fit = sub.add_parser("fit", help="fit MLLMEraser with the automatic strength and save the artifact")
    _common(fit)
    # only gated variants: an artifact carries no "ungated" switch, so a saved ``steer_static`` would steer
    # through a gate when attached; that ablation is evaluated with ``eval --method steer_static`` instead
    fit.add_argument("--variant", default="mllmeraser", choices=[v for v in ERASER_VARIANTS if v in GATED_VARIANTS],
                     help="the variant to fit and save (default: mllmeraser; static steering is an ablation: "
                          "eval --method steer_static)")
    fit.add_argument("--out", type=out_dir, required=True, help="folder for eraser.safetensors and selection.json")
    sw = sub.add_parser("sweep", help="layer x strength sweep of MLLMEraser (resumable JSONL) and its heatmap")
    _common(sw)
    sw.add_argument("--out", type=out_dir, required=True,
                    help="folder for sweep.jsonl (resumed if there), the fitted eraser and heatmap.png")
    sw.add_argument("--strengths", type=finite_float, nargs="+", default=None,
                    help="strengths to try (finite; negative steers towards refusal)")
    figs = sub.add_parser("figures", help="regenerate every figure from a results folder, without recomputing")
    figs.add_argument("--from", dest="src", required=True, help="a folder written by demo/eval")
    figs.add_argument("--out", type=out_dir, default=None, help="where to write PNGs (default: the same folder)")
    demo = sub.add_parser("demo", help="the main job: fit, evaluate, tabulate and plot")
    _common(demo)
    demo.add_argument("--out", type=out_dir, required=True,
                      help="folder for results.json/.md, the artifacts, the sweep and the figures")
    demo.add_argument("--baselines", type=baseline_list, default=DEMO_BASELINES, metavar="LIST",
                      help=f"training baselines, comma-separated, among {', '.join(sorted(METHODS))} (default: "
                           f"{','.join(DEMO_BASELINES)}; MMUnlearner's saliency pass and its selection add ~25 s "
                           "to the quick demo)")
    demo.add_argument("--no-oracle", action="store_true", help=NO_ORACLE_HELP)
    return ap


def _setup(args: argparse.Namespace):
    from .pipeline import setup_from_args

    return setup_from_args(args)


def _use_oracle(args: argparse.Namespace, setup) -> bool:
    """Whether forget quality and the oracle check run: not under --no-oracle, and only where an oracle exists."""
    if getattr(args, "no_oracle", False):
        return False
    if not setup.has_oracle:
        print(f"mllmeraser {args.command}: no retain-only oracle for {setup.local['model']}: forget quality and the "
              "oracle check are skipped (--oracle-model PATH gives one)", file=sys.stderr)
        return False
    return True


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from .evaluate import results_table, write_results
    from .pipeline import eraser_checks, memorisation_checks, run_methods

    erasers = {}
    if args.artifact:
        from .method import MLLMEraser

        loaded = MLLMEraser.load(args.artifact)  # a bad file fails here, before any model is loaded
    setup = _setup(args)
    methods = list(METHOD_SETS[args.method])
    if args.artifact:  # run_methods checks it against the model and the forget split before evaluating
        name = f"{loaded.info.get('variant', 'mllmeraser')} (artifact)"
        erasers[name] = loaded
        methods.append(name)
    oracle = _use_oracle(args, setup)
    # with --out, each finished method is journaled there: a killed evaluation resumes (run_methods)
    journal = Path(args.out) / "eval_journal.jsonl" if args.out else None
    out = run_methods(setup, methods, oracle=oracle, erasers=erasers, journal=journal)
    checks: dict[str, Any] = {"refusal": out["checks"]}
    vanilla = out["methods"]["vanilla"]
    checks["memorisation"] = memorisation_checks(setup, vanilla, out["checks"]["vanilla"], oracle=oracle)
    for name in out["methods"]:
        if name != "vanilla":
            checks[name] = eraser_checks(vanilla, out["methods"][name])
    print(results_table(out["methods"]))
    for name, c in checks.items():
        if isinstance(c, dict) and "all_pass" in c:
            failed = [k for k, v in c.items() if isinstance(v, dict) and not v["pass"]]
            skipped = f" (skipped: {', '.join(c['skipped'])})" if c.get("skipped") else ""
            print(f"{name}: {'all checks pass' if not failed else 'FAILED ' + ', '.join(failed)}{skipped}")
    if args.out:
        config = {**out["config"], "selection": out["selection"]}
        write_results(Path(args.out), config, out["methods"], out["timing"], checks=checks)
        print(f"wrote {Path(args.out) / 'results.json'}")
    return {**out, "checks": checks}


def cmd_fit(args: argparse.Namespace) -> Path:
    from .pipeline import fit_variant

    setup = _setup(args)
    eraser, selection, timing = fit_variant(setup, args.variant)
    out = Path(args.out)
    path = eraser.save(out / "eraser.safetensors")
    # the artifact's digest: the two files are replaced one after the other, so a reader can tell they belong
    # together (a run killed between the renames leaves a new artifact beside the old selection)
    write_json(out / "selection.json", {"selection": selection.to_dict() if selection else None, "timing": timing,
                                        "config": setup.config(), "eraser_digest": eraser.digest()})
    c = eraser.config
    null_space = f"energy {c.energy}" if c.energy is not None else f"rho {c.rho}"
    print(f"chosen strength {c.strength} ({selection.reason if selection else 'fixed'}); gamma {c.gamma}, "
          f"{null_space}; fit {timing['fit_s']:.1f}s; artifact {path} ({eraser.nbytes} bytes)")
    return path


def cmd_sweep(args: argparse.Namespace) -> Path:
    """Fit (automatic strength), then steer one layer at a time (and all layers) over a strength grid.

    The fitted eraser is saved beside the journal, so a resumed sweep loads it (after checking it against
    the model and the forget split) instead of fitting again; settings already in the journal are skipped."""
    from .demo import SWEEP_STRENGTHS, check_sweep_journal, layer_sweep
    from .pipeline import fit_variant
    from .plots import plot_heatmap

    setup = _setup(args)
    out = Path(args.out)
    check_sweep_journal(setup, out / "sweep.jsonl")
    artifact = out / "eraser.safetensors"
    if artifact.exists():  # a resumed sweep: the fit (and its strength search) is the slow part, so keep it
        from .method import MLLMEraser
        from .pairs import forget_queries

        from .artifact import ArtifactMismatchError

        eraser = MLLMEraser.load(artifact)
        eraser.check_model(setup.model)
        eraser.check_forget_set(forget_queries(setup.bench))
        variant = eraser.info.get("variant")
        if variant not in (None, "mllmeraser"):  # e.g. `fit --variant ...` wrote it: not the method this sweeps
            raise ArtifactMismatchError(f"{artifact} was fitted as {variant}; the sweep sweeps the paper's method "
                                        "(mllmeraser): give the sweep its own --out, or move the artifact away")
        print(f"reusing the eraser fitted by an earlier run, {artifact} (delete it to refit)")
    else:
        eraser, _, _ = fit_variant(setup, "mllmeraser")
        check_sweep_journal(setup, out / "sweep.jsonl", eraser)  # before writing beside it
        eraser.save(artifact)
    path = layer_sweep(setup, eraser, out, tuple(args.strengths) if args.strengths else SWEEP_STRENGTHS)
    png = plot_heatmap(out, out / "heatmap.png")
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from interp.sweep import JournalError, SweepContextError

    from .data.mllmu import BenchmarkFormatError
    from .method import ArtifactError, ArtifactMismatchError
    from .pipeline import LocalSetupError
    from .zoo import CorruptCheckpointError

    torch.set_num_threads(getattr(args, "threads", 2))
    try:
        return _run(args)
    except (ArtifactError, ArtifactMismatchError, SweepContextError, JournalError, BenchmarkFormatError,
            FileNotFoundError, LocalSetupError, CorruptCheckpointError) as e:  # bad input: one line, no traceback
        print(f"mllmeraser {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what finished is on disk (files are replaced whole), so say so in one line
        print(f"mllmeraser {args.command}: interrupted; files already written are complete, and a sweep resumes "
              "from its journal", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "eval":
        cmd_eval(args)
    elif args.command == "fit":
        cmd_fit(args)
    elif args.command == "sweep":
        cmd_sweep(args)
    elif args.command == "figures":
        from .plots import FiguresFailed, make_all

        src = Path(args.src)
        if not src.is_dir():
            print(f"mllmeraser figures: {src} is not a folder", file=sys.stderr)
            return 2
        try:
            paths = make_all(src, Path(args.out) if args.out else None)
        except FiguresFailed as e:  # each failure was printed in one line as it happened
            print("\n".join(f"wrote {p}" for p in e.made))
            print(f"mllmeraser figures: error: {e}", file=sys.stderr)
            return 1
        if not paths:  # nothing to draw from is a failure, as for python -m figures.make_all
            print(f"mllmeraser figures: no figure had data in {src}", file=sys.stderr)
            return 1
        print("\n".join(f"wrote {p}" for p in paths))
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
