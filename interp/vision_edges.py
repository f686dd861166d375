"""The vision tower as a graph of edges: which image-encoder heads and MLPs feed which later ones, and the projector.

Why: :mod:`interp.edges` treats the whole vision tower and projector as one writer (``"image"``), and
:func:`interp.head_patching.patch_heads` with ``tower="vision"`` says how much one vision head matters in total,
not whether it matters because the projector reads what it wrote or because a later vision head or MLP builds on
it.  The vision tower's residual stream is a sum like the language model's, so the same edge patching applies:
give one reader the clean value of one writer while everything else runs as it is.

Nodes (``V`` for vision, so they never collide with the language model's ``L`` labels):

- writers (``upstream``): ``"patches"`` (the patch embeddings, the input of block 0), every head ``"V{l}H{h}"``
  (its slice of the attention's output projection) and every MLP ``"V{l}.mlp"``;
- readers (``downstream``): each block's attention input ``"V{l}.attn_in"`` (the input of ``ln1``), each MLP
  input ``"V{l}.mlp_in"`` (the input of ``ln2``) and ``"projector"`` (the residual stream the projector reads:
  LLaVA's ``vision_feature_layer``, Qwen2.5-VL's last block).  Blocks after the one the projector reads (LLaVA-1.5's
  last) are left out: nothing they write reaches the language model.

Edges are patched exactly as in :mod:`interp.edge_patching`: the reader's norm output becomes
``norm(x + sum over patched writers u of (source_u - current_u))``, computed by the model's own norm module
(CLIP's LayerNorm or Qwen2.5-VL's RMSNorm), so the residual stream and every other reader are untouched.  The
output projections' and MLPs' biases are the same in both runs and cancel in the differences.  The projector
reader is patched where it reads, the read block's ``hook_resid_post`` (nothing else that reaches the logits reads
that tensor).  Every edge patched at once is the clean run (tested, both architectures).

Every vision position is patched (every patch of every image, CLS included); the metric is read at the language
model's logits.  Not split per head (no ``qkv`` graph here) and no first-order estimate yet: patch.

>>> from interp.tiny import tiny_vlm
>>> g = vision_edge_graph(tiny_vlm("llava", vision_layers=3))   # the projector reads block 1 (feature layer -2)
>>> g.upstream, g.downstream[-2:]
(['patches', 'V0H0', 'V0H1', 'V0.mlp', 'V1H0', 'V1H1', 'V1.mlp'], ['V1.mlp_in', 'projector'])
"""
from __future__ import annotations

import functools
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .adapters import get_module
from .cache import ActivationCache
from .edge_patching import rms_norm
from .edges import Edge, EdgeScores, scores_from_rows
from .hooks import HookContext, HookFn
from .inputs import VLMInputs
from .patching import Metric, _apply_metric, _mean, check_aligned, check_max_rows, check_source
from .steering import repeat_inputs

if TYPE_CHECKING:
    from .model import HookedVLM

PATCHES = "patches"
PROJECTOR = "projector"
METHOD = "vision_edge_patching"
_HEAD = re.compile(r"^V(\d+)H(\d+)$")
_MLP = re.compile(r"^V(\d+)\.mlp$")
_READER = re.compile(r"^V(\d+)\.(attn_in|mlp_in)$")


@dataclass(frozen=True)
class VisionEdgeGraph:
    """The writers, readers and edges of the ``n_layers`` vision blocks of ``n_heads`` heads the projector reads
    (module docstring).  The same interface as :class:`interp.edges.EdgeGraph` (``qkv`` is always False), so
    :class:`~interp.edges.EdgeScores` and :func:`~interp.edges.greedy_circuit` work on it."""

    n_layers: int
    n_heads: int
    qkv: bool = False
    tower: str = "vision"

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1:
            raise ValueError(f"a vision edge graph needs >= 1 block and head, got {self.n_layers} / {self.n_heads}")
        if self.qkv:
            raise NotImplementedError("the vision edge graph is not split per head (qkv) yet")

    @property
    def upstream(self) -> list[str]:
        out = [PATCHES]
        for l in range(self.n_layers):
            out += [f"V{l}H{h}" for h in range(self.n_heads)] + [f"V{l}.mlp"]
        return out

    @property
    def downstream(self) -> list[str]:
        return [r for l in range(self.n_layers) for r in (f"V{l}.attn_in", f"V{l}.mlp_in")] + [PROJECTOR]

    @property
    def output(self) -> str:
        """The reader the graph ends in (circuits grow backwards from it)."""
        return PROJECTOR

    def head_inputs(self, layer: int, head: int) -> list[str]:
        return [f"V{layer}.attn_in"]

    def mlp_input(self, layer: int) -> str:
        return f"V{layer}.mlp_in"

    def writer(self, label: str) -> tuple[str, Optional[int], Optional[int]]:
        """``(kind, layer, head)``: kind ``"patches"``, ``"head"`` or ``"mlp"``."""
        if label == PATCHES:
            return PATCHES, None, None
        m = _HEAD.match(label) if isinstance(label, str) else None
        if m is not None and int(m.group(1)) < self.n_layers and int(m.group(2)) < self.n_heads:
            return "head", int(m.group(1)), int(m.group(2))
        m = _MLP.match(label) if isinstance(label, str) else None
        if m is not None and int(m.group(1)) < self.n_layers:
            return "mlp", int(m.group(1)), None
        raise ValueError(f"unknown vision writer {label!r} for {self.n_layers} blocks of {self.n_heads} heads: "
                         f"writers are 'patches', 'V{{l}}H{{h}}' and 'V{{l}}.mlp'")

    def reader(self, label: str) -> tuple[str, int]:
        """``(kind, layer)``: kind ``"attn_in"``, ``"mlp_in"`` or ``"projector"`` (layer ``n_layers``)."""
        if label == PROJECTOR:
            return PROJECTOR, self.n_layers
        m = _READER.match(label) if isinstance(label, str) else None
        if m is not None and int(m.group(1)) < self.n_layers:
            return m.group(2), int(m.group(1))
        raise ValueError(f"unknown vision reader {label!r} for {self.n_layers} blocks: readers are "
                         f"'V{{l}}.attn_in', 'V{{l}}.mlp_in' and 'projector'")

    def is_edge(self, writer: str, reader: str) -> bool:
        kind, layer, _ = self.writer(writer)
        r_kind, r_layer = self.reader(reader)
        if layer is None:
            return True
        if kind == "head" and r_kind == "mlp_in":
            return layer <= r_layer
        return layer < r_layer

    def edges(self) -> list[Edge]:
        """Every edge, readers in execution order, writers in execution order within each."""
        return [(u, v) for v in self.downstream for u in self.upstream if self.is_edge(u, v)]

    def check_edges(self, edges: Iterable[Edge]) -> list[Edge]:
        """``edges`` as ``(writer, reader)`` tuples, each checked; raises naming the first bad one."""
        known, out = _edge_set(self), []
        for e in edges:
            if not (isinstance(e, (tuple, list)) and len(e) == 2 and all(isinstance(x, str) for x in e)):
                raise ValueError(f"an edge is a (writer, reader) pair of labels, got {e!r}")
            e = (e[0], e[1])
            if e not in known:
                if not self.is_edge(*e):  # raises for unknown labels first
                    raise ValueError(f"no edge {e[0]!r} -> {e[1]!r}: {e[0]!r} runs after {e[1]!r} reads the "
                                     "residual stream")
            out.append(e)
        return out


@functools.lru_cache(maxsize=8)
def _edge_set(graph: VisionEdgeGraph) -> frozenset[Edge]:
    return frozenset(graph.edges())


def projector_block(model: "HookedVLM") -> int:
    """The vision block whose output the projector reads; raises for a projector that reads several blocks or the
    patch embeddings (no graph of edges ends there)."""
    blocks = model.vision_feature_blocks
    if len(blocks) != 1 or blocks[0] < 0:
        raise NotImplementedError(f"the projector reads vision blocks {list(blocks)}: vision edges need it to read "
                                  "the output of exactly one block")
    return blocks[0]


def vision_edge_graph(model: "HookedVLM") -> VisionEdgeGraph:
    """The vision edge graph of ``model``: the blocks up to the one the projector reads."""
    return VisionEdgeGraph(n_layers=projector_block(model) + 1, n_heads=model.head_counts["vision"][0])


def vision_edge_names(model: "HookedVLM") -> list[str]:
    """The hook names a source cache needs: block 0's input and every ``attn.hook_z`` and ``hook_mlp_out`` of the
    blocks the projector reads."""
    n = projector_block(model) + 1
    return (["vision.blocks.0.hook_resid_pre"] + [f"vision.blocks.{l}.attn.hook_z" for l in range(n)]
            + [f"vision.blocks.{l}.hook_mlp_out" for l in range(n)])


def _writer_name(graph: VisionEdgeGraph, writer: str) -> str:
    kind, layer, _ = graph.writer(writer)
    return ("vision.blocks.0.hook_resid_pre" if kind == PATCHES else
            f"vision.blocks.{layer}.attn.hook_z" if kind == "head" else f"vision.blocks.{layer}.hook_mlp_out")


def _reader_names(graph: VisionEdgeGraph, reader: str) -> tuple[str, str, bool]:
    """``(input, site, normed)``: where the reader's input is recorded, where it is patched, and whether that site
    is a norm's output (whose module then computes the patched value; the projector reads the residual stream
    itself)."""
    kind, layer = graph.reader(reader)
    if kind == PROJECTOR:
        name = f"vision.blocks.{layer - 1}.hook_resid_post"
        return name, name, False
    if kind == "attn_in":
        return f"vision.blocks.{layer}.hook_resid_pre", f"vision.blocks.{layer}.ln1.hook_normalized", True
    return f"vision.blocks.{layer}.hook_resid_mid", f"vision.blocks.{layer}.ln2.hook_normalized", True


def apply_norm(module: torch.nn.Module, x: Tensor) -> Tensor:
    """What ``module`` (CLIP's LayerNorm, Qwen2.5-VL's RMSNorm) computes from ``x``, as a function: inside a hook the
    module itself cannot be called again (nnsight traces it).  Raises for another kind of norm."""
    if isinstance(module, torch.nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    if hasattr(module, "weight") and hasattr(module, "variance_epsilon"):
        return rms_norm(x, module.weight, module.variance_epsilon)
    raise NotImplementedError(f"vision edges read through a {type(module).__name__}: only LayerNorm and RMSNorm are "
                              "supported")


def writer_deltas(model: "HookedVLM", graph: VisionEdgeGraph, writers: Sequence[str], source: dict[str, Tensor],
                  current: dict[str, Tensor]) -> Tensor:
    """``sum over writers of (source - current)`` in the vision residual stream, in float32 (a head's share goes
    through its slice of the output projection, without the bias both runs add)."""
    total: Optional[Tensor] = None
    heads: dict[int, list[int]] = defaultdict(list)
    for u in writers:
        kind, layer, head = graph.writer(u)
        if kind == "head":
            heads[layer].append(head)
            continue
        n = _writer_name(graph, u)
        d = source[n].float() - current[n].float()
        total = d if total is None else total + d
    for layer, hs in heads.items():
        n = f"vision.blocks.{layer}.attn.hook_z"
        diff = source[n].float() - current[n].float()
        keep = torch.zeros(diff.shape[-2], device=diff.device)
        keep[hs] = 1
        w = get_module(model.hf_model, model.site(n).module).weight.float()
        d = F.linear((diff * keep[:, None]).flatten(-2), w)
        total = d if total is None else total + d
    if total is None:
        raise ValueError("no writers")
    return total


def vision_copy_hooks(model: "HookedVLM", source_cache: ActivationCache, edge_sets: Sequence[Sequence[Edge]]
                      ) -> list[tuple[str, HookFn]]:
    """Hooks for a batch repeated once per edge set (:func:`interp.steering.repeat_inputs`): copy ``c`` of the
    images gets ``edge_sets[c]`` patched from ``source_cache`` (which holds :func:`vision_edge_names` of a run
    with one copy's images), each set exactly as alone."""
    graph = vision_edge_graph(model)
    edge_sets = [graph.check_edges(edges) for edges in edge_sets]
    if not any(edge_sets):
        return []
    source = {n: source_cache[n] for n in vision_edge_names(model)}
    n_first = next(iter(source.values())).shape[0]  # images (LLaVA) or patches (Qwen2.5-VL) of one copy
    per_copy: dict[str, list[list[str]]] = {}
    for c, edges in enumerate(edge_sets):
        for u, v in edges:
            writers = per_copy.setdefault(v, [[] for _ in edge_sets])[c]
            if u not in writers:
                writers.append(u)
    current: dict[str, Tensor] = {}

    def record(name: str) -> HookFn:
        def hook(x: Tensor, ctx: HookContext) -> None:
            if ctx.is_prefill:
                current[name] = x
        return hook

    needed = {_writer_name(graph, u) for copies in per_copy.values() for ws in copies for u in ws}
    needed |= {_reader_names(graph, v)[0] for v in per_copy}
    order = model.hook_names()
    hooks: list[tuple[str, HookFn]] = [(n, record(n)) for n in sorted(needed, key=order.index)]

    def patch(reader: str, copies: list[list[str]]) -> HookFn:
        inp, site, normed = _reader_names(graph, reader)
        module = get_module(model.hf_model, model.site(site).module) if normed else None

        def hook(y: Tensor, ctx: HookContext) -> Optional[Tensor]:
            if not ctx.is_prefill:
                return None
            if y.shape[0] != n_first * len(edge_sets):
                raise ValueError(f"{ctx.name!r}: the run has {y.shape[0]} vision rows, not {len(edge_sets)} copies of "
                                 f"the source's {n_first}: repeat the target once per edge set")
            src = {k: t.to(y.device) for k, t in source.items()}
            x = current[inp]
            out = y.clone()
            for c, writers in enumerate(copies):
                if not writers:
                    continue
                rows = slice(c * n_first, (c + 1) * n_first)
                delta = writer_deltas(model, graph, writers, src, {k: t[rows] for k, t in current.items()})
                new = (x[rows].float() + delta).to(x.dtype)
                out[rows] = (new if module is None else apply_norm(module, new)).to(out.dtype)
            return out
        return hook

    hooks += [(_reader_names(graph, v)[1], patch(v, copies)) for v, copies in per_copy.items()]
    return hooks


def patch_vision_edge_sets(model: "HookedVLM", target_inputs: VLMInputs, source_cache: ActivationCache,
                           edge_sets: Sequence[Sequence[Edge]], metric: Metric, max_rows: Optional[int] = 32
                           ) -> list[list[float]]:
    """``metric`` per row of the target with each of ``edge_sets`` patched from ``source_cache``, several sets a
    forward pass (the target repeated, at most ``max_rows`` rows a pass; None: all at once)."""
    check_max_rows(max_rows)
    if not target_inputs.has_images:
        raise ValueError("the batch has no images: there are no vision edges to patch")
    check_source(source_cache, target_inputs, vision_edge_names(model))
    graph = vision_edge_graph(model)
    edge_sets = [graph.check_edges(e) for e in edge_sets]  # validate before any forward pass
    b = target_inputs.batch_size
    per_pass = len(edge_sets) if max_rows is None else max(1, max_rows // b)
    out: list[list[float]] = []
    for s in range(0, len(edge_sets), per_pass):
        chunk = edge_sets[s:s + per_pass]
        inputs = repeat_inputs(target_inputs, len(chunk))
        with torch.no_grad():
            logits = model.run_with_hooks(inputs, vision_copy_hooks(model, source_cache, chunk))
        rows = _apply_metric(metric, logits, inputs)
        out += [rows[c * b:(c + 1) * b] for c in range(len(chunk))]
    return out


def _runs(model: "HookedVLM", clean: VLMInputs, corrupted: VLMInputs, metric: Metric
          ) -> tuple[ActivationCache, ActivationCache, list[float], list[float]]:
    check_aligned(clean, corrupted)
    if not (clean.has_images and corrupted.has_images):
        raise ValueError("the batch has no images: there are no vision edges to patch")
    names = vision_edge_names(model)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names=names)
        corrupt_logits, corrupt_cache = model.run_with_cache(corrupted, names=names)
    return (clean_cache, corrupt_cache, _apply_metric(metric, clean_logits, corrupted),
            _apply_metric(metric, corrupt_logits, corrupted))


def patch_each_vision_edge(model: "HookedVLM", clean_inputs: VLMInputs, corrupted_inputs: VLMInputs, metric: Metric,
                           edges: Optional[Sequence[Edge]] = None, max_rows: Optional[int] = 32,
                           progress: bool = False) -> EdgeScores:
    """The corrupted run with each vision edge alone given its clean value (default: every edge of
    :func:`vision_edge_graph`), several edges a forward pass; normalised like
    :func:`interp.edge_patching.patch_each_edge` (clean 1, corrupted 0)."""
    graph = vision_edge_graph(model)
    edges = graph.edges() if edges is None else graph.check_edges(edges)
    if not edges:
        raise ValueError("no edges to patch")
    check_max_rows(max_rows)
    clean_cache, _, clean_rows, corrupt_rows = _runs(model, clean_inputs, corrupted_inputs, metric)
    b = clean_inputs.batch_size
    per_pass = max(1, (max_rows or len(edges) * b) // b)
    chunks = [edges[s:s + per_pass] for s in range(0, len(edges), per_pass)]
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc=f"vision edges ({per_pass} a pass)", unit="pass")
    patched = [_mean(rows) for chunk in chunks
               for rows in patch_vision_edge_sets(model, corrupted_inputs, clean_cache, [[e] for e in chunk],
                                                  metric, None)]
    return scores_from_rows(graph, edges, patched, _mean(clean_rows), _mean(corrupt_rows),
                            {"method": METHOD, "n_rows": len(clean_rows)})


def vision_faithfulness_curve(model: "HookedVLM", clean_inputs: VLMInputs, corrupted_inputs: VLMInputs,
                              circuits: Sequence[Sequence[Edge]], metric: Metric, max_rows: Optional[int] = 32
                              ) -> list[float]:
    """How much of the clean behaviour each vision circuit keeps: the clean run with every vision edge outside it
    given the corrupted run's value, ``(metric - corrupted) / (clean - corrupted)`` of the batch means (1 for
    every edge, 0 for none; the rest of the model, the language model included, runs clean)."""
    graph = vision_edge_graph(model)
    circuits = [graph.check_edges(c) for c in circuits]
    _, corrupt_cache, clean_rows, corrupt_rows = _runs(model, clean_inputs, corrupted_inputs, metric)
    gap = _mean(clean_rows) - _mean(corrupt_rows)
    every = graph.edges()
    rests = [[e for e in every if e not in keep] for keep in map(set, circuits)]
    kept = patch_vision_edge_sets(model, clean_inputs, corrupt_cache, rests, metric, max_rows)
    return [(_mean(m) - _mean(corrupt_rows)) / gap if abs(gap) > 1e-12 else float("nan") for m in kept]


__all__ = ["PATCHES", "PROJECTOR", "VisionEdgeGraph", "apply_norm", "patch_each_vision_edge", "patch_vision_edge_sets",
           "projector_block", "vision_copy_hooks", "vision_edge_graph", "vision_edge_names",
           "vision_faithfulness_curve", "writer_deltas"]
