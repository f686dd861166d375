"""The name question's circuit on the embedded model: which edges carry who is in the picture to the name?

Why: site and head patching (``analyses/patching.py``, ``analyses/heads.py``) say which components matter, not
through which path; a test-time eraser steers the residual stream, and where that bites depends on the paths
the recall takes.  This script finds them at the level of edges (:mod:`interp.edges`: every writer - the image
and text embeddings, each head, each MLP - into every later reader - each block's attention and MLP input and
the logits), and checks whether edge attribution finds the same ones, since at 7B sizes (~35k edges) edge
patching is out of reach and attribution is how a study starts.

Part 1, edges.  The same pairs, teacher-forced prefix and metric as ``analyses.patching`` (the logit
difference between the two people's first differing name token; clean = the person's own portrait, corrupted =
the other's): every edge patched alone (:func:`~interp.edge_patching.patch_each_edge`, one forward pass per
edge), against EAP (first order) and EAP-IG (``--steps``) (:func:`~interp.edge_attribution.attribution_edges`).
Effects are pooled over all pairs (clean = 1, corrupted = 0); reported: Pearson r with patching, the largest
difference, whether the top edge agrees, the wall time of each.

Part 2, circuits.  For each ranking (patched, first order, integrated, and a seeded random order as the floor),
circuits of k edges, for k in a ladder up to every edge, built two ways: the top k edges
(:meth:`~interp.edges.EdgeScores.top`), and k edges grown backwards from the logits, best first
(:func:`~interp.edges.greedy_circuit`: every edge on a path to the output).  Each is scored by its faithfulness:
the clean run with every other edge given the corrupted run's value, normalised
(:func:`~interp.edge_patching.circuit_faithfulness`, pooled over pairs); and the fewest edges of each that keep
80 % of the logit difference.

``--qkv`` runs both parts on the graph split per head (each head's query, key and value a reader of its own;
532 edges for the quick LLaVA model instead of 114) and adds how the effect into the heads divides between
what they look for (query), what they are found by (key) and what they move (value).

Writes ``OUT/circuit.json`` and ``OUT/circuit.png``.

Run: ``python -m analyses.circuit [--quick] [--limit N] [--pairs N] [--steps K] [--qkv]``.
"""
from __future__ import annotations

import random
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from eraser.argtypes import positive_int
from eraser.data.schema import Profile
from interp.edge_attribution import attribution_edges
from interp.edge_patching import complement, patch_each_edge, patch_edge_sets
from interp.edges import Edge, EdgeScores, edge_graph, edge_names, grow_circuit, scores_from_rows

from .attribution import Tally, compare
from .common import base_parser, limited, load_setup_only, out_dir, save_json, set_threads
from .patching import n_batches, name_pairs, pair_batches

METHODS = ("patching", "attribution", "integrated")
#: How a circuit of k edges is built from a ranking: its top k, or grown backwards from the logits.
BUILDS = ("top", "greedy")
#: Circuit sizes evaluated (capped at the number of edges, which is always added).
COUNTS = (1, 2, 3, 5, 8, 12, 20, 30, 50, 80, 120, 200, 300, 400, 800)
KEEP = 0.8


def _pool(tally: Tally, graph, edges: Sequence[Edge], method: str, steps: int, n_rows: int) -> EdgeScores:
    meta = {"method": method, "n_rows": n_rows} | ({"steps": steps} if method == "integrated" else {})
    return scores_from_rows(graph, edges, [tally.mean(f"{u}->{v}") for u, v in edges], tally.mean("clean"),
                            tally.mean("corrupted"), meta)


def ladder(n_edges: int) -> list[int]:
    """The circuit sizes evaluated: :data:`COUNTS` below ``n_edges``, then every edge."""
    return [k for k in COUNTS if k < n_edges] + [n_edges]


def fewest(counts: Sequence[int], faithfulness: Sequence[float], keep: float = KEEP) -> int | None:
    """The smallest circuit size on the ladder whose faithfulness is at least ``keep`` (None if none is)."""
    return next((k for k, f in zip(counts, faithfulness) if f >= keep), None)


def by_input(scores: EdgeScores) -> dict[str, float]:
    """The summed normalised effect of the edges into each kind of reader (``q``, ``k``, ``v``, ``mlp_in``,
    ``logits``, or ``attn_in`` in the graph not split per head): where the paths are read."""
    graph, eff = scores.graph, scores.effects
    out: dict[str, float] = {}
    for j, v in enumerate(scores.downstream):
        kind = graph.reader(v)[0]
        out[kind] = out.get(kind, 0.0) + float(np.nansum(eff[:, j]))
    return out


def run(setup, args, n_pairs: int, steps: int, progress: bool) -> dict[str, Any]:
    model = setup.model
    bench, limit = setup.bench, args.limit
    profiles: list[Profile] = limited(bench.forget, limit) + limited(bench.retain, None if limit is None else
                                                                     max(limit, 2))
    specs = name_pairs(setup, profiles, n_pairs)
    qkv = bool(getattr(args, "qkv", False))
    graph = edge_graph(model, qkv=qkv)
    edges = graph.edges()
    tally = {m: Tally() for m in METHODS}
    clock = {m: 0.0 for m in METHODS}
    ctx_rows = args.batch_size
    batches = list(pair_batches(model, profiles, specs))
    bar = tqdm(total=n_batches(specs), desc="edges: patching vs attribution", disable=not progress, leave=False)
    n_rows = 0
    for _, clean, corrupt, _, metric in batches:
        b = clean.batch_size
        n_rows += b
        runs = {"patching": lambda: patch_each_edge(model, clean, corrupt, metric, max_rows=ctx_rows, qkv=qkv),
                "attribution": lambda: attribution_edges(model, clean, corrupt, metric, qkv=qkv),
                "integrated": lambda: attribution_edges(model, clean, corrupt, metric, steps=steps, qkv=qkv)}
        for m in METHODS:
            t0 = time.perf_counter()
            res = runs[m]()
            clock[m] += time.perf_counter() - t0
            tally[m].add("clean", res.clean, b), tally[m].add("corrupted", res.corrupted, b)
            for u, v in edges:
                tally[m].add(f"{u}->{v}", float(res.patched[graph.upstream.index(u), graph.downstream.index(v)]), b)
        bar.update(1)
    bar.close()
    pooled = {m: _pool(tally[m], graph, edges, m, steps, n_rows) for m in METHODS}
    effects = {m: [pooled[m].value(u, v) for u, v in edges] for m in METHODS}
    labels = [f"{u} -> {v}" for u, v in edges]
    agreement = {m: compare(effects["patching"], effects[m], labels) for m in METHODS[1:]}

    counts = ladder(len(edges))
    order = list(edges)
    random.Random(f"circuit:{setup.seed}").shuffle(order)
    rankings = {m: pooled[m].top(len(edges)) for m in METHODS} | {"random": order}
    circuits = {(build, r): [(ranked[:k] if build == "top" else grow_circuit(graph, ranked, k)) for k in counts]
                for build in BUILDS for r, ranked in rankings.items()}
    circuit_tally = Tally()
    bar = tqdm(total=len(batches), desc="circuits", disable=not progress, leave=False)
    for _, clean, corrupt, _, metric in batches:
        b = clean.batch_size
        with torch.no_grad():
            _, corrupt_cache = model.run_with_cache(corrupt, names=edge_names(model))
        keys = [(build, r, k) for (build, r), cs in circuits.items() for k in counts]
        rests = [complement(model, c, qkv=qkv) for cs in circuits.values() for c in cs]
        for (build, r, k), rows in zip(keys, patch_edge_sets(model, clean, corrupt_cache, rests, metric,
                                                             ctx_rows, qkv=qkv)):
            circuit_tally.add(f"{build}:{r}:{k}", float(np.mean(rows)), b)
        bar.update(1)
    bar.close()
    clean_m, corrupt_m = tally["patching"].mean("clean"), tally["patching"].mean("corrupted")
    gap = clean_m - corrupt_m
    faith = {build: {r: [(circuit_tally.mean(f"{build}:{r}:{k}") - corrupt_m) / gap for k in counts]
                     for r in rankings} for build in BUILDS}
    top = [{"edge": [u, v], **{m: pooled[m].value(u, v) for m in METHODS}} for u, v in pooled["patching"].top(10)]
    return {"config": {**setup.config(), "quick": bool(args.quick), "limit": args.limit, "steps": steps,
                       "qkv": qkv},
            "n_pairs": n_rows, "n_edges": len(edges), "clean": clean_m, "corrupted": corrupt_m,
            "edges": [list(e) for e in edges], "effects": effects, "agreement": agreement, "timing_s": clock,
            "top_edges": top, "counts": counts, "faithfulness": faith,
            "fewest_for_80pct": {b: {r: fewest(counts, f) for r, f in fb.items()} for b, fb in faith.items()},
            "by_input": {m: by_input(pooled[m]) for m in METHODS},
            "scores": {m: pooled[m].to_dict() for m in METHODS}}


def print_summary(res: dict[str, Any]) -> None:
    steps = res["config"]["steps"]
    split = " split per head" if res["config"].get("qkv") else ""
    print(f"\nEdges of the name question over {res['n_pairs']} pairs ({res['n_edges']} edges{split}; logit diff "
          f"clean {res['clean']:.2f}, corrupted {res['corrupted']:.2f})")
    t = res["timing_s"]
    print(f"  every edge patched: {t['patching']:.2f} s")
    for m, label in (("attribution", "first order (EAP)"), ("integrated", f"integrated, {steps} steps (EAP-IG)")):
        a = res["agreement"][m]
        print(f"  {label:<30} r {a['pearson_r']:6.3f}  max|d| {a['max_abs_diff']:6.3f}  top edge "
              f"{'same' if a['same_top'] else 'other':<5}  {t[m]:6.2f} s")
    print("  top edges by patching (patched / first order / integrated):")
    for row in res["top_edges"]:
        u, v = row["edge"]
        print(f"    {u + ' -> ' + v:<24} {row['patching']:7.3f} {row['attribution']:7.3f} {row['integrated']:7.3f}")
    if res.get("by_input"):
        kinds = list(res["by_input"]["patching"])
        print("  summed effect into each kind of reader (patched / first order / integrated):")
        for kind in kinds:
            print(f"    {kind:<10}" + "".join(f"{res['by_input'][m].get(kind, float('nan')):8.3f}" for m in METHODS))
    for build, label in (("top", "the top k edges"), ("greedy", "k edges grown from the logits")):
        print(f"  circuit faithfulness, {label} kept, the rest corrupted:")
        print("    " + f"{'k':>11}" + "".join(f"{k:>7}" for k in res["counts"]))
        for r, f in res["faithfulness"][build].items():
            print("    " + f"{r:>11}" + "".join(f"{x:7.2f}" for x in f))
        print("    fewest edges keeping 80 %: " + ", ".join(
            f"{r} {k if k is not None else '--'}" for r, k in res["fewest_for_80pct"][build].items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = base_parser("circuit", __doc__)
    ap.add_argument("--pairs", type=positive_int, default=8, help="profile pairs averaged")
    ap.add_argument("--steps", type=positive_int, default=8,
                    help="segments of the integrated estimate (steps + 1 differentiated passes per batch)")
    ap.add_argument("--qkv", action="store_true",
                    help="split each head's input into its query, key and value (the graph of EAP and ACDC)")
    args = ap.parse_args(argv)
    if args.eraser is not None or args.strength is not None:
        raise SystemExit("circuit studies the vanilla model: --eraser and --strength do not apply")
    set_threads(args.threads)
    setup = load_setup_only(args)
    out = out_dir(args)
    n_pairs = args.pairs if args.limit is None else min(args.pairs, max(args.limit, 1))
    res = save_json(out / "circuit.json", run(setup, args, n_pairs, args.steps, not args.no_progress))
    from eraser.plots import plot_circuit

    png = plot_circuit(res, out / "circuit.png")
    print_summary(res)
    print(f"  wrote {out / 'circuit.json'}" + (f" and {png}" if png else ""))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
