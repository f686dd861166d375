"""PGD budget: how much does the attack on the recall images matter, to the erasure direction and to forgetting?

Reviewers asked how sensitive MLLMEraser is to its PGD budget (METHOD.md). The recall pairs' images are
attacked (targeted L-inf PGD, pixel space) so the model recalls the forget person's fact; the erasure
direction is ``mean_recall h - mean_erase h``. So the budget can only act through that direction. This script
varies the budget with everything else fixed: the same recall questions, the same erase pairs, and the eraser's
own layers, site, gate and calibration. Per budget ``eps`` (in /255; ``alpha = eps / 4``, the release's ratio
of 2/255 at 8/255; 0 means clean images, the text-only ablation's data):

* the attack: the mean target loss (cross-entropy of the recall answer) on the clean images and after the
  attack (on the float pixels, before the uint8 rounding the saved images get);
* the direction (:class:`eraser.direction.ErasureDirection`): its norm per steered layer, its cosine with
  the clean direction (eps 0) and with the eraser's own;
* the eraser rebuilt from this direction and the eraser's own gate (:meth:`MLLMEraser.from_parts`), on the
  validation split (fresh questions, never the evaluation's; on a local MLLMU-Bench, which has no generator,
  a seeded subset of its own questions, as the eraser's settings were chosen there): at the eraser's own
  strength, and at the strength the automatic rule picks for it (:func:`eraser.autotune.choose_strength`, on
  ``--grid`` plus that strength): forget refusal and multiple-choice accuracy, retain accuracy, answerable
  requests refused (when the split has them).

Writes ``OUT/pgd_budget.json`` and ``OUT/pgd_budget.png``. The eraser comes from ``--eraser PATH`` or is
fitted (``--variant``), as in every analysis (``analyses/common.py``).

``--limit N`` uses N recall and N erase pairs (at least 2; the release's 17 without it), for quick runs.

Run: ``python -m analyses.pgd_budget [--quick] [--eps 0,2,4,8,16] [--steps 10] [--grid -0.5,-1,-2]``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Sequence

from eraser.argtypes import positive_int
from eraser.autotune import DEFAULT_GRID, choose_strength
from eraser.direction import ErasureDirection, cosine_rows
from eraser.method import MLLMEraser
from eraser.pairs import erase_pairs, recall_questions
from eraser.pgd import PGDConfig, pgd_attack
from eraser.plots import plot_pgd_budget

from .common import Context, base_parser, load_context, write_outputs

QUESTION = ("How sensitive is MLLMEraser to the PGD budget of its recall images: the attack, the erasure "
            "direction, and forgetting with the gate held fixed?")


def floats(text: str) -> list[float]:
    """A comma-separated list of finite numbers (``--eps``, ``--grid``); an empty or bad list is a parse error."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected a non-empty list of finite numbers, got {text!r}")
    return values


def budgets(text: str) -> list[float]:
    """``--eps``: :func:`floats`, each >= 0 (checked when parsed, before any model work)."""
    values = floats(text)
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"PGD budgets are >= 0 (in /255), got {text!r}")
    return values


def summarise_selection(sel: Any, own: float) -> dict[str, Any]:
    """The validation numbers at the eraser's own strength and at the chosen one, from one strength search."""
    rows = {float(r["strength"]): r for r in sel.candidates}

    def pick(r: dict[str, Any] | None) -> dict[str, Any] | None:
        if r is None:
            return None
        return {"strength": r["strength"], "feasible": r["feasible"], "forget_refusal": r["forget"]["refusal_rate"],
                "forget_cls": r["forget"]["cls_acc"], "retain_cls": r["retain"]["cls_acc"],
                "retain_refusal": r["retain"]["refusal_rate"],
                "answerable_refusal": r["answerable"]["refusal_rate"] if "answerable" in r else None}

    return {"at_own_strength": pick(rows.get(float(own))),
            "chosen": pick(rows.get(float(sel.strength))) if sel.strength is not None else None,
            "reason": sel.reason}


def run(ctx: Context, eps: Sequence[float] = (0, 2, 4, 8, 16), steps: int = 10,
        grid: Sequence[float] = DEFAULT_GRID) -> dict[str, Any]:
    if any(e < 0 for e in eps):
        raise ValueError(f"PGD budgets are >= 0 (in /255), got {list(eps)}")
    if steps == 0 and any(e > 0 for e in eps):
        raise ValueError("steps 0 runs no attack: every budget would be the clean images")
    model, bench, seed, eraser = ctx.model, ctx.setup.bench, ctx.setup.seed, ctx.eraser
    layers, site = list(eraser.layers), eraser.config.site
    n_pairs = 17 if ctx.args.limit is None else min(17, max(2, ctx.args.limit))  # the release's 17; fewer for tests
    rows = recall_questions(bench, n_pairs, seed=seed)
    erase = erase_pairs(bench, n_pairs, seed=seed)
    val, kind = ctx.setup.validation()
    vanilla = ctx.setup.vanilla_validation()
    own = ctx.strength
    search = sorted(set(map(float, grid)) | {float(own)}, key=abs)
    budgets: list[dict[str, Any]] = []
    clean_direction = None
    t0 = time.perf_counter()
    for e in sorted(set(map(float, eps))):
        config = PGDConfig(eps=e / 255, alpha=e / 255 / 4, steps=steps if e > 0 else 0)
        attack = pgd_attack(model, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], config)
        images = attack.images if e > 0 else [r[0] for r in rows]  # eps 0: the clean images themselves
        recall = list(zip(images, [r[1] for r in rows]))
        direction = ErasureDirection.fit(model, recall, erase, layers=layers, site=site,
                                         batch_size=eraser.config.batch_size,
                                         answer_prefix=eraser.config.answer_prefix if eraser.config.answer_steps
                                         else None)
        if clean_direction is None and e == 0:
            clean_direction = direction
        steered = MLLMEraser.from_parts(direction, eraser.gate, strength=own, every_step=eraser.config.every_step,
                                        answer_steps=eraser.config.answer_steps, batch_size=eraser.config.batch_size)
        sel = choose_strength(model, steered, val, grid=search, batch_size=ctx.setup.batch_size, validation=kind,
                              progress=ctx.progress, vanilla=vanilla)
        budgets.append({
            "eps_255": e, "alpha_255": e / 4, "steps": config.steps,
            "target_loss": {"clean": float(attack.clean_loss.mean()), "attacked": float(attack.final_loss.mean())},
            "linf_255": float(attack.linf.max()) * 255,
            "direction_norm": direction.norms().tolist(),
            "cosine_to_eraser": direction.cosine(eraser.direction).tolist(),
            "cosine_to_clean": direction.cosine(clean_direction).tolist() if clean_direction is not None else None,
            # the answer directions (an eraser with answer_steps) move with the recall images too
            "answer_cosine_to_eraser": (cosine_rows(direction.answer, eraser.d_answer).tolist()
                                        if direction.answer is not None and eraser.d_answer is not None else None),
            "validation": summarise_selection(sel, own),
        })
    return {
        "question": QUESTION,
        "config": {**ctx.config(), "steps": steps, "grid": search, "validation": kind,
                   "n_recall_pairs": len(rows), "n_erase_pairs": len(erase)},
        "vanilla_validation": vanilla,
        "budgets": budgets,
        "timing": {"total_s": time.perf_counter() - t0},
    }


def print_summary(res: dict[str, Any]) -> None:
    print(f"\n{res['question']}")
    c = res["config"]
    print(f"  {c['n_recall_pairs']} recall / {c['n_erase_pairs']} erase pairs; layers {c['eraser']['layers']}; "
          f"the eraser's strength {c['eraser']['strength']:g}; validation numbers ({c['validation']})")
    fmt = lambda v: "  n/a" if v is None else f"{v:5.2f}"  # noqa: E731
    print("  eps/255 steps linf/255  loss clean->attacked  cos(clean) cos(eraser)  | at own strength: forget refusal, "
          "forget cls, retain cls | chosen strength: lambda, forget refusal, retain cls")
    for b in res["budgets"]:
        own, ch = b["validation"]["at_own_strength"] or {}, b["validation"]["chosen"]
        cos_c = "  n/a" if b["cosine_to_clean"] is None else f"{min(b['cosine_to_clean']):5.3f}"
        chosen = ("none feasible" if ch is None else
                  f"{ch['strength']:g}, {fmt(ch['forget_refusal'])}, {fmt(ch['retain_cls'])}")
        print(f"  {b['eps_255']:7g} {b['steps']:5d} {b['linf_255']:8.2f}  "
              f"{b['target_loss']['clean']:8.2e} -> {b['target_loss']['attacked']:8.2e}"
              f"  {cos_c}      {min(b['cosine_to_eraser']):5.3f}   | {fmt(own.get('forget_refusal'))}, "
              f"{fmt(own.get('forget_cls'))}, {fmt(own.get('retain_cls'))} | {chosen}")
    print("  (cosines: the smallest over the steered layers)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = base_parser("pgd_budget", __doc__)
    ap.add_argument("--eps", type=budgets, default=[0.0, 2.0, 4.0, 8.0, 16.0],
                    help="PGD budgets in /255 (alpha = eps / 4; 0: clean images)")
    ap.add_argument("--steps", type=positive_int, default=10, help="PGD steps (the release's 10)")
    ap.add_argument("--grid", type=floats, default=list(DEFAULT_GRID),
                    help="strengths the automatic choice searches (the eraser's own is always added)")
    args = ap.parse_args(argv)
    ctx = load_context(args)
    return write_outputs(args, "pgd_budget", run(ctx, args.eps, args.steps, args.grid), print_summary, plot_pgd_budget, "pgd_budget.png")


if __name__ == "__main__":
    main(sys.argv[1:])
