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
``norm(x + sum over patched writers u of (source_u - current_u))``, with the model's own norm (CLIP's LayerNorm or
Qwen2.5-VL's RMSNorm, its weights and epsilon, as a function: :func:`apply_norm`), so the residual stream and every other reader are untouched.  The
output projections' and MLPs' biases are the same in both runs and cancel in the differences.  The projector
reader is patched where it reads, the read block's ``hook_resid_post`` (nothing else that reaches the logits reads
that tensor).  Every edge patched at once is the clean run (tested, both architectures).

With ``qkv=True`` each block's attention input is split per head into ``"V{l}H{h}.q"`` / ``".k"`` / ``".v"``
readers, patched at that head's slice of the query, key or value projection (CLIP's ``q_proj`` / ``k_proj`` /
``v_proj``, a third of Qwen2.5-VL's fused ``qkv``) of the patched norm, the other heads untouched: whether a
vision head matters for where it looks, what it is found by or what it moves, as an edge question.

Every vision position is patched (every patch of every image, CLS included); the metric is read at the language
model's logits.  First-order and integrated estimates: :mod:`interp.vision_edge_attribution`.

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
from .edge_patching import _runs as paired_runs
from .edge_patching import each_alone, kept_fractions, rms_norm
from .edges import Edge, EdgeScores, checked_edges, feeds, scores_from_rows
from .hooks import HookContext, HookFn
from .inputs import VLMInputs
from .patching import Metric, _apply_metric, _mean, check_max_rows, check_source
from .steering import repeat_inputs

if TYPE_CHECKING:
    from .model import HookedVLM

PATCHES = "patches"
PROJECTOR = "projector"
METHOD = "vision_edge_patching"
_HEAD = re.compile(r"^V(\d+)H(\d+)$")
_MLP = re.compile(r"^V(\d+)\.mlp$")
_READER = re.compile(r"^V(\d+)\.(attn_in|mlp_in)$")
_QKV = re.compile(r"^V(\d+)H(\d+)\.(q|k|v)$")
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class VisionEdgeGraph:
    """The writers, readers and edges of the ``n_layers`` vision blocks of ``n_heads`` heads the projector reads
    (module docstring; ``qkv`` splits each attention input per head).  The same interface as
    :class:`interp.edges.EdgeGraph`, so :class:`~interp.edges.EdgeScores` and :func:`~interp.edges.greedy_circuit`
    work on it."""

    n_layers: int
    n_heads: int
    qkv: bool = False
    tower: str = "vision"

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1:
            raise ValueError(f"a vision edge graph needs >= 1 block and head, got {self.n_layers} / {self.n_heads}")

    @property
    def upstream(self) -> list[str]:
        out = [PATCHES]
        for l in range(self.n_layers):
            out += [f"V{l}H{h}" for h in range(self.n_heads)] + [f"V{l}.mlp"]
        return out

    @property
    def downstream(self) -> list[str]:
        return [r for l in range(self.n_layers) for r in self.attention_readers(l) + [f"V{l}.mlp_in"]] + [PROJECTOR]

    def attention_readers(self, layer: int) -> list[str]:
        """Block ``layer``'s attention readers: ``["V{l}.attn_in"]``, or with ``qkv`` every head's query, then
        key, then value."""
        if not self.qkv:
            return [f"V{layer}.attn_in"]
        return [f"V{layer}H{h}.{c}" for c in QKV for h in range(self.n_heads)]

    @property
    def output(self) -> str:
        """The reader the graph ends in (circuits grow backwards from it)."""
        return PROJECTOR

    def head_inputs(self, layer: int, head: int) -> list[str]:
        return [f"V{layer}H{head}.{c}" for c in QKV] if self.qkv else [f"V{layer}.attn_in"]

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
        """``(kind, layer)``: kind ``"attn_in"``, ``"q"`` / ``"k"`` / ``"v"``, ``"mlp_in"`` or ``"projector"``
        (layer ``n_layers``)."""
        kind, layer, _ = self.reader_parts(label)
        return kind, layer

    def reader_parts(self, label: str) -> tuple[str, int, Optional[int]]:
        """``(kind, layer, head)`` of a reader label (head for a query/key/value reader, else None); raises for a
        label of the other granularity."""
        if label == PROJECTOR:
            return PROJECTOR, self.n_layers, None
        m = _READER.match(label) if isinstance(label, str) else None
        if m is not None and int(m.group(1)) < self.n_layers:
            if m.group(2) == "attn_in" and self.qkv:
                raise ValueError(f"reader {label!r} is not in a graph split per head (qkv=True): its heads read "
                                 f"through 'V{m.group(1)}H{{h}}.q' / '.k' / '.v'")
            return m.group(2), int(m.group(1)), None
        m = _QKV.match(label) if isinstance(label, str) else None
        if m is not None and int(m.group(1)) < self.n_layers and int(m.group(2)) < self.n_heads:
            if not self.qkv:
                raise ValueError(f"reader {label!r} is one head's {m.group(3)}: pass qkv=True for the graph split "
                                 f"per head")
            return m.group(3), int(m.group(1)), int(m.group(2))
        raise ValueError(f"unknown vision reader {label!r} for {self.n_layers} blocks of {self.n_heads} heads: "
                         f"readers are 'V{{l}}.attn_in' (split per head 'V{{l}}H{{h}}.q' / '.k' / '.v'), "
                         f"'V{{l}}.mlp_in' and 'projector'")

    def is_edge(self, writer: str, reader: str) -> bool:
        return feeds(self.writer(writer), self.reader(reader))

    def edges(self) -> list[Edge]:
        """Every edge, readers in execution order, writers in execution order within each."""
        return [(u, v) for v in self.downstream for u in self.upstream if self.is_edge(u, v)]

    def check_edges(self, edges: Iterable[Edge]) -> list[Edge]:
        """``edges`` as ``(writer, reader)`` tuples, each checked; raises naming the first bad one."""
        return checked_edges(self, edges, _edge_set(self))


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


def vision_edge_graph(model: "HookedVLM", qkv: bool = False) -> VisionEdgeGraph:
    """The vision edge graph of ``model``: the blocks up to the one the projector reads (``qkv``: split per
    head)."""
    return VisionEdgeGraph(n_layers=projector_block(model) + 1, n_heads=model.head_counts["vision"][0], qkv=qkv)


def vision_graph_of(model: "HookedVLM", edges: Iterable[Edge]) -> VisionEdgeGraph:
    """The graph a set of edges belongs to: split per head when any reader is a head's query, key or value."""
    split = any(isinstance(e, (tuple, list)) and len(e) == 2 and isinstance(e[1], str) and _QKV.match(e[1])
                for e in edges)
    return vision_edge_graph(model, qkv=split)


def qkv_weights(model: "HookedVLM", layer: int, kind: str) -> tuple[Tensor, Optional[Tensor]]:
    """Vision block ``layer``'s query, key or value projection per head: weight ``[head, d_head, d]`` and bias
    ``[head, d_head]`` (None without): CLIP's ``q_proj`` / ``k_proj`` / ``v_proj``, or a third of Qwen2.5-VL's
    fused ``qkv``."""
    site = f"vision.blocks.{layer}.attn.hook_{kind}"
    module = get_module(model.hf_model, model.site(site).module)
    w, b = module.weight, module.bias
    n_heads = model.head_counts["vision"][0]
    if model.site(site).module.endswith("qkv"):  # fused [q | k | v] rows
        n = w.shape[0] // 3
        i = QKV.index(kind)
        w, b = w[i * n:(i + 1) * n], None if b is None else b[i * n:(i + 1) * n]
    return w.reshape(n_heads, -1, w.shape[-1]), None if b is None else b.reshape(n_heads, -1)


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
    """``(input, site, normed)``: where the reader's input is recorded, where it is patched, and whether it reads
    through a norm (whose module then computes the patched value; the projector reads the residual stream
    itself).  A query/key/value reader is patched at its projection's site, one head's slice."""
    kind, layer, _ = graph.reader_parts(reader)
    if kind == PROJECTOR:
        name = f"vision.blocks.{layer - 1}.hook_resid_post"
        return name, name, False
    if kind in QKV:
        return f"vision.blocks.{layer}.hook_resid_pre", f"vision.blocks.{layer}.attn.hook_{kind}", True
    if kind == "attn_in":
        return f"vision.blocks.{layer}.hook_resid_pre", f"vision.blocks.{layer}.ln1.hook_normalized", True
    return f"vision.blocks.{layer}.hook_resid_mid", f"vision.blocks.{layer}.ln2.hook_normalized", True


def norm_site(graph: VisionEdgeGraph, reader: str) -> str:
    """The norm output a (normed) reader reads through: ``ln1`` for attention readers, ``ln2`` for the MLP's."""
    kind, layer, _ = graph.reader_parts(reader)
    return f"vision.blocks.{layer}.{'ln2' if kind == 'mlp_in' else 'ln1'}.hook_normalized"


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


def vision_copy_hooks(model: "HookedVLM", source_cache: ActivationCache, edge_sets: Sequence[Sequence[Edge]],
                      qkv: Optional[bool] = None) -> list[tuple[str, HookFn]]:
    """Hooks for a batch repeated once per edge set (:func:`interp.steering.repeat_inputs`): copy ``c`` of the
    images gets ``edge_sets[c]`` patched from ``source_cache`` (which holds :func:`vision_edge_names` of a run
    with one copy's images), each set exactly as alone.  ``qkv``: which graph (None: split per head when any
    reader is a head's query, key or value)."""
    graph = vision_graph_of(model, [e for edges in edge_sets for e in edges]) if qkv is None else \
        vision_edge_graph(model, qkv=qkv)
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
        module = get_module(model.hf_model, model.site(norm_site(graph, reader)).module) if normed else None
        kind, layer, head = graph.reader_parts(reader)
        proj = qkv_weights(model, layer, kind) if kind in QKV else None

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
                new = new if module is None else apply_norm(module, new)
                if proj is None:
                    out[rows] = new.to(out.dtype)
                else:  # one head's slice of the projection of the patched norm
                    w, bias = proj
                    out[rows, ..., head, :] = F.linear(new.to(w.dtype), w[head],
                                                       None if bias is None else bias[head]).to(out.dtype)
            return out
        return hook

    hooks += [(_reader_names(graph, v)[1], patch(v, copies)) for v, copies in per_copy.items()]
    return hooks


def _graph(model: "HookedVLM", edges: Iterable[Edge], qkv: Optional[bool]) -> VisionEdgeGraph:
    return vision_graph_of(model, edges) if qkv is None else vision_edge_graph(model, qkv=qkv)


def patch_vision_edge_sets(model: "HookedVLM", target_inputs: VLMInputs, source_cache: ActivationCache,
                           edge_sets: Sequence[Sequence[Edge]], metric: Metric, max_rows: Optional[int] = 32,
                           qkv: Optional[bool] = None) -> list[list[float]]:
    """``metric`` per row of the target with each of ``edge_sets`` patched from ``source_cache``, several sets a
    forward pass (the target repeated, at most ``max_rows`` rows a pass; None: all at once).  ``qkv`` as in
    :func:`vision_copy_hooks`."""
    check_max_rows(max_rows)
    if not target_inputs.has_images:
        raise ValueError("the batch has no images: there are no vision edges to patch")
    check_source(source_cache, target_inputs, vision_edge_names(model))
    graph = _graph(model, [e for edges in edge_sets for e in edges], qkv)
    edge_sets = [graph.check_edges(e) for e in edge_sets]  # validate before any forward pass
    b = target_inputs.batch_size
    per_pass = len(edge_sets) if max_rows is None else max(1, max_rows // b)
    out: list[list[float]] = []
    for s in range(0, len(edge_sets), per_pass):
        chunk = edge_sets[s:s + per_pass]
        inputs = repeat_inputs(target_inputs, len(chunk))
        with torch.no_grad():
            logits = model.run_with_hooks(inputs, vision_copy_hooks(model, source_cache, chunk, qkv=graph.qkv))
        rows = _apply_metric(metric, logits, inputs)
        out += [rows[c * b:(c + 1) * b] for c in range(len(chunk))]
    return out


def _runs(model: "HookedVLM", clean: VLMInputs, corrupted: VLMInputs, metric: Metric):
    if not (clean.has_images and corrupted.has_images):
        raise ValueError("the batch has no images: there are no vision edges to patch")
    return paired_runs(model, clean, corrupted, metric, vision_edge_names(model))


def patch_each_vision_edge(model: "HookedVLM", clean_inputs: VLMInputs, corrupted_inputs: VLMInputs, metric: Metric,
                           edges: Optional[Sequence[Edge]] = None, max_rows: Optional[int] = 32,
                           progress: bool = False, qkv: Optional[bool] = None) -> EdgeScores:
    """The corrupted run with each vision edge alone given its clean value (default: every edge of
    :func:`vision_edge_graph`, split per head with ``qkv=True``), several edges a forward pass; normalised like
    :func:`interp.edge_patching.patch_each_edge` (clean 1, corrupted 0)."""
    graph = _graph(model, edges or [], qkv)
    edges = graph.edges() if edges is None else graph.check_edges(edges)
    if not edges:
        raise ValueError("no edges to patch")
    check_max_rows(max_rows)
    clean_cache, _, clean_rows, corrupt_rows = _runs(model, clean_inputs, corrupted_inputs, metric)
    patched = each_alone(edges, clean_inputs.batch_size, max_rows, progress, "vision edges",
                         lambda sets: patch_vision_edge_sets(model, corrupted_inputs, clean_cache, sets, metric, None,
                                                             qkv=graph.qkv))
    return scores_from_rows(graph, edges, patched, _mean(clean_rows), _mean(corrupt_rows),
                            {"method": METHOD, "n_rows": len(clean_rows)})


def vision_faithfulness_curve(model: "HookedVLM", clean_inputs: VLMInputs, corrupted_inputs: VLMInputs,
                              circuits: Sequence[Sequence[Edge]], metric: Metric, max_rows: Optional[int] = 32,
                              qkv: Optional[bool] = None) -> list[float]:
    """How much of the clean behaviour each vision circuit keeps: the clean run with every vision edge outside it
    given the corrupted run's value, ``(metric - corrupted) / (clean - corrupted)`` of the batch means (1 for
    every edge, 0 for none; the rest of the model, the language model included, runs clean).  ``qkv``: the graph
    whose other edges are corrupted (None: the one the circuits' edges belong to)."""
    graph = _graph(model, [e for c in circuits for e in c], qkv)
    circuits = [graph.check_edges(c) for c in circuits]
    _, corrupt_cache, clean_rows, corrupt_rows = _runs(model, clean_inputs, corrupted_inputs, metric)
    every = graph.edges()
    rests = [[e for e in every if e not in keep] for keep in map(set, circuits)]
    kept = patch_vision_edge_sets(model, clean_inputs, corrupt_cache, rests, metric, max_rows, qkv=graph.qkv)
    return kept_fractions(kept, clean_rows, corrupt_rows)


__all__ = ["PATCHES", "PROJECTOR", "QKV", "VisionEdgeGraph", "apply_norm", "norm_site", "patch_each_vision_edge",
           "patch_vision_edge_sets", "projector_block", "qkv_weights", "vision_copy_hooks", "vision_edge_graph",
           "vision_edge_names", "vision_faithfulness_curve", "vision_graph_of", "writer_deltas"]
