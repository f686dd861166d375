"""Benchmark: every edge's effect by edge attribution (EAP, EAP-IG) vs patching the edges one at a time.

An edge is one writer (the image or text embeddings, a head, an MLP) into one later reader (a block's attention
or MLP input, or with ``--qkv``-style splitting each head's query, key and value, and the logits;
:mod:`interp.edges`).  Patching gives each edge its exact effect at one forward pass per edge (several edges
batched per pass, each exactly as alone); edge attribution estimates every edge from one differentiated pass
(first order) or ``K + 1`` (integrated).  Both graphs are timed: the block-level one and the one split per
head.  Patching is timed on ``--sample`` edges (the largest by the integrated estimate, so the comparison is
on edges that matter) and extrapolated to every edge; the estimates are timed whole.  Prints medians over
interleaved repeats, the ratios, and each estimate's agreement with patching on the sampled edges, on a
24.8M-parameter random LLaVA config by default (random weights: the agreement says little about a trained
model, ``analyses/circuit.py`` measures that).

Run: ``python -m analyses.bench_edges [--d-model 512 --n-layers 8 --image-size 64 --steps 8 --sample 32]``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from analyses._timing import interleaved
from analyses.bench_attribution import parse_config, setup
from eraser.argtypes import positive_int
from interp.edge_attribution import attribution_edges
from interp.edge_patching import patch_each_edge
from interp.edges import EdgeScores, edge_graph

GRAPHS = {"block": False, "split": True}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_config("bench_edges", __doc__, argv, lambda ap: ap.add_argument(
        "--sample", type=positive_int, default=32, help="edges patched per graph (extrapolated)"))

    model, clean, corrupt, metric = setup(args.d_model, args.n_layers, args.image_size, args.batch)
    n_params = sum(p.numel() for p in model.hf_model.parameters())
    n_edges = {g: len(edge_graph(model, qkv=qkv).edges()) for g, qkv in GRAPHS.items()}
    # the sampled edges: the largest by the integrated estimate, once, outside the timing
    sample = {g: attribution_edges(model, clean, corrupt, metric, steps=args.steps, qkv=qkv).top(args.sample)
              for g, qkv in GRAPHS.items()}
    got: dict[str, EdgeScores] = {}

    def job(key: str, fn) -> tuple[str, Any]:
        return key, lambda: got.__setitem__(key, fn())

    fns = dict(job(f"{g}_{m}", fn) for g, qkv in GRAPHS.items() for m, fn in (
        ("patching", lambda qkv=qkv, g=g: patch_each_edge(model, clean, corrupt, metric, edges=sample[g],
                                                          max_rows=args.max_rows, qkv=qkv)),
        ("first_order", lambda qkv=qkv: attribution_edges(model, clean, corrupt, metric, qkv=qkv)),
        ("integrated", lambda qkv=qkv: attribution_edges(model, clean, corrupt, metric, steps=args.steps, qkv=qkv))))
    med = interleaved(fns, repeats=args.repeats, warmup=1)

    print(f"model: {n_params / 1e6:.1f}M params, {args.n_layers} layers, batch {args.batch}, seq "
          f"{corrupt.input_ids.shape[1]}; edges: {n_edges['block']} (block readers), {n_edges['split']} (split per "
          f"head)")
    out: dict[str, Any] = {"n_params": n_params, "edges": n_edges, "medians_s": med}
    for g in GRAPHS:
        per_edge = med[f"{g}_patching"] / len(sample[g])
        every = per_edge * n_edges[g]
        exact = got[f"{g}_patching"]
        agree = {}
        for m in ("first_order", "integrated"):
            a = np.array([exact.value(u, v) for u, v in sample[g]])
            b = np.array([got[f"{g}_{m}"].value(u, v) for u, v in sample[g]])
            agree[m] = float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else float("nan")
        out[g] = {"patching_per_edge_s": per_edge, "patching_all_s_extrapolated": every,
                  "ratio_first_order": every / med[f"{g}_first_order"],
                  "ratio_integrated": every / med[f"{g}_integrated"], "agreement": agree}
        print(f"{g} graph ({n_edges[g]} edges):")
        print(f"  every edge patched (extrapolated from {len(sample[g])}, {per_edge * 1e3:.1f} ms an edge) "
              f"{every:9.2f} s")
        print(f"  first order (EAP, 2 passes)           {med[f'{g}_first_order']:9.3f} s  "
              f"({out[g]['ratio_first_order']:.0f}x faster; r with patching on the sample {agree['first_order']:.2f})")
        print(f"  integrated, {args.steps} steps (EAP-IG)          {med[f'{g}_integrated']:9.3f} s  "
              f"({out[g]['ratio_integrated']:.0f}x faster; r {agree['integrated']:.2f})")
    out["split_cost"] = {m: med[f"split_{m}"] / med[f"block_{m}"] for m in ("first_order", "integrated")}
    print(f"splitting per head costs {out['split_cost']['first_order']:.2f}x (first order) / "
          f"{out['split_cost']['integrated']:.2f}x (integrated) the block graph's estimate, for "
          f"{n_edges['split'] / n_edges['block']:.1f}x the edges")
    return out


if __name__ == "__main__":
    main()
