"""The language model as a graph of edges between components: what edge patching and edge attribution address.

Why edges and not sites: patching a site (:mod:`interp.patching`) changes every path through it at once, so
it cannot say whether head L1H0 matters because it writes into the logits directly or because the MLP after
it reads what it wrote.  The residual stream is a sum, so each component reads the sum of what every earlier
component wrote, and each *edge* (writer -> reader) can be patched on its own: give one reader the clean
value of one writer while every other reader sees the run as it is (path patching; the graph ACDC and
EAP search).

Nodes, with short labels in the style of :mod:`interp.head_patching`'s ``L{l}H{h}``:

- writers (``upstream``): ``"image"`` and ``"text"`` (the block-0 input, ``hook_embed``, at the image and the
  text positions: the image node stands for the whole vision tower and projector), every head ``"L{l}H{h}"``
  (its slice of the output projection) and every MLP ``"L{l}.mlp"``;
- readers (``downstream``): each block's attention input ``"L{l}.attn_in"`` (the input of ``ln1``; the heads of
  a block share it, so an edge into it reaches all of its heads and their queries, keys and values alike),
  each MLP input ``"L{l}.mlp_in"`` (the input of ``ln2``) and ``"logits"`` (the input of the final norm).
- with ``qkv=True`` (the graph of EAP and ACDC), the attention input is split per head and per input instead:
  ``"L{l}H{h}.q"`` for each query head and ``"L{l}H{g}.k"`` / ``"L{l}H{g}.v"`` for each key/value head ``g``
  (with grouped-query attention, Qwen2.5-VL's, key/value head ``g`` serves query heads ``g * n_heads /
  n_kv_heads`` onwards, so a head's inputs are its own query and its group's key and value).  Whether a
  head matters as what it looks for (query), what it is found by (key) or what it moves (value) is then an
  edge question.

A writer feeds every reader after it: heads of block l feed block l's MLP and every later block; an MLP feeds
every later block.  The writers add up to each reader's input exactly (no architecture here has an output
projection bias or an additive position embedding; :mod:`interp.attribution` relies on the same identity).

>>> from interp.tiny import tiny_vlm
>>> g = edge_graph(tiny_vlm("llava", n_layers=2))
>>> g.upstream[:4], g.downstream
(['image', 'text', 'L0H0', 'L0H1'], ['L0.attn_in', 'L0.mlp_in', 'L1.attn_in', 'L1.mlp_in', 'logits'])
>>> g.is_edge("L0H1", "L0.mlp_in"), g.is_edge("L1.mlp", "L1.attn_in"), len(g.edges())
(True, False, 38)
>>> q = edge_graph(tiny_vlm("llava", n_layers=2), qkv=True)
>>> q.downstream[:3], len(q.downstream), len(q.edges())
(['L0H0.q', 'L0H1.q', 'L0H2.q'], 27, 137)
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import numpy as np

from .io import JsonRecord, json_number
from .patching import normalised

if TYPE_CHECKING:
    from .model import HookedVLM

Edge = tuple[str, str]

EMBED_NODES = ("image", "text")
_HEAD = re.compile(r"^L(\d+)H(\d+)$")
_MLP = re.compile(r"^L(\d+)\.mlp$")
_READER = re.compile(r"^L(\d+)\.(attn_in|mlp_in)$")
_QKV = re.compile(r"^L(\d+)H(\d+)\.(q|k|v)$")
QKV = ("q", "k", "v")


def edge_names(model: "HookedVLM") -> list[str]:
    """The hook names a source cache needs for edge patching: ``hook_embed``, every ``attn.hook_z`` and every
    ``hook_mlp_out`` of the language model."""
    n = model.n_layers
    return (["hook_embed"] + [f"blocks.{l}.attn.hook_z" for l in range(n)]
            + [f"blocks.{l}.hook_mlp_out" for l in range(n)])


def reader_input_name(model: "HookedVLM", reader: str) -> str:
    """The hook name of a reader's input: ``blocks.{l}.hook_resid_pre`` (attention and query/key/value readers)
    / ``hook_resid_mid`` or the last block's ``hook_resid_post`` for ``"logits"``."""
    if reader == "logits":
        return f"blocks.{model.n_layers - 1}.hook_resid_post"
    layer, kind, _ = _reader(reader)
    return f"blocks.{layer}.hook_resid_mid" if kind == "mlp_in" else f"blocks.{layer}.hook_resid_pre"


def reader_norm_name(model: "HookedVLM", reader: str) -> str:
    """The hook name of a reader's normalised input (``ln1`` / ``ln2`` / the final norm's output).  For the
    block-level readers that is what the reader itself consumes, so a change there reaches that reader alone;
    a query/key/value reader shares ``ln1``'s output with its block and is reached at
    :func:`reader_site_name`."""
    if reader == "logits":
        return "ln_final.hook_normalized"
    layer, kind, _ = _reader(reader)
    return f"blocks.{layer}.ln2.hook_normalized" if kind == "mlp_in" else f"blocks.{layer}.ln1.hook_normalized"


def reader_site_name(model: "HookedVLM", reader: str) -> str:
    """The hook name where a reader alone is reached (patched, differentiated): its norm's output
    (:func:`reader_norm_name`), or for a query/key/value reader its projection, ``blocks.{l}.attn.hook_q`` /
    ``hook_k`` / ``hook_v`` (one head's slice of it)."""
    if reader != "logits":
        layer, kind, _ = _reader(reader)
        if kind in QKV:
            return f"blocks.{layer}.attn.hook_{kind}"
    return reader_norm_name(model, reader)


def _reader(label: str) -> tuple[int, str, Optional[int]]:
    """``(layer, kind, head)`` of a reader label other than ``"logits"`` (head None for the block-level ones)."""
    m = _READER.match(label)
    if m is not None:
        return int(m.group(1)), m.group(2), None
    m = _QKV.match(label)
    if m is not None:
        return int(m.group(1)), m.group(3), int(m.group(2))
    raise ValueError(f"unknown reader {label!r}: readers are 'L{{l}}.attn_in' (or, split per head, "
                     f"'L{{l}}H{{h}}.q' / '.k' / '.v'), 'L{{l}}.mlp_in' and 'logits'")


@dataclass(frozen=True)
class EdgeGraph:
    """The writers, readers and edges of a language model with ``n_layers`` blocks of ``n_heads`` heads
    (``n_kv_heads`` key/value heads, default ``n_heads``, kept only with ``qkv``); ``qkv`` splits each block's attention input into
    its heads' queries, keys and values (module docstring)."""

    n_layers: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    qkv: bool = False

    def __post_init__(self) -> None:
        kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if kv < 1 or self.n_heads % kv:
            raise ValueError(f"n_kv_heads must divide n_heads ({self.n_heads}), got {self.n_kv_heads!r}")
        # only the graph split per head has key/value readers; without it the count is not part of the graph
        object.__setattr__(self, "n_kv_heads", kv if self.qkv else self.n_heads)

    @property
    def upstream(self) -> list[str]:
        out = list(EMBED_NODES)
        for l in range(self.n_layers):
            out += [f"L{l}H{h}" for h in range(self.n_heads)] + [f"L{l}.mlp"]
        return out

    @property
    def downstream(self) -> list[str]:
        return [r for l in range(self.n_layers) for r in self.attention_readers(l) + [f"L{l}.mlp_in"]] + ["logits"]

    def attention_readers(self, layer: int) -> list[str]:
        """Block ``layer``'s attention readers: ``["L{l}.attn_in"]``, or with ``qkv`` every query head's, then
        every key head's, then every value head's."""
        if not self.qkv:
            return [f"L{layer}.attn_in"]
        return ([f"L{layer}H{h}.q" for h in range(self.n_heads)] + [f"L{layer}H{g}.k" for g in range(self.n_kv_heads)]
                + [f"L{layer}H{g}.v" for g in range(self.n_kv_heads)])

    @property
    def output(self) -> str:
        """The reader the graph ends in (circuits grow backwards from it)."""
        return "logits"

    def mlp_input(self, layer: int) -> str:
        return f"L{layer}.mlp_in"

    def head_inputs(self, layer: int, head: int) -> list[str]:
        """The readers a head computes from: ``["L{l}.attn_in"]``, or with ``qkv`` its query and its group's key
        and value."""
        if not self.qkv:
            return [f"L{layer}.attn_in"]
        g = head // (self.n_heads // self.n_kv_heads)
        return [f"L{layer}H{head}.q", f"L{layer}H{g}.k", f"L{layer}H{g}.v"]

    def writer(self, label: str) -> tuple[str, Optional[int], Optional[int]]:
        """``(kind, layer, head)`` of a writer label: kind ``"image"``, ``"text"``, ``"head"`` or ``"mlp"``."""
        if label in EMBED_NODES:
            return label, None, None
        m = _HEAD.match(label)
        if m is not None and int(m.group(1)) < self.n_layers and int(m.group(2)) < self.n_heads:
            return "head", int(m.group(1)), int(m.group(2))
        m = _MLP.match(label)
        if m is not None and int(m.group(1)) < self.n_layers:
            return "mlp", int(m.group(1)), None
        raise ValueError(f"unknown writer {label!r} for {self.n_layers} blocks of {self.n_heads} heads: writers are "
                         f"'image', 'text', 'L{{l}}H{{h}}' and 'L{{l}}.mlp'")

    def reader(self, label: str) -> tuple[str, int]:
        """``(kind, layer)`` of a reader label: kind ``"attn_in"``, ``"q"`` / ``"k"`` / ``"v"``, ``"mlp_in"`` or
        ``"logits"`` (layer ``n_layers``)."""
        kind, layer, _ = self.reader_parts(label)
        return kind, layer

    def reader_parts(self, label: str) -> tuple[str, int, Optional[int]]:
        """``(kind, layer, head)`` of a reader label (head: the query or key/value head, else None); raises for a
        label of the other granularity (``L{l}.attn_in`` in a ``qkv`` graph and the reverse)."""
        if label == "logits":
            return "logits", self.n_layers, None
        layer, kind, head = _reader(label)
        if layer >= self.n_layers:
            raise ValueError(f"reader {label!r}: the model has {self.n_layers} blocks")
        if kind == "attn_in" and self.qkv:
            raise ValueError(f"reader {label!r} is not in a graph split per head (qkv=True): its heads read "
                             f"through 'L{layer}H{{h}}.q' / '.k' / '.v'")
        if kind in QKV:
            if not self.qkv:
                raise ValueError(f"reader {label!r} is one head's {kind}: pass qkv=True for the graph split per head "
                                 f"(without it, block {layer}'s heads read through 'L{layer}.attn_in')")
            limit = self.n_heads if kind == "q" else self.n_kv_heads
            if head >= limit:
                raise ValueError(f"reader {label!r}: block {layer} has {limit} {'query' if kind == 'q' else 'key/value'}"
                                 f" heads")
        return kind, layer, head

    def is_edge(self, writer: str, reader: str) -> bool:
        """Whether ``writer``'s output is part of ``reader``'s input (raises for unknown labels)."""
        return feeds(self.writer(writer), self.reader(reader))

    def edge_mask(self) -> np.ndarray:
        """``mask[i, j]``: whether ``upstream[i] -> downstream[j]`` is an edge (:meth:`is_edge` for every pair at
        once; the graph split per head has ~1.6M pairs at 7B sizes, seconds one pair at a time)."""
        w_layer = np.array([-1, -1] + [l for l in range(self.n_layers) for _ in range(self.n_heads + 1)])
        w_head = np.array([False, False] + [h < self.n_heads for _ in range(self.n_layers)
                                            for h in range(self.n_heads + 1)])
        r_layer, r_mlp = [], []
        for l in range(self.n_layers):
            readers = self.attention_readers(l) + [f"L{l}.mlp_in"]
            r_layer += [l] * len(readers)
            r_mlp += [False] * (len(readers) - 1) + [True]
        r_layer, r_mlp = np.array(r_layer + [self.n_layers]), np.array(r_mlp + [False])
        wl, rl = w_layer[:, None], r_layer[None, :]
        return (wl < 0) | (wl < rl) | (w_head[:, None] & r_mlp[None, :] & (wl == rl))

    def edges(self) -> list[Edge]:
        """Every edge, readers in execution order, writers in execution order within each."""
        up, down = self.upstream, self.downstream
        rows, cols = np.nonzero(self.edge_mask().T)
        return [(up[i], down[j]) for j, i in zip(rows.tolist(), cols.tolist())]

    def check_edges(self, edges: Iterable[Edge]) -> list[Edge]:
        """``edges`` as a list of ``(writer, reader)`` tuples, every one checked; raises naming the first bad one."""
        return checked_edges(self, edges, _edge_set(self))


def feeds(writer: tuple[str, Optional[int], Optional[int]], reader: tuple[str, int]) -> bool:
    """Whether a writer ``(kind, layer, head)`` feeds a reader ``(kind, layer)`` in a pre-norm residual stream:
    the embeddings (layer None) feed every reader, a head feeds its own block's MLP and everything after, an MLP
    only later blocks' readers and the output."""
    kind, layer, _ = writer
    r_kind, r_layer = reader
    if layer is None:
        return True
    if kind == "head" and r_kind == "mlp_in":
        return layer <= r_layer
    return layer < r_layer  # attention readers (block or q/k/v), MLP into a later block, the output


def checked_edges(graph: Any, edges: Iterable[Edge], known: frozenset[Edge]) -> list[Edge]:
    """``edges`` as ``(writer, reader)`` tuples of ``graph`` (any graph with ``is_edge``), each looked up in
    ``known`` (its edges) first and its labels parsed only on a miss; raises naming the first bad one."""
    out = []
    for e in edges:
        try:
            hit = isinstance(e, tuple) and e in known  # the common case, without parsing labels
        except TypeError:  # an unhashable part: reported below
            hit = False
        if hit:
            out.append(e)
            continue
        if not (isinstance(e, (tuple, list)) and len(e) == 2 and all(isinstance(x, str) for x in e)):
            raise ValueError(f"an edge is a (writer, reader) pair of labels, got {e!r}")
        u, v = e
        if not graph.is_edge(u, v):
            raise ValueError(f"no edge {u!r} -> {v!r}: {u!r} runs after {v!r} reads the residual stream")
        out.append((u, v))
    return out


@functools.lru_cache(maxsize=4)
def _edge_set(graph: EdgeGraph) -> frozenset[Edge]:
    """Every edge of a graph, kept for the few graphs a session uses (checking a circuit's complement at 7B
    sizes is ~1.6M lookups)."""
    return frozenset(graph.edges())


def edge_graph(model: "HookedVLM", qkv: bool = False) -> EdgeGraph:
    """The edge graph of ``model``'s language model; ``qkv`` splits attention inputs per head's query, key and
    value."""
    n_q, n_kv = model.head_counts["lm"]
    return EdgeGraph(n_layers=model.n_layers, n_heads=n_q, n_kv_heads=n_kv, qkv=qkv)


def graph_of(model: "HookedVLM", edges: Iterable[Edge]) -> EdgeGraph:
    """The graph a set of edges belongs to: split per head (``qkv``) when any reader is a head's query, key or
    value."""
    return edge_graph(model, qkv=any(isinstance(e, (tuple, list)) and len(e) == 2 and isinstance(e[1], str)
                                     and _QKV.match(e[1]) is not None for e in edges))


@dataclass
class EdgeScores(JsonRecord):
    """A metric per edge, by patching or estimated; ``effects[i, j]`` is edge ``upstream[i] -> downstream[j]``,
    normalised to clean = 1, corrupted = 0 (NaN where there is no edge).

    ``patched[i, j]`` is the batch-mean metric of the corrupted run with that edge alone given its clean value
    (an estimate when ``meta["method"] == "attribution"``); ``clean`` / ``corrupted`` the batch means of the two
    runs.
    """

    upstream: list[str]
    downstream: list[str]
    patched: np.ndarray
    clean: float
    corrupted: float
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.patched = np.asarray(self.patched, dtype=float)
        if self.patched.shape != (len(self.upstream), len(self.downstream)):
            raise ValueError(f"patched has shape {self.patched.shape}, expected "
                             f"{(len(self.upstream), len(self.downstream))} (writers x readers)")

    @property
    def graph(self) -> EdgeGraph:
        """The graph these scores are over (from the labels; a vision tower's, :mod:`interp.vision_edges`, when the
        writers start with its ``"patches"``)."""
        n_layers = sum(1 for v in self.downstream if v.endswith(".mlp_in"))
        if self.upstream[:1] == ["patches"]:
            from .vision_edges import VisionEdgeGraph

            split = any(v.endswith(".q") for v in self.downstream)
            return VisionEdgeGraph(n_layers=n_layers, n_heads=(len(self.upstream) - 1) // max(n_layers, 1) - 1,
                                   qkv=split)
        n_heads = (len(self.upstream) - 2) // n_layers - 1 if n_layers else 0
        n_kv = sum(1 for v in self.downstream if v.startswith("L0H") and v.endswith(".k"))
        return EdgeGraph(n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv or None, qkv=bool(n_kv))

    @property
    def effects(self) -> np.ndarray:
        """``(patched - corrupted) / (clean - corrupted)``; all NaN where clean and corrupted agree."""
        return normalised(self.patched, self.clean, self.corrupted)

    def value(self, writer: str, reader: str) -> float:
        """The normalised effect of one edge."""
        try:
            i, j = self.upstream.index(writer), self.downstream.index(reader)
        except ValueError:
            raise KeyError(f"no edge {writer!r} -> {reader!r} in these scores") from None
        return float(self.effects[i, j])

    def ranked(self, by_abs: bool = True) -> list[tuple[str, str, float]]:
        """Every scored edge, largest effect first (``by_abs``: largest absolute effect): ``[(writer, reader,
        effect), ...]``.  Ties keep the graph's order."""
        eff = self.effects
        cells = [(i, j) for j in range(eff.shape[1]) for i in range(eff.shape[0]) if np.isfinite(eff[i, j])]
        key = (lambda c: -abs(eff[c])) if by_abs else (lambda c: -eff[c])
        return [(self.upstream[i], self.downstream[j], float(eff[i, j])) for i, j in sorted(cells, key=key)]

    def top(self, k: int = 10, by_abs: bool = True) -> list[Edge]:
        """The ``k`` edges with the largest (absolute) effect, as ``(writer, reader)`` pairs: a circuit to test
        with :func:`interp.edge_patching.circuit_faithfulness`."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        return [(u, v) for u, v, _ in self.ranked(by_abs)[:k]]

    def to_dict(self) -> dict[str, Any]:
        return {"format": "interp.EdgeScores", "upstream": list(self.upstream), "downstream": list(self.downstream),
                "patched": self.patched.tolist(), "clean": self.clean, "corrupted": self.corrupted,
                "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EdgeScores":
        if d.get("format") != "interp.EdgeScores":
            raise ValueError(f"not an EdgeScores (format {d.get('format')!r})")
        patched = np.array([[json_number(x) for x in row] for row in d["patched"]], dtype=float)
        return cls(upstream=list(d["upstream"]), downstream=list(d["downstream"]), patched=patched,
                   clean=json_number(d["clean"]), corrupted=json_number(d["corrupted"]), meta=dict(d.get("meta", {})))


def input_readers(graph: EdgeGraph, writer: str) -> list[str]:
    """The readers a writer computes from: a head's attention input (or its query and its group's key and
    value), an MLP's input, none for the embeddings (the graph's sources)."""
    kind, layer, head = graph.writer(writer)
    if layer is None:
        return []
    return graph.head_inputs(layer, head) if kind == "head" else [graph.mlp_input(layer)]


def input_reader(graph: EdgeGraph, writer: str) -> Optional[str]:
    """The one reader a writer computes from in a graph not split per head (:func:`input_readers`)."""
    if graph.qkv:
        raise ValueError("in a graph split per head a head has three inputs: use input_readers")
    readers = input_readers(graph, writer)
    return readers[0] if readers else None


def greedy_circuit(scores: EdgeScores, k: int, by_abs: bool = True) -> list[Edge]:
    """``k`` edges grown backwards from the logits (a vision graph's: the projector), best first: at each step the
    highest-ranked edge whose reader already feeds the circuit (the logits, or the input of a component one of its
    edges comes from).

    Why not simply :meth:`EdgeScores.top`: the effect of an edge patched alone includes everything upstream of
    its writer (the source run computed it), but in a circuit a writer whose own inputs are all corrupted writes
    its corrupted value, so the top edges alone can keep nothing (a head's edge without the edges into its
    input).  Growing from the logits keeps every edge on a path to the output (Hanna et al. 2024's greedy
    construction).  Fewer than ``k`` edges come back when no more are connected.
    """
    return grow_circuit(scores.graph, [(u, v) for u, v, _ in scores.ranked(by_abs)], k)


def grow_circuit(graph: EdgeGraph, ranked: Sequence[Edge], k: int) -> list[Edge]:
    """:func:`greedy_circuit` from any ranking of edges, best first (e.g. a random order, as a floor)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    ranked = graph.check_edges(ranked)
    active, chosen = {graph.output}, []
    while len(chosen) < k:
        nxt = next((e for e in ranked if e[1] in active), None)
        if nxt is None:
            break
        ranked.remove(nxt)
        chosen.append(nxt)
        active.update(input_readers(graph, nxt[0]))
    return chosen


def scores_from_rows(graph: EdgeGraph, edges: Sequence[Edge], patched: Sequence[float], clean: float,
                     corrupted: float, meta: dict[str, Any]) -> EdgeScores:
    """An :class:`EdgeScores` with ``patched[k]`` at edge ``edges[k]`` and NaN elsewhere."""
    up, down = graph.upstream, graph.downstream
    row, col = {u: i for i, u in enumerate(up)}, {v: j for j, v in enumerate(down)}
    grid = np.full((len(up), len(down)), np.nan)
    for (u, v), x in zip(edges, patched):
        grid[row[u], col[v]] = x
    return EdgeScores(upstream=up, downstream=down, patched=grid, clean=clean, corrupted=corrupted, meta=meta)
