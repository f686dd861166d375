"""Answer shift: does the steering hold through the answer, or only where the eraser pushes?

The eraser steers the prompt (the prefill) and, with ``answer_steps`` k > 0, the first k generated tokens; the
answer's later tokens are not steered.  Reviewers asked for the activation shift measured, not only pictured
(METHOD.md).  This script records every generation step (:meth:`interp.HookedVLM.generate_with_cache`, the
values after the eraser's hooks, as deployed) and reads, at each steered layer's site, the residual stream's
scalar projection on the unit erasure direction (the one the prompt is pushed along) and, for an eraser with
answer steps, on the unit answer direction (read one token into the answer: the one the answer steps push
along; :class:`eraser.direction.ErasureDirection`'s ``vectors`` and ``answer``) at:

* ``t = 0``: the last prompt token, which produces the first answer token;
* ``t = 1 .. max_new_tokens - 1``: the answer tokens fed back (``t`` is also the decode step that reads it),
  up to each row's EOS.

Per split (forget and retain generation questions, with their images and text-only) and model (vanilla,
steered): the mean projection per ``t`` (rows that have ended drop out; ``n`` says how many are left), and the
steered-minus-vanilla shift.  A shift that stays after ``t = k`` means the refusal, once begun, keeps the state
there by itself (through the prompt's steered keys and values and the refusal tokens so far); one that falls
back means the steering holds only where it acts.  Generated answers are scored for refusal
(:func:`eraser.metrics.is_refusal`) beside it, since the two models answer with different tokens.

Writes ``OUT/answer_shift.json`` and ``OUT/answer_shift.png``.  The eraser comes from ``--eraser PATH`` or is
fitted (``--variant``), as in every analysis (``analyses/common.py``).

Run: ``python -m analyses.answer_shift [--quick] [--max-new-tokens 12] [--limit N]``.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Sequence

import torch

from eraser.argtypes import positive_int
from eraser.direction import unit_rows
from eraser.evaluate import build_items
from eraser.metrics import is_refusal
from eraser.plots import plot_answer_shift

from .common import Context, base_parser, limited, load_context, rate, write_outputs

QUESTION = ("Does the steering hold through the answer? The residual stream's projection on the erasure direction "
            "at each answer token, vanilla vs steered, on forget and retain questions.")


def generation_queries(profiles: Sequence[Any]) -> list[tuple[Any, str]]:
    """The generation questions of ``profiles`` (image + text, and text-only), as evaluated."""
    return [(it.image, it.prompt) for it in build_items(profiles, tasks=("generation",))]


def directions(ctx: Context) -> dict[str, dict[int, Any]]:
    """The unit vectors to project on, per steered layer: the erasure direction, and the answer direction (read
    one token into the answer, the one the answer steps push along) when the eraser has one."""
    d = ctx.eraser.direction
    out = {"erasure": dict(zip(d.layers, unit_rows(d.vectors).float()))}
    if d.answer is not None:
        out["answer"] = dict(zip(d.layers, unit_rows(d.answer).float()))
    return out


def projections(ctx: Context, queries: Sequence[tuple[Any, str]], max_new_tokens: int, steered: bool
                ) -> tuple[dict[str, dict[int, list[list[float]]]], list[str]]:
    """Per direction (:func:`directions`) and steered layer, per row, the projection at ``t = 0 ..`` (the last
    prompt token, then the answer tokens fed back up to EOS); and the generated texts."""
    model, units = ctx.model, directions(ctx)
    names = {l: ctx.eraser.direction.hook_name(l) for l in ctx.eraser.direction.layers}
    out: dict[str, dict[int, list[list[float]]]] = {k: {l: [] for l in names} for k in units}
    texts: list[str] = []
    bs = ctx.setup.batch_size
    for start in range(0, len(queries), bs):
        chunk = queries[start:start + bs]
        inputs = model.encode(images=[q[0] for q in chunk], prompts=[q[1] for q in chunk])
        with ctx.steered() if steered else contextlib.nullcontext():
            gen, cache = model.generate_with_cache(inputs, list(names.values()), max_new_tokens=max_new_tokens)
        texts += gen.texts
        for layer, name in names.items():
            last, answer = cache.last(name).float(), cache.answer(name)  # [batch, d]; per row [n_fed, d]
            for key, unit in units.items():
                for b in range(len(chunk)):
                    row = torch.cat([last[b:b + 1], answer[b].float()]) @ unit[layer]
                    out[key][layer].append(row.tolist())
    return out, texts


def per_position(rows: list[list[float]], length: int) -> tuple[list[float | None], list[int]]:
    """Mean over the rows that reach each ``t`` (None where none does), and how many do."""
    means, counts = [], []
    for t in range(length):
        vals = [r[t] for r in rows if len(r) > t]
        means.append(sum(vals) / len(vals) if vals else None)
        counts.append(len(vals))
    return means, counts


def run(ctx: Context, max_new_tokens: int = 12) -> dict[str, Any]:
    if max_new_tokens < 2:
        raise ValueError("max_new_tokens must be >= 2: one answer token fed back at least")
    bench, limit = ctx.setup.bench, ctx.args.limit
    splits = {"forget": limited(bench.forget, limit), "retain": limited(bench.retain, limit)}
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for split, profiles in splits.items():
        queries = generation_queries(profiles)
        if not queries:
            raise ValueError(f"the {split} split has no generation questions to generate answers for")
        entry: dict[str, Any] = {"n_queries": len(queries)}
        means: dict[str, dict[str, dict[str, list]]] = {}
        for model_name, steered in (("vanilla", False), ("steered", True)):
            proj, texts = projections(ctx, queries, max_new_tokens, steered)
            means[model_name] = {key: {str(l): dict(zip(("mean", "n"), per_position(rows, max_new_tokens)))
                                       for l, rows in per_layer.items()} for key, per_layer in proj.items()}
            entry[model_name] = {"refusal_rate": rate([is_refusal(t) for t in texts]), "examples": texts[:3],
                                 "directions": means[model_name]}
        # the shift where both models have the position (means over the rows each has there)
        entry["shift"] = {
            key: {l: [None if a is None or b is None else b - a
                      for a, b in zip(per_layer[l]["mean"], means["steered"][key][l]["mean"])]
                  for l in per_layer}
            for key, per_layer in means["vanilla"].items()}
        results[split] = entry
    direction = ctx.eraser.direction
    return {
        "question": QUESTION,
        "config": {**ctx.config(), "max_new_tokens": max_new_tokens,
                   "steered_steps": ctx.eraser.config.answer_steps,
                   "every_step": ctx.eraser.config.every_step,
                   "direction_norm": {str(l): float(n) for l, n in zip(direction.layers, direction.norms())},
                   "directions": list(directions(ctx))},
        "splits": results,
        "timing": {"total_s": time.perf_counter() - t0},
    }


def print_summary(res: dict[str, Any]) -> None:
    print(f"\n{res['question']}")
    c = res["config"]
    k = c["steered_steps"]
    print(f"  layers {c['eraser']['layers']}, strength {c['eraser']['strength']:g}; the eraser steers the prompt"
          + (f" and answer steps 1..{k}" if k else "") + (" and every step" if c["every_step"] else "")
          + "; t = 0 is the last prompt token")
    fmt = lambda v: "   n/a" if v is None else f"{v:6.2f}"  # noqa: E731
    for split, entry in res["splits"].items():
        print(f"  {split} ({entry['n_queries']} questions): refused vanilla {fmt(entry['vanilla']['refusal_rate'])}, "
              f"steered {fmt(entry['steered']['refusal_rate'])}")
        for key, per_layer in entry["shift"].items():
            for layer, shift in per_layer.items():
                print(f"    {key} direction, layer {layer}, shift by t: " + " ".join(fmt(v) for v in shift))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = base_parser("answer_shift", __doc__)
    ap.add_argument("--max-new-tokens", type=positive_int, default=12,
                    help="answer tokens generated (t runs over the last prompt token and the first N-1 of them)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 2:
        ap.error("--max-new-tokens must be >= 2 (one answer token fed back at least)")
    ctx = load_context(args)
    return write_outputs(args, "answer_shift", run(ctx, args.max_new_tokens), print_summary, plot_answer_shift, "answer_shift.png")


if __name__ == "__main__":
    main(sys.argv[1:])
