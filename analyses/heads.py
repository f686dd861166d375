"""Heads: which attention heads carry a person's identity to the answer, and what the eraser does to attention.

Part 1, per-head patching (clean -> corrupted), on the name question of
:mod:`analyses.patching` (same pairs, same teacher-forced prefix, same metric:
the logit difference between the two people's first differing name token).
Each head's output (``blocks.{l}.attn.hook_z``, one head) is patched alone from
the clean run into the corrupted one, at every position and at the answer
position only (:func:`interp.head_patching.patch_heads`).  Effects are
normalised over all pairs (clean = 1, corrupted = 0).  Then each head's query,
key and value alone (``attn.hook_q`` / ``hook_k`` / ``hook_v``, every position;
with grouped-query attention one key/value head serves several query heads):
whether a head matters for where it looks or for what it moves.  And each head
of the vision tower alone (``vision.blocks.{l}.attn.hook_z``, every patch), then
its query, key and value: which heads of the image encoder carry the identity
to the answer, and how.  Then the vision tower's edges
(:func:`interp.vision_edges.patch_each_vision_edge`): whether a vision head
matters because the projector reads what it wrote or through later blocks.

Part 2, attention to the image, vanilla vs steered.  For the forget and the
retain profiles' image questions (generation and cloze), the share of the
last prompt token's attention that lands on image tokens, per layer and head
(``attn.hook_pattern``), without and with the eraser's steering hooks.  The
steering adds to the residual stream at every prompt position, so a change
here says whether it works by moving what the answer reads from the image.

Part 3, who writes the refusal.  On the forget profiles' generation and cloze
questions, direct logit attribution (:func:`interp.attribution.logit_attribution`)
of ``logit(refusal's first token) - logit(answer's first token)`` at the last
prompt token, vanilla and steered: each head's and MLP's own share, and
``other``, what the steering hook wrote into the residual stream itself.  The
shares add up to the logit difference exactly, so the table says where the
steered model's refusal is written.  Then the steering's write itself given to
one reader at a time in the vanilla run (:func:`interp.hook_paths.hook_paths`:
straight into the logits, or into a later block's attention or MLP input), the
total effect of each path, non-linearities included.  For an eraser that also
steers the first answer tokens (``answer_steps``), the same at each of those
steps, with the steered answer so far teacher-forced: how much of the refusal's
next token comes from the answer token's own write and how much from the
prompt's, read back through attention.

Writes ``OUT/heads.json`` and ``OUT/heads_heatmap.png``.

Run: ``python -m analyses.heads [--quick] [--eraser PATH] [--limit N] [--pairs N]``.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from eraser.data.prompts import REFUSAL
from eraser.data.schema import Profile
from eraser.evaluate import build_items
from interp.attribution import attribution_names, logit_attribution
from interp.head_patching import component_heads, patch_heads
from interp.edges import EdgeScores
from interp.hook_paths import HookPaths, hook_paths_by_position
from interp.patching import logit_diff
from interp.vision_edges import PROJECTOR, patch_each_vision_edge

from .circuit import by_input
from .common import Context, base_parser, limited, load_context, out_dir, save_json
from .patching import (
    NAME_QUESTION, answer_tokens, n_batches, name_pairs, pair_batches, position_mask, steering_queries,
)


# -- part 1: which heads move the identity --------------------------------------------------------------------
def head_flow(ctx: Context, profiles: Sequence[Profile], n_pairs: int) -> dict[str, Any]:
    model = ctx.model
    specs = name_pairs(ctx.setup, profiles, n_pairs)
    parts = {"all": ("all", "z", "lm"), "answer": (None, "z", "lm"), "q": ("all", "q", "lm"),
             "k": ("all", "k", "lm"), "v": ("all", "v", "lm"), "vision": ("all", "z", "vision"),
             "vision_q": ("all", "q", "vision"), "vision_k": ("all", "k", "vision"), "vision_v": ("all", "v", "vision")}
    rows: dict[str, dict[str, list[float]]] = {part: {} for part in parts}
    bar = tqdm(total=len(parts) * n_batches(specs), desc="patching heads", disable=not ctx.progress, leave=False)
    for _, clean, corrupt, pos, metric in pair_batches(model, profiles, specs):
        for part, (positions, component, tower) in parts.items():
            if tower == "vision" and not corrupt.has_images:
                bar.update(1)
                continue
            with torch.no_grad():
                res = patch_heads(model, clean, corrupt, metric, positions=positions or position_mask(pos),
                                  max_rows=ctx.args.batch_size, component=component, tower=tower)
            for key, vals in res.rows.items():
                rows[part].setdefault(key, []).extend(vals)
            bar.update(1)
    bar.close()
    n_heads = model.head_counts["lm"][0]
    clean_m, corrupt_m = float(np.mean(rows["all"]["clean"])), float(np.mean(rows["all"]["corrupted"]))
    denom = clean_m - corrupt_m

    def grid(part: str) -> list[list[float]]:
        out = []
        _, component, tower = parts[part]
        for l in range(model.n_layers if tower == "lm" else model.n_vision_layers):
            row = []
            for h in range(component_heads(model, component, tower)):
                v = float(np.mean(rows[part][f"L{l}H{h}"]))
                row.append((v - corrupt_m) / denom if denom != 0 and math.isfinite(denom) else float("nan"))
            out.append(row)
        return out

    grids = {part: grid(part) for part in ("all", "answer")}
    inputs = {part: grid(part) for part in ("q", "k", "v")}
    vision = grid("vision") if rows["vision"] else []
    vision_inputs = {c: grid(f"vision_{c}") for c in "qkv"} if rows["vision"] else {}
    top = sorted(((abs(v), l, h, v) for l, r in enumerate(grids["answer"]) for h, v in enumerate(r)
                  if math.isfinite(v)), reverse=True)[:5]
    return {"question": NAME_QUESTION, "metric": "logit diff (clean − corrupted first differing name token)",
            "n_pairs": len(specs), "clean": clean_m, "corrupted": corrupt_m,
            "layers": list(range(model.n_layers)), "heads": list(range(n_heads)),
            "effects": grids, "top_answer": [{"layer": l, "head": h, "effect": v} for _, l, h, v in top],
            "inputs": inputs, "vision": vision, "vision_inputs": vision_inputs,
            "inputs_largest": {c: max((abs(v) for r in g for v in r if math.isfinite(v)), default=float("nan"))
                               for c, g in inputs.items()}}


def pool_scores(parts: Sequence[tuple[int, EdgeScores]]) -> EdgeScores:
    """Edge scores of several batches as one (row-weighted means)."""
    n = sum(k for k, _ in parts)
    first = parts[0][1]
    return EdgeScores(upstream=first.upstream, downstream=first.downstream,
                      patched=sum(k * p.patched for k, p in parts) / n, clean=sum(k * p.clean for k, p in parts) / n,
                      corrupted=sum(k * p.corrupted for k, p in parts) / n, meta=dict(first.meta))


def vision_flow(ctx: Context, profiles: Sequence[Profile], n_pairs: int) -> dict[str, Any]:
    """The vision tower's edges on the same pairs (:func:`interp.vision_edges.patch_each_vision_edge`): each
    writer's clean value given to one later reader alone, pooled over the pairs (clean 1, corrupted 0); then split
    per head (each vision head's query, key and value a reader).  Says whether a vision head matters because the
    projector reads what it wrote or because later vision blocks build on it, and through which input."""
    model = ctx.model
    specs = name_pairs(ctx.setup, profiles, n_pairs)
    parts: dict[bool, list[tuple[int, EdgeScores]]] = {False: [], True: []}
    for _, clean, corrupt, _, metric in tqdm(pair_batches(model, profiles, specs), total=n_batches(specs),
                                             desc="vision edges", disable=not ctx.progress, leave=False):
        if clean.has_images:
            for qkv in parts:
                parts[qkv].append((clean.batch_size, patch_each_vision_edge(
                    model, clean, corrupt, metric, max_rows=ctx.args.batch_size, qkv=qkv)))
    if not parts[False]:
        return {}
    pooled, split = pool_scores(parts[False]), pool_scores(parts[True])
    into = {u: pooled.value(u, PROJECTOR) for u in pooled.upstream}
    return {"n_pairs": len(specs), "n_edges": len(pooled.graph.edges()), "scores": pooled.to_dict(),
            "top": [{"writer": u, "reader": v, "effect": e} for u, v, e in pooled.ranked()[:8]],
            "into_projector": into, "split_edges": len(split.graph.edges()), "split_by_input": by_input(split),
            "split_top": [{"writer": u, "reader": v, "effect": e} for u, v, e in split.ranked()[:8]]}


# -- part 2: the eraser and attention to the image -------------------------------------------------------------
def image_attention(model, inputs, hooks) -> np.ndarray:
    """Per row, layer and head: the last prompt token's attention mass on image tokens, ``[batch, layer, head]``."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names=names, hooks=hooks, stop_early=True)
    return torch.stack([cache.attention_to(n, "image").cpu() for n in names], dim=1).numpy()


def attention_shift(ctx: Context, splits: dict[str, Sequence[Profile]]) -> dict[str, Any]:
    model, bs = ctx.model, ctx.args.batch_size
    out: dict[str, Any] = {}
    items = {k: [it for it in build_items(v, tasks=("generation", "cloze")) if it.image is not None]
             for k, v in splits.items()}
    if ctx.args.limit is not None:
        items = {k: v[: max(2, 4 * ctx.args.limit)] for k, v in items.items()}
    bar = tqdm(total=sum(math.ceil(len(v) / bs) for v in items.values()), desc="attention to the image",
               disable=not ctx.progress, leave=False)
    for split, its in items.items():
        if not its:
            raise ValueError(f"no image questions in the {split} split")
        vanilla, steered = [], []
        for s in range(0, len(its), bs):
            chunk = its[s:s + bs]
            inputs = model.encode([it.image for it in chunk], [it.prompt for it in chunk])
            vanilla.append(image_attention(model, inputs, []))
            steered.append(image_attention(model, inputs, ctx.hooks()))
            bar.update(1)
        v, st = np.concatenate(vanilla), np.concatenate(steered)  # [n, layer, head]
        out[split] = {"n_queries": len(its), "vanilla": v.mean(0).tolist(), "steered": st.mean(0).tolist(),
                      "vanilla_by_layer": v.mean((0, 2)).tolist(), "steered_by_layer": st.mean((0, 2)).tolist(),
                      "max_abs_change": float(np.abs(st - v).max())}
    bar.close()
    return out


# -- part 3: who writes the refusal ----------------------------------------------------------------------------
def refusal_writers(ctx: Context, forget: Sequence[Profile]) -> dict[str, Any]:
    model, tok, bs = ctx.model, ctx.model.tokenizer, ctx.args.batch_size
    items = steering_queries(forget, ctx.args.limit)
    refusal_id = answer_tokens(tok, REFUSAL)[0]
    answer_ids = [answer_tokens(tok, it.reference)[0] for it in items]
    by_mod: dict[bool, list[int]] = {}
    for i, it in enumerate(items):  # image and text-only rows in separate batches
        by_mod.setdefault(it.image is None, []).append(i)
    chunks = [idx[s:s + bs] for idx in by_mod.values() for s in range(0, len(idx), bs)]
    vals: dict[str, list[torch.Tensor]] = {"vanilla": [], "steered": []}
    labels: list[str] = []
    paths: list[tuple[int, HookPaths]] = []
    where: dict[str, list[tuple[int, HookPaths]]] = {p: [] for p in ("image", "text", "last")}
    for chunk in tqdm(chunks, desc="logit attribution", disable=not ctx.progress, leave=False):
        inputs = model.encode([items[i].image for i in chunk], [items[i].prompt for i in chunk])
        for key, hooks in (("vanilla", []), ("steered", ctx.hooks())):
            with torch.no_grad():
                _, cache = model.run_with_cache(inputs, names=attribution_names(model), hooks=hooks)
            att = logit_attribution(model, cache, good=refusal_id, bad=[answer_ids[i] for i in chunk])
            labels = att.labels
            vals[key].append(att.values)
        metric = logit_diff(refusal_id, torch.tensor([answer_ids[i] for i in chunk]))
        sets = ["all"] + [p for p in where if p != "image" or inputs.has_images]  # a text-only batch has no image
        by_pos = hook_paths_by_position(model, inputs, ctx.hooks(), metric, sets, max_rows=bs)
        paths.append((len(chunk), by_pos["all"]))
        for p in sets[1:]:  # the write at some positions only
            where[p].append((len(chunk), by_pos[p]))
    van, ste = torch.cat(vals["vanilla"], 1).mean(1), torch.cat(vals["steered"], 1).mean(1)
    change = ste - van
    order = torch.argsort(change.abs(), descending=True)[:8].tolist()
    return {"metric": "logit(refusal first token) − logit(answer first token) at the last prompt token",
            "refusal_token": tok.convert_ids_to_tokens(refusal_id), "n_queries": len(items), "labels": labels,
            "vanilla": van.tolist(), "steered": ste.tolist(),
            "total": {"vanilla": float(van.sum()), "steered": float(ste.sum())},
            "top_change": [{"component": labels[i], "vanilla": float(van[i]), "steered": float(ste[i]),
                            "change": float(change[i])} for i in order],
            "paths": pool_paths(paths),
            "paths_by_position": {p: pool_paths(parts) for p, parts in where.items() if parts}}


def answer_step_paths(ctx: Context, forget: Sequence[Profile]) -> dict[str, Any]:
    """Where the eraser's steering acts on the answer tokens it also steers (``answer_steps``; the prefill is
    :func:`refusal_writers`): at answer step ``t``, with the steered answer's first ``t`` tokens teacher-forced,
    ``logit(refusal token t) - logit(answer's first token)`` traced through each reader
    (:func:`interp.hook_paths.hook_paths_by_position` with ``answer_step=t``), and split into the write at the
    prompt (read through attention) and the write at the answer tokens.  Rows whose steered answer ends before
    step ``t`` are left out (counted)."""
    model, tok, bs = ctx.model, ctx.model.tokenizer, ctx.args.batch_size
    steps = int(getattr(ctx.eraser.config, "answer_steps", 0) or 0)
    refusal = answer_tokens(tok, REFUSAL)
    items = steering_queries(forget, ctx.args.limit)
    answer_ids = [answer_tokens(tok, it.reference)[0] for it in items]
    by_mod: dict[bool, list[int]] = {}
    for i, it in enumerate(items):
        by_mod.setdefault(it.image is None, []).append(i)
    chunks = [idx[s:s + bs] for idx in by_mod.values() for s in range(0, len(idx), bs)]
    out: dict[str, Any] = {}
    eos = tok.eos_token_id
    for t in range(1, min(steps, len(refusal) - 1) + 1):
        parts: dict[str, list[tuple[int, HookPaths]]] = {p: [] for p in ("all", "prompt", "answer")}
        dropped = 0
        for chunk in tqdm(chunks, desc=f"answer step {t}", disable=not ctx.progress, leave=False):
            enc = lambda rows: model.encode([items[i].image for i in rows],  # noqa: E731
                                            [items[i].prompt for i in rows])
            with torch.no_grad():
                gen = model.generate(enc(chunk), max_new_tokens=t, hooks=ctx.hooks())
            kept = [i for i, row in zip(chunk, gen.new_tokens.tolist()) if len(row) >= t and eos not in row[:t]]
            dropped += len(chunk) - len(kept)
            if not kept:
                continue
            metric = logit_diff(refusal[t], torch.tensor([answer_ids[i] for i in kept]))
            by_pos = hook_paths_by_position(model, enc(kept), ctx.hooks(), metric, list(parts), max_rows=bs,
                                            answer_step=t)
            for p in parts:
                parts[p].append((len(kept), by_pos[p]))
        if parts["all"]:
            out[str(t)] = {"metric": f"logit({tok.convert_ids_to_tokens(refusal[t])!r}) − logit(answer first token) "
                                     f"after the steered answer's first {t} token(s)",
                           "n_queries": sum(k for k, _ in parts["all"]), "left_out": dropped,
                           "paths": pool_paths(parts["all"]),
                           "by_position": {p: pool_paths(parts[p]) for p in ("prompt", "answer")}}
    return out


def _share(p: dict[str, Any]) -> float:
    """``all_readers`` normalised: how much of the hook's whole effect the (partial) write gives."""
    gap = p["hooked"] - p["plain"]
    return (p["all_readers"] - p["plain"]) / gap if gap else float("nan")


def pool_paths(parts: Sequence[tuple[int, HookPaths]]) -> dict[str, Any]:
    """Hook paths of several batches, as one (row-weighted means; the effect normalised on the pooled runs)."""
    n = sum(k for k, _ in parts)

    def mean(get) -> Any:
        return sum(k * np.asarray(get(p), dtype=float) for k, p in parts) / n

    plain, hooked = float(mean(lambda p: p.plain)), float(mean(lambda p: p.hooked))
    pooled = HookPaths(readers=parts[0][1].readers, patched=mean(lambda p: p.patched), plain=plain, hooked=hooked,
                       all_readers=float(mean(lambda p: p.all_readers)), meta=dict(parts[0][1].meta))
    return {**pooled.to_dict(), "effects": pooled.effects.tolist(), "by_kind": pooled.by_kind()}


def run(ctx: Context, n_pairs: int) -> dict[str, Any]:
    bench, limit = ctx.setup.bench, ctx.args.limit
    forget = limited(bench.forget, limit)
    retain = limited(bench.retain, None if limit is None else max(limit, 2))
    t0 = time.perf_counter()
    flow = head_flow(ctx, forget + retain, n_pairs)
    flow["vision_edges"] = vision_flow(ctx, forget + retain, n_pairs)
    t1 = time.perf_counter()
    shift = attention_shift(ctx, {"forget": forget, "retain": retain})
    t2 = time.perf_counter()
    writers = refusal_writers(ctx, forget)
    writers["answer_steps"] = answer_step_paths(ctx, forget)
    return {"config": ctx.config(), "flow": flow, "attention": shift, "writers": writers,
            "steered_layers": list(ctx.eraser.layers),
            "timing": {"flow_s": t1 - t0, "attention_s": t2 - t1, "writers_s": time.perf_counter() - t2}}


def print_summary(res: dict[str, Any]) -> None:
    f, a = res["flow"], res["attention"]

    def fmt(vals: Sequence[float]) -> str:
        return " ".join("   --" if v is None or not math.isfinite(v) else f"{v:5.2f}" for v in vals)

    print(f"\nPer-head patching over {f['n_pairs']} profile pairs: logit diff clean {f['clean']:.2f}, corrupted "
          f"{f['corrupted']:.2f} (normalised effects, 1 = clean restored; columns: heads)")
    for part in ("all", "answer"):
        for l, vals in enumerate(f["effects"][part]):
            print(f"  {part + ' positions':<17} layer {l}: {fmt(vals)}")
    print("  strongest at the answer position: "
          + ", ".join(f"L{t['layer']}H{t['head']} {t['effect']:.2f}" for t in f["top_answer"]))
    if f.get("inputs"):
        print("  each head's query / key / value patched alone (every position; columns: query heads, key/value heads):")
        for c, label in (("q", "query"), ("k", "key"), ("v", "value")):
            for l, vals in enumerate(f["inputs"][c]):
                print(f"  {label:<17} layer {l}: {fmt(vals)}")
        print("  largest |effect| of one head's query / key / value: "
              + " / ".join(f"{f['inputs_largest'][c]:.2f}" for c in ("q", "k", "v")))
    if f.get("vision"):
        print("  each vision-tower head's output patched alone (every patch):")
        for l, vals in enumerate(f["vision"]):
            print(f"  {'vision':<17} layer {l}: {fmt(vals)}")
    if f.get("vision_edges"):
        v = f["vision_edges"]
        print(f"  vision-tower edges ({v['n_edges']}), each alone (1 = clean restored): "
              + ", ".join(f"{t['writer']}->{t['reader']} {t['effect']:.2f}" for t in v["top"][:6]))
        print("  straight into the projector: " + ", ".join(f"{u} {e:.2f}" for u, e in v["into_projector"].items()))
        k = v["split_by_input"]
        print(f"  split per head ({v['split_edges']} edges), the summed effect into vision queries / keys / values: "
              f"{k.get('q', 0):.2f} / {k.get('k', 0):.2f} / {k.get('v', 0):.2f}; largest: "
              + ", ".join(f"{t['writer']}->{t['reader']} {t['effect']:.2f}" for t in v["split_top"][:4]))
    if f.get("vision_inputs"):
        print("  each vision-tower head's query / key / value patched alone (every patch):")
        for c, label in (("q", "vision query"), ("k", "vision key"), ("v", "vision value")):
            for l, vals in enumerate(f["vision_inputs"][c]):
                print(f"  {label:<17} layer {l}: {fmt(vals)}")
    print(f"Last token's attention on image tokens (mean over heads), vanilla -> steered; steered layers "
          f"{res['steered_layers']}")
    for split, d in a.items():
        pairs = " ".join(f"{v:.2f}->{s:.2f}" for v, s in zip(d["vanilla_by_layer"], d["steered_by_layer"]))
        print(f"  {split:<7} ({d['n_queries']} queries) by layer: {pairs}; largest change of one head "
              f"{d['max_abs_change']:.3f}")
    w = res["writers"]
    print(f"Refusal − answer logit on {w['n_queries']} forget queries, vanilla {w['total']['vanilla']:.2f} -> steered "
          f"{w['total']['steered']:.2f}; largest changes of one component's direct share:")
    print("  " + ", ".join(f"{t['component']} {t['vanilla']:+.2f}->{t['steered']:+.2f}" for t in w["top_change"]))
    if w.get("paths"):
        p = w["paths"]
        print(f"The steering's write given to one reader alone (plain {p['plain']:.2f}, steered {p['hooked']:.2f}, every "
              f"reader at once {p['all_readers']:.2f}; 1 = the whole effect): "
              + ", ".join(f"{r} {e:.2f}" for r, e in zip(p["readers"], p["effects"])))
    if w.get("paths_by_position"):
        print("  the write at some positions only, through every reader (1 = the whole effect on those questions): "
              + ", ".join(f"{k} {_share(q):.2f}" for k, q in w["paths_by_position"].items()))
    for t, d in w.get("answer_steps", {}).items():
        p = d["paths"]
        print(f"Answer step {t} ({d['metric']}; {d['n_queries']} queries, {d['left_out']} left out): plain "
              f"{p['plain']:.2f}, steered {p['hooked']:.2f}; through one reader alone: "
              + ", ".join(f"{r} {e:.2f}" for r, e in zip(p["readers"], p["effects"]))
              + "; the write at the prompt only " + f"{_share(d['by_position']['prompt']):.2f}"
              + ", at the answer tokens only " + f"{_share(d['by_position']['answer']):.2f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = base_parser("heads", __doc__)
    ap.add_argument("--pairs", type=int, default=8, help="profile pairs averaged in the per-head patching")
    args = ap.parse_args(argv)
    if args.pairs < 1:
        ap.error(f"--pairs must be >= 1, got {args.pairs}")
    ctx = load_context(args)
    out = out_dir(args)
    n_pairs = args.pairs if args.limit is None else min(args.pairs, max(args.limit, 1))
    res = save_json(out / "heads.json", run(ctx, n_pairs))
    from eraser.plots import plot_heads_heatmap

    png = plot_heads_heatmap(res, out / "heads_heatmap.png")
    print_summary(res)
    print(f"  wrote {out / 'heads.json'} and {png}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
