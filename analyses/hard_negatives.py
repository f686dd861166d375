"""Hard-negative retain weighting for a windowed gate: does counting the retain queries it fires on help?

Why this script exists.  On the quick model an Intel Xeon trains, the window and per-person gates leave
one or two of the 11 forget questions answered at forget 5 %: the one forget person (Ben Brandt) shares
his surname with a celebrity (Oscar Brandt), and the mean-read gate scores the celebrity's questions
nearly as high as his.  The retain statistics count those questions once among ~800, so the null space's
energy rule may keep the little subspace where they differ.  :mod:`eraser.hard_negatives` counts the
retain queries a first gate would steer (calibrated gate over its window's ``lo``) ``1 + weight`` times;
this script refits every setting on the validation split for each weight and evaluates, so the weight's
effect is measured end to end rather than assumed.  Measured (see the README): on the Intel-trained
quick model weight 10 took the window gate from forget cls 0.091 to 0 (whole bar met), weight 100 did
not; on the AMD-trained one weights 3-10 changed nothing for the window gate and cost the per-person gate
one celebrity question (celebrity cls drop 0.030 -> over the 0.03 tolerance).  Not adopted by a variant.

Writes ``OUT/hard_negatives.json``: the first gate, the mined counts, and per weight the gate choice, the
strength, the mined queries still over the refit's window, the evaluation and the method bar's checks.
Run: ``python -m analyses.hard_negatives [--quick] [--forget-ratio 5] [--variant mllmeraser_window_gate]
[--weights 0,10] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from analyses._cli import script_parser
from eraser.argtypes import finite_float, nonneg_int, out_dir, positive_int
from eraser.autotune import DEFAULT_GRID, choose_gate, choose_strength, validation_split
from eraser.hard_negatives import hard_negative_moments, with_hard_negatives
from eraser.method import MLLMEraser
from eraser.pairs import fit_data
from eraser.pipeline import eraser_checks, evaluate_model, fit_eraser, load_setup, retain_budget
from eraser.variants import ERASER_VARIANTS
from interp.io import write_json

from .common import env_quick

WINDOWED = tuple(sorted(v for v, o in ERASER_VARIANTS.items() if o.get("window")))


def run(quick: bool = False, forget_ratio: int = 5, seed: int = 0, variant: str = "mllmeraser_window_gate",
        weights: Sequence[float] = (0.0, 10.0), progress: bool = True) -> dict[str, Any]:
    """Fit ``variant`` once, mine its hard retain queries, and refit + evaluate at every ``weight``."""
    if variant not in WINDOWED:
        raise ValueError(f"hard negatives are mined over a gate window: {variant!r} has none; use one of {WINDOWED}")
    if not weights or any(not w >= 0 for w in weights):
        raise ValueError(f"weights must be a non-empty list of numbers >= 0, got {list(weights)}")
    t0 = time.perf_counter()
    setup = load_setup("llava", seed, forget_ratio, quick, progress=progress)
    model = setup.model
    _, stats, config, opts, _ = fit_eraser(setup, variant)
    retain = fit_data(model, setup.bench, seed=seed, pgd=None, source=setup.source,
                      retain_requests=opts.get("retain_requests", False),
                      retain_limit=retain_budget(model, config, opts)).retain  # the fit's own retain queries
    val, kind = validation_split(setup.bench, setup.source, seed=seed)

    def gate_for(st):
        choice = choose_gate(model, st, val, config, batch_size=setup.batch_size, window=True)
        eraser = MLLMEraser.from_stats(st, replace(config, **choice.config_changes())).scaled(choice.calibration)
        return choice, eraser

    first, first_eraser = gate_for(stats)
    if first.window is None:
        raise RuntimeError(f"{variant}: no gate window could be chosen on this model ({first.window_reason}); "
                           "nothing to mine")
    K_hard, hard = hard_negative_moments(model, retain, first_eraser.w, config, stats.layers, first.window[0],
                                         progress)
    counts = hard.sum(1).tolist()
    mined = [q for q, h in zip(retain, hard.any(0)) if h]  # over lo at some gate row: what the first gate steers
    vanilla, _, _ = evaluate_model(setup, with_probs=False)
    rows = []
    for weight in weights:
        choice, eraser = gate_for(with_hard_negatives(stats, K_hard, weight, counts))
        sel = choose_strength(model, eraser, val, grid=DEFAULT_GRID, batch_size=setup.batch_size, validation=kind,
                              progress=progress)
        eraser = eraser.with_config(strength=sel.strength or 0.0)
        still = None
        if choice.window is not None:  # scored as mining scores, on the mined queries alone
            _, over = hard_negative_moments(model, mined, eraser.w, config, stats.layers, choice.window[0])
            still = int(over.any(0).sum())
        res, _, _ = evaluate_model(setup, lambda: eraser.attached(model), with_probs=False)
        checks = eraser_checks(vanilla, res)
        rows.append({"weight": weight, "gamma": choice.gamma, "null_space": choice.null_space,
                     "window": choice.window, "tail_margin": max(r["tail_margin"] for r in choice.candidates),
                     "strength": sel.strength, "hard_still_over_lo": still, "methods": res, "checks": checks})
        failed = {k: round(v["value"], 3) for k, v in checks.items() if isinstance(v, dict) and not v["pass"]}
        print(f"[hard_negatives] weight {weight:g}: gamma {choice.gamma:g} {choice.null_space} window "
              f"{choice.window} strength {sel.strength}; mined still over lo {still}/{len(mined)}; "
              f"bar {'met' if checks['all_pass'] else 'missed: ' + str(failed)}", flush=True)
    return {"config": {**setup.config(), "quick": quick, "variant": variant, "validation": kind},
            "first": {"gamma": first.gamma, "null_space": first.null_space, "window": first.window},
            "mined": {"per_gate_row": counts, "queries": len(mined), "of": len(retain)},
            "vanilla": vanilla, "weights": rows, "total_s": time.perf_counter() - t0}


def _weights(text: str) -> list[float]:
    try:
        return [finite_float(w) for w in text.split(",") if w.strip()]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"--weights takes comma-separated numbers: {e}") from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = script_parser("hard_negatives", __doc__)
    ap.add_argument("--quick", action="store_true", default=env_quick(),
                    help="the quick model; on by default when MLLMERASER_QUICK=1")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="model and data seed")
    ap.add_argument("--forget-ratio", type=int, default=5, choices=[5, 10, 15], help="forget split, in %%")
    ap.add_argument("--variant", default="mllmeraser_window_gate", choices=WINDOWED,
                    help="the windowed-gate variant whose retain set is re-weighted")
    ap.add_argument("--weights", type=_weights, default=[0.0, 10.0], help="comma-separated, e.g. 0,3,10,30")
    ap.add_argument("--out", type=out_dir, default=Path("runs") / "hard_negatives",
                    help="output folder (checked when parsed: not an existing file)")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        out = run(args.quick, args.forget_ratio, args.seed, args.variant, args.weights, not args.no_progress)
    except ValueError as e:
        ap.error(str(e))
    write_json(args.out / "hard_negatives.json", out)
    print(f"[hard_negatives] wrote {args.out / 'hard_negatives.json'} in {out['total_s']:.0f}s")
    return out


if __name__ == "__main__":
    main()
