"""Edge patching (path patching) and circuit faithfulness: patch what one component writes into one reader.

Why: an edge's effect is the ground truth that edge attribution (:mod:`interp.edge_attribution`) estimates,
and a circuit is only a circuit if the model still does the task when every edge outside it carries the
corrupted run's value.  Both need a run in which one reader sees a different input than the residual stream
everyone else sees.  Each reader (:mod:`interp.edges`) consumes its input through a norm (``ln1``, ``ln2``, the
final norm), so the patch replaces that norm's output by

    norm(x + sum over the patched writers u of (source_u - current_u))

where ``x`` is the reader's input in the run as it goes and ``current_u`` what ``u`` wrote in it: the reader
sees ``u``'s source value, the residual stream itself is untouched, and every other reader is unaffected.  The
norms are computed exactly as the model's RMSNorm modules compute them (checked against the modules).  In the
graph split per head (``qkv``), a head's query, key or value reader shares ``ln1``'s output with its block, so
the patch goes one step further: that head's slice of ``q_proj`` / ``k_proj`` / ``v_proj`` (``attn.hook_q``
...) becomes the projection of the patched norm, and the other heads keep theirs.

>>> from interp.tiny import tiny_vlm
>>> from PIL import Image
>>> from interp.patching import logit_diff
>>> model = tiny_vlm("llava", n_layers=2)
>>> clean = model.encode(images=[Image.new("RGB", (32, 32), "red")], prompts=["who is this"])
>>> corrupt = model.encode(images=[Image.new("RGB", (32, 32), "blue")], prompts=["who is this"])
>>> every = edge_graph(model).edges()
>>> round(circuit_faithfulness(model, clean, corrupt, every, logit_diff(5, 6)), 4)   # the whole model
1.0
>>> round(circuit_faithfulness(model, clean, corrupt, [], logit_diff(5, 6)), 4)      # nothing kept
0.0
"""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from .adapters import get_module
from .attribution import o_proj_weight
from .cache import ActivationCache
from .edges import (QKV, Edge, EdgeGraph, EdgeScores, edge_graph, edge_names, graph_of, reader_input_name,
                    reader_norm_name, reader_site_name, scores_from_rows)
from .hooks import HookContext, HookFn
from .inputs import VLMInputs
from .patching import Metric, _apply_metric, _mean, check_aligned, check_max_rows, check_source
from .steering import repeat_inputs

if TYPE_CHECKING:
    from .model import HookedVLM

METHOD = "edge_patching"


def norm_module(model: "HookedVLM", reader: str) -> torch.nn.Module:
    """The RMSNorm module a reader's input goes through; raises for a norm that is not an RMSNorm."""
    module = get_module(model.hf_model, model.site(reader_norm_name(model, reader)).module)
    if not (hasattr(module, "weight") and hasattr(module, "variance_epsilon")):
        raise NotImplementedError(f"{reader!r} reads through a {type(module).__name__}, not an RMSNorm "
                                  f"(weight, variance_epsilon): edges are not supported for this architecture")
    return module


def rms_norm(x: Float[Tensor, "... d_model"], weight: Float[Tensor, " d_model"], eps: float,
             dtype: Optional[torch.dtype] = None) -> Float[Tensor, "... d_model"]:
    """RMSNorm exactly as Llama's and Qwen2's modules compute it (float32 inside, then rounded to ``dtype``,
    default the input's, before the weight)."""
    dtype = x.dtype if dtype is None else dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def writer_delta(graph: EdgeGraph, writers: Iterable[str], model: "HookedVLM",
                 source: dict[str, Tensor], current: dict[str, Tensor], ctx_masks: tuple[Tensor, Tensor]
                 ) -> Optional[Tensor]:
    """``sum over writers of (source - current)`` in the residual stream, in float32 (a sum of ~1000 bf16
    differences would round away what it adds up to), or None for no writers.

    ``source`` / ``current`` hold ``hook_embed``, ``blocks.{l}.attn.hook_z`` and ``blocks.{l}.hook_mlp_out``;
    ``ctx_masks`` the image and text masks ``[batch, pos]``.
    """
    heads: dict[int, list[int]] = defaultdict(list)
    total: Optional[Tensor] = None

    def add(t: Tensor) -> None:
        nonlocal total
        total = t if total is None else total + t

    for u in writers:
        kind, layer, head = graph.writer(u)
        if kind in ("image", "text"):
            mask = ctx_masks[0] if kind == "image" else ctx_masks[1]
            diff = source["hook_embed"].float() - current["hook_embed"].float()
            add(diff * mask.to(diff.device).unsqueeze(-1).float())
        elif kind == "mlp":
            n = f"blocks.{layer}.hook_mlp_out"
            add(source[n].float() - current[n].float())
        else:
            heads[layer].append(head)
    for layer, hs in heads.items():
        n = f"blocks.{layer}.attn.hook_z"
        diff = source[n].float() - current[n].float()
        keep = torch.zeros(diff.shape[-2], device=diff.device)
        keep[hs] = 1
        add(F.linear((diff * keep[:, None]).flatten(-2), o_proj_weight(model, layer).float()))
    return total


def edge_hooks(model: "HookedVLM", source_cache: ActivationCache, edges: Sequence[Edge]) -> list[tuple[str, HookFn]]:
    """Hooks that give each reader in ``edges`` the source value of its listed writers (module docstring); every
    other reader, and the residual stream, stay as the run computes them.  The source cache must hold
    :func:`~interp.edges.edge_names` for the same prompt layout as the run."""
    return copy_hooks(model, source_cache, [edges])


def qkv_weights(model: "HookedVLM", site: str) -> tuple[Float[Tensor, "head d_head d_model"],
                                                        Optional[Float[Tensor, "head d_head"]]]:
    """A query, key or value projection (``site``: ``blocks.{l}.attn.hook_q`` / ``hook_k`` / ``hook_v``) split per
    head: ``(weight, bias or None)``, views of the module's own parameters."""
    proj = get_module(model.hf_model, model.site(site).module)
    n_q, n_kv = model.head_counts["lm"]
    n = n_q if site.endswith("hook_q") else n_kv
    bias = getattr(proj, "bias", None)
    return (proj.weight.view(n, -1, proj.weight.shape[1]), None if bias is None else bias.view(n, -1))


def qkv_projection(model: "HookedVLM", reader: str) -> tuple[Tensor, Optional[Tensor]]:
    """``(weight, bias)`` rows of one head's query, key or value projection (``[d_head, d_model]``, bias or
    None): what a ``qkv`` reader applies to its normalised input."""
    kind, _, head = edge_graph(model, qkv=True).reader_parts(reader)
    if kind not in QKV:
        raise ValueError(f"{reader!r} is not a head's query, key or value")
    weight, bias = qkv_weights(model, reader_site_name(model, reader))
    return weight[head], (None if bias is None else bias[head])


def reader_heads(model: "HookedVLM", graph: EdgeGraph, readers: Iterable[str]
                 ) -> dict[str, tuple[int, tuple[Tensor, Optional[Tensor]]]]:
    """``{reader: (head, (weight, bias))}`` for the query/key/value readers among ``readers``: what
    :func:`put_reader_input` needs to write one head's slice."""
    return {v: (graph.reader_parts(v)[2], qkv_projection(model, v)) for v in readers
            if graph.reader_parts(v)[0] in QKV}


def put_reader_input(out: Tensor, rows: slice, normed: Tensor,
                     head: Optional[tuple[int, tuple[Tensor, Optional[Tensor]]]] = None) -> None:
    """Write a reader's patched normalised input into ``out[rows]``, in place: the whole norm output, or for a
    query/key/value reader (``head`` from :func:`reader_heads`) that head's projection of it."""
    if head is None:
        out[rows] = normed.to(out.dtype)
    else:
        h, (w, b) = head
        out[rows, :, h] = F.linear(normed.to(w.dtype), w, b).to(out.dtype)


def copy_hooks(model: "HookedVLM", source_cache: ActivationCache, edge_sets: Sequence[Sequence[Edge]],
               qkv: Optional[bool] = None) -> list[tuple[str, HookFn]]:
    """:func:`edge_hooks` for a batch repeated once per edge set (:func:`interp.steering.repeat_inputs`): copy
    ``c`` of the source's rows gets ``edge_sets[c]`` patched, so one forward pass patches many sets, each
    exactly as alone.  ``qkv`` picks the graph (None: split per head when any reader is a head's query, key or
    value)."""
    flat = [e for edges in edge_sets for e in edges]
    graph = graph_of(model, flat) if qkv is None else edge_graph(model, qkv=qkv)
    edge_sets = [graph.check_edges(edges) for edges in edge_sets]
    if not any(edge_sets):
        return []
    source = {n: source_cache[n] for n in edge_names(model)}
    n_rows = next(iter(source.values())).shape[0]
    seen: dict[str, list[dict[str, None]]] = defaultdict(lambda: [{} for _ in edge_sets])  # ordered sets
    for c, edges in enumerate(edge_sets):
        for u, v in edges:
            seen[v][c][u] = None
    per_copy = {v: [list(writers) for writers in copies] for v, copies in seen.items()}
    current: dict[str, Tensor] = {}

    def record(name: str) -> HookFn:
        def hook(x: Tensor, ctx: HookContext) -> None:
            if ctx.is_prefill:
                current[name] = x
        return hook

    needed = set()
    for v, copies in per_copy.items():
        for u in {u for writers in copies for u in writers}:
            kind, layer, _ = graph.writer(u)
            needed.add("hook_embed" if layer is None else
                       f"blocks.{layer}.attn.hook_z" if kind == "head" else f"blocks.{layer}.hook_mlp_out")
        needed.add(reader_input_name(model, v))
    order = model.hook_names()
    hooks: list[tuple[str, HookFn]] = [(n, record(n)) for n in sorted(needed, key=order.index)]
    by_site: dict[str, dict[str, list[list[str]]]] = defaultdict(dict)
    for v, copies in per_copy.items():
        by_site[reader_site_name(model, v)][v] = copies

    def patch(site: str, readers: dict[str, list[list[str]]]) -> HookFn:
        first = next(iter(readers))
        norm = norm_module(model, first)
        inp = reader_input_name(model, first)
        heads = reader_heads(model, graph, readers)

        def hook(y: Tensor, ctx: HookContext) -> Optional[Tensor]:
            if not ctx.is_prefill:
                return None
            n_copies = len(edge_sets)
            if y.shape[0] != n_rows * n_copies:
                raise ValueError(f"{ctx.name!r}: the run has {y.shape[0]} rows, not {n_copies} copies of the "
                                 f"source's {n_rows}: repeat the target once per edge set")
            src = {k: t.to(y.device) for k, t in source.items()}
            x = current[inp]
            normed: dict[tuple[int, tuple[str, ...]], Tensor] = {}  # readers of one site often share writers

            def patched_norm(c: int, writers: list[str]) -> Tensor:
                key = (c, tuple(sorted(writers)))
                if key not in normed:
                    rows = slice(c * n_rows, (c + 1) * n_rows)
                    cur = {k: t[rows] for k, t in current.items()}
                    delta = writer_delta(graph, writers, model, src, cur,
                                         (ctx.image_mask[rows], ctx.text_mask[rows]))
                    normed[key] = rms_norm(x[rows].float() + delta, norm.weight, norm.variance_epsilon, dtype=x.dtype)
                return normed[key]

            out = y.clone()  # a norm's output (one reader), or [rows, pos, heads, d_head] (a slice per reader)
            for v, copies in readers.items():
                for c, writers in enumerate(copies):
                    if writers:
                        put_reader_input(out, slice(c * n_rows, (c + 1) * n_rows), patched_norm(c, writers),
                                         heads.get(v))
            return out
        return hook

    hooks += [(site, patch(site, readers)) for site, readers in by_site.items()]
    return hooks


def patch_edge_sets(model: "HookedVLM", target_inputs: VLMInputs, source_cache: ActivationCache,
                    edge_sets: Sequence[Sequence[Edge]], metric: Metric, max_rows: Optional[int] = 32,
                    qkv: Optional[bool] = None) -> list[list[float]]:
    """:func:`patch_edges` for each of ``edge_sets``: ``metric`` per row of the target with that set patched,
    several sets per forward pass (the target repeated, at most ``max_rows`` rows a pass; None: all at once).
    ``qkv`` as in :func:`copy_hooks`."""
    check_max_rows(max_rows)
    check_source(source_cache, target_inputs, edge_names(model))
    if qkv is None:
        qkv = graph_of(model, [e for edges in edge_sets for e in edges]).qkv
    graph = edge_graph(model, qkv=qkv)
    edge_sets = [graph.check_edges(e) for e in edge_sets]  # validate before any forward pass
    b = target_inputs.batch_size
    per_pass = len(edge_sets) if max_rows is None else max(1, max_rows // b)
    out: list[list[float]] = []
    for s in range(0, len(edge_sets), per_pass):
        chunk = edge_sets[s:s + per_pass]
        inputs = repeat_inputs(target_inputs, len(chunk))
        with torch.no_grad():
            logits = model.run_with_hooks(inputs, copy_hooks(model, source_cache, chunk, qkv=qkv))
        rows = _apply_metric(metric, logits, inputs)
        out += [rows[c * b:(c + 1) * b] for c in range(len(chunk))]
    return out


def patch_edges(model: "HookedVLM", target_inputs: VLMInputs, source_cache: ActivationCache, edges: Sequence[Edge],
                metric: Metric) -> list[float]:
    """``metric`` per row of a run of ``target_inputs`` with ``edges`` given ``source_cache``'s values
    (:func:`edge_hooks`)."""
    check_source(source_cache, target_inputs, edge_names(model))
    hooks = edge_hooks(model, source_cache, edges)
    with torch.no_grad():
        logits = model.run_with_hooks(target_inputs, hooks)
    return _apply_metric(metric, logits, target_inputs)


def _runs(model: "HookedVLM", clean: VLMInputs, corrupted: VLMInputs, metric: Metric,
          names: Optional[Sequence[str]] = None) -> tuple[ActivationCache, ActivationCache, list[float], list[float]]:
    """The clean and corrupted runs every edge function compares against: both caches of ``names`` (default the
    language model's :func:`~interp.edges.edge_names`) and both metrics per row (read with the corrupted run's
    positions)."""
    check_aligned(clean, corrupted)
    names = edge_names(model) if names is None else names
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names=names)
        corrupt_logits, corrupt_cache = model.run_with_cache(corrupted, names=names)
    return (clean_cache, corrupt_cache, _apply_metric(metric, clean_logits, corrupted),
            _apply_metric(metric, corrupt_logits, corrupted))


def patch_each_edge(model: "HookedVLM", clean_inputs: VLMInputs, corrupted_inputs: VLMInputs, metric: Metric,
                    edges: Optional[Sequence[Edge]] = None, progress: bool = False, max_rows: Optional[int] = 32,
                    qkv: Optional[bool] = None) -> EdgeScores:
    """The corrupted run with each edge alone given its clean value (default: every edge of the graph, split per
    head with ``qkv=True``), several edges per forward pass (``max_rows`` as in :func:`patch_edge_sets`).  The
    exact counterpart of :func:`interp.edge_attribution.attribution_edges`; ``progress`` shows a bar (a 7B model
    has ~35k edges, ~1.5M split per head: estimate first, patch the top ones)."""
    graph = _graph(model, edges, qkv)
    edges = graph.edges() if edges is None else graph.check_edges(edges)
    if not edges:
        raise ValueError("no edges to patch")
    check_max_rows(max_rows)
    clean_cache, _, clean_rows, corrupt_rows = _runs(model, clean_inputs, corrupted_inputs, metric)
    patched = each_alone(edges, clean_inputs.batch_size, max_rows, progress, "edges",
                         lambda sets: patch_edge_sets(model, corrupted_inputs, clean_cache, sets, metric, None,
                                                      qkv=graph.qkv))
    return scores_from_rows(graph, edges, patched, _mean(clean_rows), _mean(corrupt_rows),
                            {"method": METHOD, "n_rows": len(clean_rows)})


def each_alone(edges: Sequence[Edge], batch: int, max_rows: Optional[int], progress: bool, what: str,
               patch_sets: Callable[[list[list[Edge]]], list[list[float]]]) -> list[float]:
    """The batch-mean metric with each edge alone patched, ``max_rows // batch`` edges a forward pass
    (``patch_sets`` patches a list of edge sets in one pass), with a progress bar when asked."""
    per_pass = max(1, (max_rows or len(edges) * batch) // batch)
    chunks = [edges[s:s + per_pass] for s in range(0, len(edges), per_pass)]
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc=f"{what} ({per_pass} a pass)", unit="pass")
    return [_mean(rows) for chunk in chunks for rows in patch_sets([[e] for e in chunk])]


def kept_fractions(kept: Sequence[Sequence[float]], clean_rows: Sequence[float], corrupt_rows: Sequence[float]
                   ) -> list[float]:
    """``(metric - corrupted) / (clean - corrupted)`` of the batch means, per circuit; NaN when the runs agree."""
    gap = _mean(clean_rows) - _mean(corrupt_rows)
    return [(_mean(m) - _mean(corrupt_rows)) / gap if abs(gap) > 1e-12 else float("nan") for m in kept]


def _graph(model: "HookedVLM", edges: Optional[Iterable[Edge]], qkv: Optional[bool]) -> EdgeGraph:
    """The graph asked for (``qkv``), else the one ``edges`` belong to, else the graph not split per head."""
    if qkv is not None:
        return edge_graph(model, qkv=qkv)
    return graph_of(model, list(edges or []))


def complement(model: "HookedVLM", edges: Iterable[Edge], qkv: Optional[bool] = None) -> list[Edge]:
    """Every edge of the graph not in ``edges`` (``qkv``: which graph; None: the one ``edges`` belong to)."""
    edges = list(edges)
    graph = _graph(model, edges, qkv)
    keep = set(graph.check_edges(edges))
    return [e for e in graph.edges() if e not in keep]


def circuit_faithfulness(model: "HookedVLM", clean_inputs: VLMInputs, corrupted_inputs: VLMInputs,
                         circuit: Iterable[Edge], metric: Metric, qkv: Optional[bool] = None) -> float:
    """How much of the clean behaviour a circuit keeps: the clean run with every edge *outside* ``circuit``
    given the corrupted run's value, ``(metric - corrupted) / (clean - corrupted)`` of the batch means (ACDC's
    and EAP-IG's convention).  1 for every edge, 0 for none; NaN when clean and corrupted agree.  ``qkv``: the
    graph whose other edges are corrupted (None: the one the circuit's edges belong to)."""
    return faithfulness_curve(model, clean_inputs, corrupted_inputs, [list(circuit)], metric, qkv=qkv)[0]


def faithfulness_curve(model: "HookedVLM", clean_inputs: VLMInputs, corrupted_inputs: VLMInputs,
                       circuits: Sequence[Sequence[Edge]], metric: Metric, max_rows: Optional[int] = 32,
                       qkv: Optional[bool] = None) -> list[float]:
    """:func:`circuit_faithfulness` of each circuit (e.g. the top 10, 20, 40 edges of an
    :class:`~interp.edges.EdgeScores`), with the two reference runs made once and several circuits per pass."""
    graph = _graph(model, [e for c in circuits for e in c], qkv)
    circuits = [graph.check_edges(c) for c in circuits]  # validate before any forward pass
    _, corrupt_cache, clean_rows, corrupt_rows = _runs(model, clean_inputs, corrupted_inputs, metric)
    rests = [complement(model, c, qkv=graph.qkv) for c in circuits]
    kept = patch_edge_sets(model, clean_inputs, corrupt_cache, rests, metric, max_rows, qkv=graph.qkv)
    return kept_fractions(kept, clean_rows, corrupt_rows)


def top_circuits(scores: EdgeScores, counts: Sequence[int], by_abs: bool = True) -> list[list[Edge]]:
    """The top ``k`` edges of ``scores`` for each ``k`` in ``counts`` (for :func:`faithfulness_curve`)."""
    return [scores.top(k, by_abs) for k in counts]


__all__ = ["circuit_faithfulness", "complement", "copy_hooks", "each_alone", "edge_hooks", "faithfulness_curve",
           "kept_fractions", "norm_module",
           "patch_each_edge", "patch_edge_sets", "patch_edges", "put_reader_input", "qkv_projection", "qkv_weights",
           "reader_heads", "rms_norm", "top_circuits", "writer_delta"]
