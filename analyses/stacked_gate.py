"""Stacked gate: one gate over several layers' features at once, read in a first (unsteered) pass.

Why this script exists.  On the default model (d_model 128, 130 identities)
every per-layer gate overlaps: a gate lives in the null space of the retain
activations, and at one layer 125 retain and celebrity identities leave no
directions private to the forget people (best validation margin, forget
gates' 10th percentile over the retain gates' 99th, 0.99 / 1.01 / 1.17 at
layers 1 / 2 / 3 with per-person gates; stacking the layers' prompt means,
384 or 512 dims, gives 2.0 / 2.5).  Fitting on fewer retain people shows the
same thing from the other side: with 25 of them the window gate separates,
with 60 only the per-person gate does, with all 125 neither does.

So this gate reads the concatenation of the prompt means at ``SITES`` (every
steered layer's input and the last layer's output), which no single layer
can see in one causal pass: a first pass reads them unsteered, the gate
(per forget person, calibrated on their own validation questions, the
largest wins, passed through the validation window) gives one value per
query, and a second pass steers every layer's input with the fitted
eraser's direction scaled by it (prefill only, as the paper).  Everything
is chosen on the validation split with the rules of :mod:`eraser.autotune`:
gamma and the null space by the widest forget/retain margin, the window
from the retain gates' 99th percentile, the strength by the most forget
refusals with retain utility kept.  It is a research prototype: the two
passes are plain PyTorch-hook calls, not an nnsight graph, and nothing is
saved as an artifact.  Its one-pass form, which reads only the steered
layer's input and those before it and steers the last layer alone (plus
the first answer tokens, ``EraserConfig.answer_steps``), is the
``mllmeraser_stacked_gate`` variant (``EraserConfig.gate_stack``): an
nnsight graph with a fast path, saved and loaded like every eraser, run by
``mllmeraser eval --method mllmeraser_stacked_gate`` and the demo; it
meets the method bar where this prototype does not.

Writes ``OUT/stacked_gate.json`` (choices, the strength selection, the full
evaluation, the method bar's checks).  Run:
``python -m analyses.stacked_gate [--quick] [--forget-ratio 5|10|15] [--out DIR]``.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from analyses._cli import script_parser
from eraser.argtypes import nonneg_int, out_dir, positive_int
from eraser.autotune import (DEFAULT_GRID, GAMMA_GRID, STACKED_NULL_SPACE_GRID, calibrated_margin, choose_window,
                             combined_gates, concept_calibration, gate_retain_items, measure, select_strength,
                             validation_split)
from eraser.backend import generate_fn
from eraser.evaluate import evaluate_benchmark, refusal_checks, results_table
from eraser.gate import fit_gates, window
from eraser.nullspace import null_space_projector
from eraser.pairs import forget_concepts, forget_queries, queries
from eraser.pipeline import eraser_checks, evaluate_model, fit_variant, load_setup
from eraser.steer import add_direction, prompt_mask
from interp import prefill_only
from interp.collect import query_activations
from interp.io import write_json

from .common import env_quick


def sites(n_layers: int) -> list[str]:
    """What the stacked gate reads: every decoder layer's input but the first, and the last layer's output."""
    return [f"blocks.{l}.hook_resid_pre" for l in range(1, n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


def stacked(cache_rows: dict[str, Tensor], names: Sequence[str]) -> Float[Tensor, "n features"]:
    return torch.cat([cache_rows[n].double() for n in names], dim=1)


def stacked_gate(H: Float[Tensor, "n f"], W: Float[Tensor, "f c"], factors: Float[Tensor, "1 c"]
                 ) -> Float[Tensor, " n"]:
    """Each row's gate: every person's gate calibrated, the largest taken (:func:`eraser.autotune.combined_gates`)."""
    return combined_gates((H.double() @ W)[None], factors)[0]


def fit_stacked_gate(H_f: Tensor, concepts_f: list[str], H_r: Tensor, V_f: Tensor, concepts_vf: list[str],
                     V_r: Tensor) -> dict[str, Any]:
    """Per-person ridge gates over the stacked features, for every (null space, gamma) of the grid; the one with
    the widest validation :func:`~eraser.autotune.calibrated_margin` wins, with its window
    (:func:`~eraser.autotune.choose_window`; None when the sets overlap, the linear gate is kept)."""
    people = sorted(set(concepts_f))
    Y = torch.tensor([[float(c == p) for p in people] for c in concepts_f], dtype=torch.float64)
    concept = torch.tensor([people.index(c) for c in concepts_vf])
    K = H_r.T @ H_r
    rows, best = [], None
    for ns, gamma in itertools.product(STACKED_NULL_SPACE_GRID, GAMMA_GRID):
        P, info = null_space_projector(K, **ns)
        W = fit_gates(H_f, Y, P, gamma)
        factors, ok = concept_calibration((V_f @ W)[None], concept)
        g_f, g_r = stacked_gate(V_f, W, factors), stacked_gate(V_r, W, factors)
        row = {"null_space": ns, "gamma": gamma, "rank": info.rank,
               "margin": calibrated_margin(g_f, g_r) if ok else 0.0}
        rows.append(row)
        if best is None or row["margin"] > best[0]["margin"]:
            best = (row, W, factors, g_f, g_r)
    row, W, factors, g_f, g_r = best
    win, why = choose_window(g_f, g_r)
    return {"choice": row, "W": W, "factors": factors, "window": win, "window_reason": why, "grid": rows}


def two_pass_generate(model, names: Sequence[str], gate: Callable[[Tensor], Tensor], layers: Sequence[int],
                      directions: Tensor, strength: float, batch_size: int = 64) -> Callable:
    """``(images, prompts, max_new_tokens) -> answers``: read the gate unsteered, then generate steered."""

    def generate(images, prompts, max_new_tokens: int = 50) -> list[str]:
        images = list(images) if images is not None else [None] * len(prompts)
        out: list[str] = []
        for s in range(0, len(prompts), batch_size):
            ims, ps = images[s:s + batch_size], list(prompts[s:s + batch_size])
            g = gate(stacked(query_activations(model, ims, ps, names, len(ps), read="mean"), names)).float()
            enc = model.encode(images=ims, prompts=ps)
            hooks = []
            for l, d in zip(layers, directions):
                def hook(x, ctx, d=d.float()):
                    return add_direction(x, strength * g.to(x.device, x.dtype), d.to(x.device), prompt_mask(x, ctx))
                hooks.append((f"blocks.{l}.hook_resid_pre", prefill_only(hook)))
            out += model.generate(enc, max_new_tokens=max_new_tokens, hooks=hooks).texts
        return out

    return generate


def run(quick: bool = False, forget_ratio: int = 5, seed: int = 0, grid: Sequence[float] = DEFAULT_GRID,
        batch_size: int = 64, tolerance: float = 0.02, progress: bool = True) -> dict[str, Any]:
    """Fit, choose every setting on validation, evaluate; every layer the eraser has is steered."""
    t0 = time.perf_counter()
    setup = load_setup("llava", seed, forget_ratio, quick, progress=progress, batch_size=batch_size)
    model, bench = setup.model, setup.bench
    names = sites(model.n_layers)
    eraser, _, _ = fit_variant(setup, "mllmeraser", auto=False)  # only its per-layer directions are used

    def acts(qs) -> Tensor:
        return stacked(query_activations(model, [q[0] for q in qs], [q[1] for q in qs], names, batch_size,
                                         read="mean"), names)

    val, kind = validation_split(bench, setup.source, seed=seed)
    fit = fit_stacked_gate(acts(forget_queries(bench)), forget_concepts(bench),
                           acts(queries(bench.retain + bench.celebrity)),
                           acts([(i.image, i.prompt) for i in val["forget"]]), [i.subject for i in val["forget"]],
                           acts([(i.image, i.prompt) for i in gate_retain_items(val)]))
    print(f"[stacked_gate] {len(names)} sites, {fit['W'].shape[0]} features: {fit['choice']}; {fit['window_reason']}",
          flush=True)

    def gate(H: Tensor) -> Tensor:
        g = stacked_gate(H, fit["W"], fit["factors"])
        return window(g, *fit["window"]) if fit["window"] is not None else g

    def steered(lam: float) -> Callable:
        return two_pass_generate(model, names, gate, eraser.layers, eraser.d, lam, batch_size)

    vanilla_val = {k: measure(generate_fn(model, batch_size), v) for k, v in val.items()}
    sel = select_strength(lambda lam: {k: measure(steered(lam), v) for k, v in val.items()}, vanilla_val, grid,
                          tolerance, kind, progress)
    if sel.strength is None:
        raise RuntimeError(f"stacked gate: {sel.reason}")

    vanilla, _, _ = evaluate_model(setup, with_probs=False)
    gen = steered(sel.strength)
    res = evaluate_benchmark(bench, gen, batch_size=batch_size, progress=progress)
    refusal = refusal_checks(bench, gen, batch_size=batch_size, progress=progress)
    checks = eraser_checks(vanilla, res)
    print(results_table({"vanilla": vanilla, "stacked_gate": res}))
    return {"config": {**setup.config(), "quick": quick, "sites": names, "validation": kind},
            "gate": {k: v for k, v in fit.items() if k not in ("W", "factors")}, "strength": sel.strength,
            "selection": sel.to_dict(),
            "methods": {"vanilla": vanilla, "stacked_gate": res}, "refusal": refusal, "checks": checks,
            "total_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = script_parser("stacked_gate", __doc__)
    ap.add_argument("--quick", action="store_true", default=env_quick(),
                    help="the quick model; on by default when MLLMERASER_QUICK=1")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="model and data seed")
    ap.add_argument("--forget-ratio", type=int, default=5, choices=[5, 10, 15], help="forget split, in %%")
    ap.add_argument("--out", type=out_dir, default=Path("runs") / "stacked_gate",
                    help="output folder (checked when parsed: not an existing file)")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = run(args.quick, args.forget_ratio, args.seed, progress=not args.no_progress)
    write_json(args.out / "stacked_gate.json", out)
    c = out["checks"]
    lines = [f"{k} {v['value']:.3f}{'' if v['pass'] else ' (miss)'}" for k, v in c.items() if isinstance(v, dict)]
    print(f"[stacked_gate] method bar {'met' if c['all_pass'] else 'missed'}: " + ", ".join(lines))
    print(f"[stacked_gate] wrote {args.out / 'stacked_gate.json'} in {out['total_s']:.0f}s")
    return out


if __name__ == "__main__":
    main()
