"""Edge attribution patching (EAP, EAP-IG): every edge's patching effect from a few backward passes.

Why: patching every edge (:func:`interp.edge_patching.patch_each_edge`) is one forward pass per edge, ~35k
for a 7B model's language model.  The first-order estimate of giving reader ``v`` writer ``u``'s clean value
is

    (clean_u - corrupted_u) . d metric / d input_v

where the gradient is taken at ``v``'s input *through v alone* (Syed et al. 2023): at its norm's input, not at
the residual stream, whose gradient also flows on to every later reader.  That gradient is the norm's
vector-Jacobian product with the gradient at the norm's output, one differentiated run gives it for every
reader, and each writer's difference then meets every reader's gradient in one contraction (heads through
their slice of the output projection).  In the graph split per head (``qkv=True``), a query, key or value
reader's gradient is taken at its projection (``attn.hook_q`` ...), brought back to ``ln1``'s output through
that head's rows of the projection, then through the norm.

``steps=K`` integrates along the straight input path from the corrupted inputs to the clean ones (EAP-IG,
Hanna et al. 2024): ``sum_j`` of the mean gradient of segment ``j`` times the writer's change over it, the
trapezoid rule of :func:`interp.attribution_patching.path_terms`.  The edges into ``"logits"`` are a complete
cut (the final residual is the sum of every writer), so with steps they add up to the whole clean - corrupted
difference; first order they add up to the first-order estimate of patching the last block's output.

Like every attribution method it ranks edges; the circuit built from the top ones is checked by patching
(:func:`interp.edge_patching.circuit_faithfulness`).

>>> from interp.tiny import tiny_vlm
>>> from PIL import Image
>>> from interp.patching import logit_diff
>>> model = tiny_vlm("llava", n_layers=2)
>>> clean = model.encode(images=[Image.new("RGB", (32, 32), "red")], prompts=["who is this"])
>>> corrupt = model.encode(images=[Image.new("RGB", (32, 32), "blue")], prompts=["who is this"])
>>> est = attribution_edges(model, clean, corrupt, logit_diff(5, 6), steps=16)
>>> into_logits = [est.value(u, "logits") for u in est.upstream]
>>> bool(abs(sum(into_logits) - 1) < 0.02)            # a complete cut adds up to the whole difference
True
"""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .attribution import head_outputs
from .attribution_patching import Terms, check_path_end, check_steps, swap_path
from .edge_patching import norm_module, qkv_weights
from .edges import QKV, EdgeGraph, EdgeScores, edge_graph, edge_names, reader_input_name, reader_site_name
from .gradients import GradRun
from .inputs import VLMInputs
from .patching import Metric, _mean, check_aligned

if TYPE_CHECKING:
    from .model import HookedVLM

METHOD = "edge_attribution"
#: Readers whose gradients are held at once in :func:`edge_terms` (each ``batch x pos x d_model`` in float32):
#: the graph split per head has ~1,600 readers at 7B sizes, too many to stack.
READER_CHUNK = 64

#: Up to this many bytes of one run's reader gradients are kept between the integrated estimate's segments (each
#: run ends one segment and starts the next); above it they are computed twice rather than held.
GRAD_MEMO_BYTES = 1 << 30

Grads = Union[Mapping[str, Tensor], Callable[[Sequence[str]], Mapping[str, Tensor]]]


def grad_names(model: "HookedVLM", qkv: bool = False) -> list[str]:
    """The hook names one differentiated run needs a gradient at: where each reader alone is reached (its
    norm's output, or a head's projection with ``qkv``)."""
    wanted = {reader_site_name(model, v) for v in edge_graph(model, qkv=qkv).downstream}
    return [n for n in model.hook_names() if n in wanted]


def read_names(model: "HookedVLM", qkv: bool = False) -> list[str]:
    """The hook names one differentiated run reads without a gradient: the writers
    (:func:`~interp.edges.edge_names`) and each reader's input."""
    wanted = set(edge_names(model)) | {reader_input_name(model, v) for v in edge_graph(model, qkv=qkv).downstream}
    return [n for n in model.hook_names() if n in wanted]


def rms_norm_vjp(x: Float[Tensor, "*batch d_model"], weight: Float[Tensor, " d_model"], eps: float,
                 grad_out: Float[Tensor, "*readers d_model"]) -> Float[Tensor, "*readers d_model"]:
    """The vector-Jacobian product of ``y = weight * x * rsqrt(mean(x^2) + eps)`` at ``x`` with ``grad_out``
    (leading reader dimensions broadcast against ``x``'s), in closed form and float32:

        r * (weight * g) - x * r^3 / d * sum(x * weight * g)

    Why closed form: a block split per head has dozens of readers at one input, and the product is linear in
    ``grad_out``, so one broadcast replaces dozens of autograd calls."""
    x = x.float()
    wg = weight.float() * grad_out.float()
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return r * wg - x * (r.pow(3) / x.shape[-1]) * (x * wg).sum(-1, keepdim=True)


def reader_grads(model: "HookedVLM", run: GradRun, readers: Optional[Sequence[str]] = None, qkv: bool = False
                 ) -> dict[str, Float[Tensor, "batch pos d_model"]]:
    """The gradient of the summed metric at each reader's input *through that reader alone* (default: every
    reader of the graph ``qkv`` picks): the vector-Jacobian product of its RMSNorm at the input the run gave
    it, with the gradient at the norm's output; for a head's query, key or value, with that head's slice of the
    gradient at its projection brought back through its rows (float32)."""
    graph = edge_graph(model, qkv=qkv)
    readers = graph.downstream if readers is None else list(readers)
    by_site: dict[str, list[str]] = defaultdict(list)
    for v in readers:
        by_site[reader_site_name(model, v)].append(v)
    out = {}
    for site, vs in by_site.items():
        norm = norm_module(model, vs[0])
        x = run.acts[reader_input_name(model, vs[0])]
        g = run.grads[site].float()
        if graph.reader_parts(vs[0])[0] in QKV:  # [batch, pos, head, d_head] -> [reader, batch, pos, d_model]
            heads = [graph.reader_parts(v)[2] for v in vs]
            w = qkv_weights(model, site)[0].detach().to(g.device).float()[heads]  # [reader, d_head, d_model]
            picked = g[..., heads, :].permute(2, 0, 1, 3)  # [reader, batch, pos, d_head]
            g = torch.bmm(picked.flatten(1, 2), w).view(len(vs), *picked.shape[1:3], -1)
            got = rms_norm_vjp(x.to(g.device), norm.weight.detach().to(g.device), norm.variance_epsilon, g)
            out.update(zip(vs, got.unbind(0)))
        else:
            out[vs[0]] = rms_norm_vjp(x.to(g.device), norm.weight.detach().to(g.device), norm.variance_epsilon, g)
    return {v: out[v] for v in readers}


def edge_terms(model: "HookedVLM", graph: EdgeGraph, deltas: dict[str, Tensor], grads: Grads,
               image_mask: Tensor, text_mask: Tensor) -> Float[Tensor, "batch writer reader"]:
    """``sum over positions of delta_u . grad_v`` per row for every edge (NaN where there is none).

    ``deltas`` holds each writer site's change (``hook_embed``, ``blocks.{l}.attn.hook_z``,
    ``blocks.{l}.hook_mlp_out``), ``grads`` each reader's gradient (:func:`reader_grads`: a mapping, or a
    function from a list of readers to their gradients, asked for :data:`READER_CHUNK` readers at a time so a
    graph split per head never holds them all).  Each writer's change is put in the residual stream once per
    chunk (a head's through its slice of the output projection) and met with every reader's gradient in one
    contraction: per block ``batch x pos x heads x d_model`` multiply-adds per reader, against ``d_model`` times
    more for projecting each reader's gradient back through the output projection.
    """
    with torch.no_grad():  # the weights' flags are on; these products need no gradient
        return _edge_terms(model, graph, deltas, grads, image_mask, text_mask)


def _edge_terms(model: "HookedVLM", graph: EdgeGraph, deltas: dict[str, Tensor], grads: Grads,
                image_mask: Tensor, text_mask: Tensor) -> Tensor:
    up, down = graph.upstream, graph.downstream
    embed = deltas["hook_embed"].float()
    get = grads if callable(grads) else (lambda vs: {v: grads[v] for v in vs})
    out = torch.full((embed.shape[0], len(up), len(down)), float("nan"))
    for start in range(0, len(down), READER_CHUNK):
        chunk = down[start:start + READER_CHUNK]
        cols = slice(start, start + len(chunk))
        got = get(chunk)
        # [batch, pos * d_model, reader]: every contraction below is one batched matrix product against it
        # (torch.einsum picked a path ~20x slower for these shapes)
        g = torch.stack([got[v].to(embed.device).float() for v in chunk], dim=-1).flatten(1, 2)
        del got

        def dot(x: Tensor) -> Tensor:  # [batch, k, pos, d_model] -> [batch, k, reader]
            return torch.bmm(x.flatten(2), g).cpu()

        for kind, mask in (("image", image_mask), ("text", text_mask)):
            masked = embed * mask.to(embed.device).unsqueeze(-1)
            out[:, up.index(kind), cols] = dot(masked.unsqueeze(1))[:, 0]
        last = max(graph.reader(v)[1] for v in chunk)  # no writer of a later block feeds this chunk
        for l in range(min(last + 1, graph.n_layers)):
            per_head = head_outputs(model, deltas[f"blocks.{l}.attn.hook_z"].float(), l)  # [batch, pos, head, d]
            first = up.index(f"L{l}H0")
            out[:, first:first + graph.n_heads, cols] = dot(per_head.transpose(1, 2))
            out[:, up.index(f"L{l}.mlp"), cols] = dot(deltas[f"blocks.{l}.hook_mlp_out"].float().unsqueeze(1))[:, 0]
    valid = torch.from_numpy(graph.edge_mask())
    return torch.where(valid, out, torch.full_like(out, float("nan")))


def attribution_edges(model: "HookedVLM", clean_inputs: VLMInputs, corrupted_inputs: VLMInputs, metric: Metric,
                      steps: int = 0, qkv: bool = False) -> EdgeScores:
    """Every edge's effect of being given its clean value in the corrupted run, estimated: ``steps=0`` first
    order (EAP: one clean forward pass, one differentiated corrupted pass), ``steps=K`` integrated along the
    input path in ``K`` trapezoid segments (EAP-IG: ``K + 1`` differentiated passes).  ``qkv`` scores the graph
    split per head (each head's query, key and value as readers) with the same passes.  Same value object as
    :func:`interp.edge_patching.patch_each_edge`, ``meta["method"] == "edge_attribution"``."""
    check_steps(steps)
    check_aligned(clean_inputs, corrupted_inputs)
    graph = edge_graph(model, qkv=qkv)
    writers = edge_names(model)
    run_at, clean_cache, clean_rows = swap_path(model, clean_inputs, corrupted_inputs, grad_names(model, qkv),
                                                metric, steps, reads=read_names(model, qkv))
    image_mask, text_mask = corrupted_inputs.image_mask, corrupted_inputs.text_mask

    b, p = corrupted_inputs.input_ids.shape
    keep = len(graph.downstream) * b * p * model.d_model * 4 <= GRAD_MEMO_BYTES
    # (run, readers) -> gradients; the run itself is held in the value, since an id can be reused once freed
    memo: dict[tuple[int, tuple[str, ...]], tuple[GradRun, dict[str, Tensor]]] = {}

    def grads(run: GradRun, readers: Sequence[str]) -> dict[str, Tensor]:
        """One run's reader gradients; kept for the next segment, which shares this run as its start, when all
        of one run's fit in :data:`GRAD_MEMO_BYTES`."""
        key = (id(run), tuple(readers))
        if key in memo and memo[key][0] is run:
            return memo[key][1]
        got = reader_grads(model, run, readers, qkv)
        if keep:
            memo[key] = (run, got)
        return got

    def grads_of(*runs: GradRun) -> Callable[[Sequence[str]], dict[str, Tensor]]:
        """The readers' gradients, the mean over ``runs`` (a trapezoid segment's two ends), a chunk at a time."""
        for key in [k for k, (r, _) in memo.items() if not any(r is x for x in runs)]:
            del memo[key]  # a run no later segment uses
        def get(readers: Sequence[str]) -> dict[str, Tensor]:
            each = [grads(r, readers) for r in runs]
            return {v: sum(e[v] for e in each) / len(each) for v in readers}
        return get

    if steps == 0:
        run = run_at(0.0)
        deltas = {n: clean_cache[n].to(run.acts[n].device).float() - run.acts[n].float() for n in writers}
        terms = edge_terms(model, graph, deltas, grads_of(run), image_mask, text_mask)
        base, end = [float(x) for x in run.values], None
    else:
        terms, prev = None, None
        base = []
        for j in range(steps + 1):
            run = run_at(j / steps)
            if prev is None:
                base = [float(x) for x in run.values]
            else:
                deltas = {n: run.acts[n].float() - prev.acts[n].float() for n in writers}
                part = edge_terms(model, graph, deltas, grads_of(prev, run), image_mask, text_mask)
                terms = part if terms is None else terms + part
            prev = run
        end = [float(x) for x in prev.values]
    check_path_end(Terms(base, end, {}), clean_rows)
    patched = np.asarray(_mean(base) + terms.mean(0).numpy(), dtype=float)
    meta = {"method": METHOD, "steps": steps, "n_rows": len(base)}
    if qkv:
        meta["qkv"] = True
    return EdgeScores(upstream=graph.upstream, downstream=graph.downstream, patched=patched,
                      clean=_mean(clean_rows), corrupted=_mean(base), meta=meta)


def edge_cut_sum(scores: EdgeScores, reader: str = "logits") -> float:
    """The summed normalised effect of every edge into ``reader``: 1 for ``"logits"`` when the estimate is exact
    (integrated, enough steps), the first-order estimate of patching the reader's whole input otherwise."""
    j = scores.downstream.index(reader)
    col = scores.effects[:, j]
    return float(np.nansum(col))


__all__ = ["GRAD_MEMO_BYTES", "READER_CHUNK", "attribution_edges", "edge_cut_sum", "edge_terms", "grad_names", "read_names",
           "reader_grads", "rms_norm_vjp"]
