"""Patching: where does the image's identity flow through the model, and which layers' steering does the forgetting?

Part 1, information flow (clean -> corrupted).  Same prompt, two profiles'
images: "What is the name of the person in the image?"  Both answers begin
"The name of this person is ..."; the common prefix is teacher-forced and
the metric is the logit difference, at the position that predicts the first
token where the two answers differ (the first name, usually), between the
clean profile's token and the corrupted profile's token.  Each site is
patched alone from the clean run (image A) into the corrupted run (image B):
every vision block's output and the projector output (all patches), every LM
block's residual stream input (``hook_resid_pre``) at the image positions,
and at the answer position.  Effects are normalised (clean = 1,
corrupted = 0) after averaging the metric over several profile pairs.

Part 2, steering (steered -> vanilla).  On the forget profiles' generation
and cloze questions, the metric is ``log p(refusal's first token) - log
p(answer's first token)`` at the last prompt token.  With
:func:`interp.patching.patch_hooks`, each layer's steered residual stream
(which carries the steering of that layer and every earlier one) is patched
alone into the vanilla run, at all positions and at the last token only;
and each steered layer's hook is applied alone ("hook alone").  Effects are
normalised (steered = 1, vanilla = 0).

Writes ``OUT/patching.json`` and ``OUT/patching_heatmap.png``.

Run: ``python -m analyses.patching [--quick] [--eraser PATH] [--limit N] [--pairs N]``.
"""
from __future__ import annotations

import math
import random
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from eraser.argtypes import positive_int
from eraser.data.prompts import REFUSAL, generation_prompt
from eraser.data.schema import GenerationQ, Profile
from eraser.evaluate import build_items
from eraser.pipeline import Setup
from interp.patching import logit_diff, patch_hooks, patch_sites

from .common import Context, base_parser, limited, load_context, out_dir, save_json

NAME_QUESTION = "What is the name of the person in the image?"


# -- part 1: information flow ---------------------------------------------------------------------------------
def name_question(p: Profile) -> GenerationQ:
    for q in p.generation:
        if q.modality == "vqa" and q.question == NAME_QUESTION:
            return q
    raise ValueError(f"profile {p.id} has no VQA name question ({NAME_QUESTION!r})")


def answer_tokens(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer exactly as :meth:`HookedVLM.encode` appends it (leading space, no specials)."""
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"]


def make_pairs(profiles: Sequence[Profile], n_pairs: int, seed: int) -> list[tuple[Profile, Profile]]:
    """``n_pairs`` (clean, corrupted) pairs of distinct profiles, seeded; disjoint pairs first, then more if asked."""
    if len(profiles) < 2:
        raise ValueError("patching needs at least two profiles")
    order = list(profiles)
    random.Random(f"patching:{seed}").shuffle(order)
    pairs = [(order[i], order[i + 1]) for i in range(0, len(order) - 1, 2)]
    k = 0
    while len(pairs) < n_pairs and k < len(order) * len(order):  # more pairs than disjoint ones: cycle on
        a, b = order[k % len(order)], order[(k + 1 + k // len(order)) % len(order)]
        if a.id != b.id and (a.id, b.id) not in {(x.id, y.id) for x, y in pairs}:
            pairs.append((a, b))
        k += 1
    return pairs[:n_pairs]


def pair_spec(tokenizer, a: Profile, b: Profile) -> dict[str, Any] | None:
    """Prompt, teacher-forced prefix and the two competing token ids of a pair (None if the answers never differ)."""
    qa, qb = name_question(a), name_question(b)
    ta, tb = answer_tokens(tokenizer, qa.ground_truth), answer_tokens(tokenizer, qb.ground_truth)
    k = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
    if k is None:
        return None
    prefix = tokenizer.decode(ta[:k]).strip() if k else ""
    if k and answer_tokens(tokenizer, prefix) != ta[:k]:
        raise ValueError(f"cannot rebuild the answer prefix of {a.id} from its text ({prefix!r})")
    return {"clean": a.id, "corrupted": b.id, "prompt": generation_prompt(qa), "prefix": prefix, "n_prefix": k,
            "clean_token": tokenizer.convert_ids_to_tokens(ta[k]),
            "corrupted_token": tokenizer.convert_ids_to_tokens(tb[k]),
            "clean_id": ta[k], "corrupted_id": tb[k]}


def answer_position(n_prefix: int):
    """Index of the position predicting the first differing token: last prompt token + prefix length."""
    def pos(inputs) -> torch.Tensor:
        return inputs.last_index + n_prefix
    return pos


def logit_diff_at(pos_fn, good: list[int], bad: list[int]):
    """Metric: ``logit[good] - logit[bad]`` at ``pos_fn(inputs)`` per row."""
    def metric(logits: torch.Tensor, inputs) -> torch.Tensor:
        b = logits.shape[0]
        rows = torch.arange(b, device=logits.device)
        at = logits[rows, pos_fn(inputs).to(logits.device)].float()
        g = torch.as_tensor(good, device=logits.device).repeat(b // len(good))
        w = torch.as_tensor(bad, device=logits.device).repeat(b // len(bad))
        return at[rows, g] - at[rows, w]
    return metric


def position_mask(pos_fn):
    def answer_pos(inputs) -> torch.Tensor:
        b, p = inputs.input_ids.shape
        m = torch.zeros((b, p), dtype=torch.bool, device=inputs.input_ids.device)
        m[torch.arange(b, device=m.device), pos_fn(inputs).to(m.device)] = True
        return m
    return answer_pos


def name_pairs(setup: Setup, profiles: Sequence[Profile], n_pairs: int) -> list[dict[str, Any]]:
    """The pair specs (:func:`pair_spec`) of ``n_pairs`` pairs of ``profiles``, seeded by the setup's seed, whose
    name answers differ under the setup's tokenizer."""
    specs = [s for s in (pair_spec(setup.model.tokenizer, a, b) for a, b in make_pairs(profiles, n_pairs, setup.seed))
             if s]
    if not specs:
        raise ValueError("no profile pair has answers that differ")
    return specs


def pair_batches(model, profiles: Sequence[Profile], specs: Sequence[dict[str, Any]]) -> Iterator[tuple]:
    """One ``(group, clean, corrupted, answer_pos, metric)`` per batch of pairs sharing prompt and prefix: such
    pairs line up position by position.  ``metric`` is the clean-minus-corrupted name-token logit difference at
    the answer position (:func:`logit_diff_at`); ``answer_pos`` a function of the inputs giving that position."""
    images = {p.id: p.image for p in profiles}
    groups: dict[tuple[str, str], list[dict]] = {}
    for s in specs:
        groups.setdefault((s["prompt"], s["prefix"]), []).append(s)
    for (prompt, prefix), group in groups.items():
        n = len(group)
        answers = [prefix] * n if prefix else None
        clean = model.encode([images[s["clean"]] for s in group], [prompt] * n, answers=answers)
        corrupt = model.encode([images[s["corrupted"]] for s in group], [prompt] * n, answers=answers)
        pos = answer_position(group[0]["n_prefix"])
        metric = logit_diff_at(pos, [s["clean_id"] for s in group], [s["corrupted_id"] for s in group])
        yield group, clean, corrupt, pos, metric


def n_batches(specs: Sequence[dict[str, Any]]) -> int:
    return len({(s["prompt"], s["prefix"]) for s in specs})


def information_flow(ctx: Context, profiles: Sequence[Profile], n_pairs: int) -> dict[str, Any]:
    model = ctx.model
    specs = name_pairs(ctx.setup, profiles, n_pairs)
    vision = [f"vision.blocks.{l}.hook_resid_post" for l in range(model.n_vision_layers)] + ["projector.hook_out"]
    lm = [f"blocks.{l}.hook_resid_pre" for l in range(model.n_layers)]
    rows: dict[str, dict[str, list[float]]] = {"vision": {}, "lm_image": {}, "lm_answer": {}}
    parts = [("vision", vision, "all"), ("lm_image", lm, "image"), ("lm_answer", lm, "answer")]
    bar = tqdm(total=n_batches(specs) * len(parts), desc="patching (image flow)", disable=not ctx.progress,
               leave=False)
    for _, clean, corrupt, pos, metric in pair_batches(model, profiles, specs):
        for part, names, positions in parts:
            with torch.no_grad():
                res = patch_sites(model, clean, corrupt, names, metric,
                                  positions=position_mask(pos) if positions == "answer" else positions,
                                  max_rows=ctx.args.batch_size)
            for key, vals in res.rows.items():
                rows[part].setdefault(key, []).extend(vals)
            bar.update(1)
    bar.close()
    clean_m = float(np.mean(rows["vision"]["clean"]))
    corrupt_m = float(np.mean(rows["vision"]["corrupted"]))
    denom = clean_m - corrupt_m

    def effect(part: str, name: str) -> float:
        v = float(np.mean(rows[part][name]))
        return (v - corrupt_m) / denom if denom != 0 and math.isfinite(denom) else float("nan")

    vision_grid = {"rows": ["image patches"], "cols": [str(l) for l in range(model.n_vision_layers)] + ["proj"],
                   "sites": vision, "values": [[effect("vision", n) for n in vision]]}
    lm_grid = {"rows": ["image positions", "answer position"], "cols": list(range(model.n_layers)), "sites": lm,
               "values": [[effect("lm_image", n) for n in lm], [effect("lm_answer", n) for n in lm]]}
    return {
        "question": NAME_QUESTION,
        "metric": "logit diff (clean − corrupted first differing name token)",
        "n_pairs": len(specs),
        "pairs": [{k: v for k, v in s.items() if k not in ("clean_id", "corrupted_id")} for s in specs],
        "clean": clean_m, "corrupted": corrupt_m,
        "clean_rows": rows["vision"]["clean"], "corrupted_rows": rows["vision"]["corrupted"],
        "vision_grid": vision_grid, "lm_grid": lm_grid,
        "patched": {part: {n: float(np.mean(v)) for n, v in r.items() if n not in ("clean", "corrupted")}
                    for part, r in rows.items()},
    }


# -- part 2: which layers' steering forgets ------------------------------------------------------------------
def steering_queries(profiles: Sequence[Profile], limit: int | None) -> list:
    items = [it for it in build_items(profiles, tasks=("generation", "cloze"))]
    return items if limit is None else items[: max(2, 4 * limit)]


def steering_layers(ctx: Context, forget: Sequence[Profile]) -> dict[str, Any]:
    model, tok, eraser = ctx.model, ctx.model.tokenizer, ctx.eraser
    items = steering_queries(forget, ctx.args.limit)
    refusal_id = answer_tokens(tok, REFUSAL)[0]
    answer_ids = [answer_tokens(tok, it.reference)[0] for it in items]
    names = [f"blocks.{l}.hook_resid_pre" for l in range(model.n_layers)]
    by_mod: dict[bool, list[int]] = {}
    for i, it in enumerate(items):  # image and text-only rows in separate batches
        by_mod.setdefault(it.image is None, []).append(i)
    rows: dict[str, dict[str, list[float]]] = {"all": {}, "last": {}}
    alone: dict[int, list[float]] = {l: [] for l in eraser.layers}
    bs = ctx.args.batch_size
    chunks = [idx[s:s + bs] for idx in by_mod.values() for s in range(0, len(idx), bs)]
    bar = tqdm(total=len(chunks) * (2 + len(eraser.layers)), desc="patching (steering)", disable=not ctx.progress,
               leave=False)
    for chunk in chunks:
        inputs = model.encode([items[i].image for i in chunk], [items[i].prompt for i in chunk])
        metric = logit_diff([refusal_id] * len(chunk), [answer_ids[i] for i in chunk])
        for positions in ("all", "last"):
            with torch.no_grad():
                res = patch_hooks(model, inputs, ctx.hooks(), names, metric, positions=positions, max_rows=bs)
            for key, vals in res.rows.items():
                rows[positions].setdefault(key, []).extend(vals)
            bar.update(1)
        for l in eraser.layers:
            with torch.no_grad():
                logits = model.run_with_hooks(inputs, eraser.hooks({l: ctx.strength}))
            alone[l].extend(float(v) for v in metric(logits, inputs))
            bar.update(1)
    bar.close()
    steered = float(np.mean(rows["all"]["clean"]))
    vanilla = float(np.mean(rows["all"]["corrupted"]))
    denom = steered - vanilla

    def norm(v: float) -> float:
        return (v - vanilla) / denom if denom != 0 and math.isfinite(denom) else float("nan")

    grid_rows = [
        [norm(float(np.mean(rows["all"][n]))) for n in names],
        [norm(float(np.mean(rows["last"][n]))) for n in names],
        [norm(float(np.mean(alone[l]))) if l in alone else float("nan") for l in range(model.n_layers)],
    ]
    return {
        "metric": "log p(refusal first token) − log p(answer first token) at the last prompt token",
        "refusal_token": tok.convert_ids_to_tokens(refusal_id),
        "n_queries": len(items), "strength": ctx.strength, "steered_layers": list(eraser.layers),
        "steered": steered, "vanilla": vanilla,
        "grid": {"rows": ["resid (all positions)", "resid (last token)", "hook alone"],
                 "cols": list(range(model.n_layers)), "values": grid_rows,
                 "notes": "rows 1-2: steered blocks.{l}.hook_resid_pre (steering of layers <= l) patched into the "
                          "vanilla run; row 3: only layer l's steering hook applied"},
        "patched": {pos: {n: float(np.mean(v)) for n, v in r.items() if n not in ("clean", "corrupted")}
                    for pos, r in rows.items()},
        "alone": {str(l): float(np.mean(v)) for l, v in alone.items()},
    }


def run(ctx: Context, n_pairs: int) -> dict[str, Any]:
    bench, limit = ctx.setup.bench, ctx.args.limit
    forget = limited(bench.forget, limit)
    profiles = forget + limited(bench.retain, None if limit is None else max(limit, 2))
    t0 = time.perf_counter()
    flow = information_flow(ctx, profiles, n_pairs)
    t1 = time.perf_counter()
    steering = steering_layers(ctx, forget)
    return {"config": ctx.config(), "flow": flow, "steering": steering,
            "timing": {"flow_s": t1 - t0, "steering_s": time.perf_counter() - t1}}


def print_summary(res: dict[str, Any]) -> None:
    f, s = res["flow"], res["steering"]

    def fmt(vals: list) -> str:
        return " ".join("   --" if v is None or not math.isfinite(v) else f"{v:5.2f}" for v in vals)

    print(f"\nImage patching over {f['n_pairs']} profile pairs: logit diff clean {f['clean']:.2f}, "
          f"corrupted {f['corrupted']:.2f} (normalised effects, 1 = clean restored)")
    print(f"  vision blocks + projector [{' '.join(f['vision_grid']['cols'])}]: {fmt(f['vision_grid']['values'][0])}")
    for name, vals in zip(f["lm_grid"]["rows"], f["lm_grid"]["values"]):
        print(f"  LM {name:<17} by layer: {fmt(vals)}")
    print(f"Steering patching on {s['n_queries']} forget queries (λ={s['strength']:g}): refusal − answer log-prob "
          f"vanilla {s['vanilla']:.2f}, steered {s['steered']:.2f} (1 = steered behaviour)")
    for name, vals in zip(s["grid"]["rows"], s["grid"]["values"]):
        print(f"  {name:<22} by layer: {fmt(vals)}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = base_parser("patching", __doc__)
    ap.add_argument("--pairs", type=positive_int, default=8, help="profile pairs averaged in the image patching")
    args = ap.parse_args(argv)
    ctx = load_context(args)
    out = out_dir(args)
    n_pairs = args.pairs if args.limit is None else min(args.pairs, max(args.limit, 1))
    res = run(ctx, n_pairs)
    res = save_json(out / "patching.json", res)
    from eraser.plots import plot_patching_heatmap

    png = plot_patching_heatmap(res, out / "patching_heatmap.png")
    print_summary(res)
    print(f"  wrote {out / 'patching.json'} and {png}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
