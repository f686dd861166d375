"""Every vision-tower edge's effect estimated from gradients (EAP / EAP-IG for :mod:`interp.vision_edges`).

Why: patching a vision edge costs a forward pass of the whole model, and a CLIP-L tower read at its 23rd block
has ~9k edges; the estimate costs one differentiated pass (first order) or ``K + 1`` (integrated), whatever the
number of edges, and says which ones to patch.

Edge ``u -> v``: ``delta_u . d metric / d x_v`` summed over every vision position (every patch of every image) and
averaged over the batch's rows, where ``delta_u`` is what ``u`` writes in the clean run minus the corrupted run
(a head through its slice of the output projection) and ``x_v`` the residual stream reader ``v`` normalises:
the gradient at the norm's output taken back through the norm (the module's own function, by autograd), or at
the read block's output for the projector.  ``steps=K`` integrates along the straight path from the corrupted
pixels to the clean ones (:func:`interp.attribution_patching.swap_path`) in ``K`` trapezoid segments, each
segment's writer change times its mean reader gradient.  Same value object as
:func:`interp.vision_edges.patch_each_vision_edge` (an :class:`~interp.edges.EdgeScores`).

>>> from interp.tiny import tiny_vlm
>>> from interp.patching import logit_diff
>>> from PIL import Image
>>> model = tiny_vlm("llava", n_layers=2)
>>> clean = model.encode(images=[Image.new("RGB", (32, 32), "red")], prompts=["who is this"])
>>> corrupt = model.encode(images=[Image.new("RGB", (32, 32), "blue")], prompts=["who is this"])
>>> est = attribution_vision_edges(model, clean, corrupt, logit_diff(5, 6))
>>> est.meta["method"], len(est.ranked()) == len(vision_edge_graph(model).edges())
('vision_edge_attribution', True)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .adapters import get_module
from .attribution_patching import Terms, check_path_end, check_steps, swap_path
from .edges import EdgeScores, feeds
from .gradients import GradRun
from .inputs import VLMInputs
from .patching import Metric, _mean, check_aligned
from .vision_edges import (
    QKV, VisionEdgeGraph, _reader_names, apply_norm, norm_site, qkv_weights, vision_edge_graph,
    vision_edge_names,
)

if TYPE_CHECKING:
    from .model import HookedVLM

METHOD = "vision_edge_attribution"


def _float_norm(module: torch.nn.Module, x: Tensor) -> Tensor:
    """The norm's function in float32 (weights cast), so its gradient can be taken at float32 activations."""
    if isinstance(module, torch.nn.LayerNorm):
        return torch.nn.functional.layer_norm(x, module.normalized_shape, module.weight.float(),
                                              None if module.bias is None else module.bias.float(), module.eps)
    return apply_norm(module, x)


def reader_grads(model: "HookedVLM", graph: VisionEdgeGraph, run: GradRun) -> dict[str, Tensor]:
    """``d sum(metric) / d x_v`` for every reader ``v`` of ``graph`` in one differentiated run (float32); a
    query/key/value reader's through that head's rows of the projection, then the norm."""
    out: dict[str, Tensor] = {}
    for v in graph.downstream:
        inp, site, normed = _reader_names(graph, v)
        kind, layer, head = graph.reader_parts(v)
        g = run.grads[site].float()
        if kind in QKV:  # [..., head, d_head] at the projection: back through this head's rows
            w, _ = qkv_weights(model, layer, kind)
            g = g[..., head, :] @ w[head].detach().float()
        if normed:
            module = get_module(model.hf_model, model.site(norm_site(graph, v)).module)
            with torch.enable_grad():
                x = run.acts[inp].detach().float().requires_grad_(True)
                g = torch.autograd.grad(_float_norm(module, x), x, g)[0]
        out[v] = g
    return out


def edge_terms(model: "HookedVLM", graph: VisionEdgeGraph, deltas: dict[str, Tensor], grads: dict[str, Tensor]
               ) -> np.ndarray:
    """``[writers, readers]``: ``delta_u . grad_v`` summed over every vision entry (NaN where there is no edge);
    ``deltas`` keyed by :func:`~interp.vision_edges.vision_edge_names`."""
    with torch.no_grad():
        return _edge_terms(model, graph, deltas, grads)


def _edge_terms(model: "HookedVLM", graph: VisionEdgeGraph, deltas: dict[str, Tensor], grads: dict[str, Tensor]
                ) -> np.ndarray:
    up, down = graph.upstream, graph.downstream
    patches = deltas["vision.blocks.0.hook_resid_pre"].float()
    heads, mlps = [], []
    for l in range(graph.n_layers):
        z = f"vision.blocks.{l}.attn.hook_z"
        w = get_module(model.hf_model, model.site(z).module).weight.float()  # [d, head * d_head]
        heads.append(torch.einsum("...hk,dhk->...hd", deltas[z].float(), w.view(w.shape[0], graph.n_heads, -1)))
        mlps.append(deltas[f"vision.blocks.{l}.hook_mlp_out"].float())
    out = torch.full((len(up), len(down)), float("nan"), dtype=torch.float64)
    first_head = {l: up.index(f"V{l}H0") for l in range(graph.n_layers)}
    for j, v in enumerate(down):  # one product per writer group (a block's heads at once), not per edge
        g = grads[v].to(patches.device)
        reader = graph.reader(v)
        cells = [(patches * g).sum().reshape(1)]
        rows = [0]
        for l in range(graph.n_layers):
            if feeds(("head", l, 0), reader):
                cells.append(torch.einsum("...hd,...d->h", heads[l], g))
                rows += list(range(first_head[l], first_head[l] + graph.n_heads))
            if feeds(("mlp", l, None), reader):
                cells.append((mlps[l] * g).sum().reshape(1))
                rows.append(first_head[l] + graph.n_heads)
        out[rows, j] = torch.cat(cells).double().cpu()
    return out.numpy()


def attribution_vision_edges(model: "HookedVLM", clean_inputs: VLMInputs, corrupted_inputs: VLMInputs,
                             metric: Metric, steps: int = 0, qkv: bool = False) -> EdgeScores:
    """Every vision edge's effect of being given its clean value in the corrupted run, estimated (module
    docstring): ``steps=0`` first order (one clean pass, one differentiated corrupted pass), ``steps=K``
    integrated (``K + 1`` differentiated passes; the terms into the projector then add up to the clean -
    corrupted difference).  ``qkv`` scores the graph split per head with the same passes."""
    check_steps(steps)
    check_aligned(clean_inputs, corrupted_inputs)
    if not (clean_inputs.has_images and corrupted_inputs.has_images):
        raise ValueError("the batch has no images: there are no vision edges to estimate")
    graph = vision_edge_graph(model, qkv=qkv)
    sites = list(dict.fromkeys(_reader_names(graph, v)[1] for v in graph.downstream))
    reads = list(dict.fromkeys([_reader_names(graph, v)[0] for v in graph.downstream] + vision_edge_names(model)))
    reads = [n for n in reads if n not in sites]
    writers = vision_edge_names(model)
    run_at, clean_cache, clean_rows = swap_path(model, clean_inputs, corrupted_inputs, sites, metric, steps,
                                                reads=reads)
    b = corrupted_inputs.batch_size

    def act(run: GradRun, name: str) -> Tensor:
        return run.acts[name].float()

    if steps == 0:
        run = run_at(0.0)
        deltas = {n: clean_cache[n].float().to(run.acts[n].device) - act(run, n) for n in writers}
        terms = edge_terms(model, graph, deltas, reader_grads(model, graph, run))
        base, end = [float(x) for x in run.values], None
    else:
        terms, prev, prev_grads, base = None, None, None, []
        for j in range(steps + 1):
            run = run_at(j / steps)
            grads = reader_grads(model, graph, run)
            if prev is None:
                base = [float(x) for x in run.values]
            else:
                deltas = {n: act(run, n) - act(prev, n) for n in writers}
                mean = {v: 0.5 * (grads[v] + prev_grads[v]) for v in grads}
                part = edge_terms(model, graph, deltas, mean)
                terms = part if terms is None else terms + part
            prev, prev_grads = run, grads
        end = [float(x) for x in prev.values]
    check_path_end(Terms(base, end, {}), clean_rows)
    return EdgeScores(upstream=graph.upstream, downstream=graph.downstream, patched=_mean(base) + terms / b,
                      clean=_mean(clean_rows), corrupted=_mean(base),
                      meta={"method": METHOD, "steps": steps, "n_rows": len(base)} | ({"qkv": True} if qkv else {}))


__all__ = ["attribution_vision_edges", "edge_terms", "reader_grads"]
