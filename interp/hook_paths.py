"""Where a hook's edit acts: what a steering hook writes into the residual stream, given to one reader at a time.

Why: a steering vector added at block ``l``'s input (MLLMEraser's, or any ``run_with_hooks`` edit of the residual
stream) reaches the output along many paths: straight to the logits through the final norm, and through every
attention and MLP input after it, which then write on.  Direct logit attribution (:mod:`interp.attribution`)
gives the straight path's share to first order; site patching (:func:`interp.patching.patch_hooks`) says which
later activations carry the change.  Here the hook is one more writer of the edge graph (:mod:`interp.edges`):
its write ``delta`` (what it changed at its site, recorded in the hooked run) is given to one reader alone, in
the plain run, exactly as edge patching gives a reader one writer's clean value (``norm(x + delta)`` at the
reader's norm, or that head's slice of its query, key or value projection with ``qkv``).  The effect of each
path is then the metric of that run against the plain and the hooked runs: 0 = plain, 1 = the hook's whole
effect.  Every reader given the write at once is the hooked run itself (tested), so the paths are a complete
decomposition; they need not add up, since paths interact.

The same works at any later answer token of a hooked generation (``answer_step=t``): the writes are recorded
step by step while generating (:func:`generation_writes`), the answer so far is teacher-forced, and one forward
pass of prompt + answer with every write added is the hooked generation's step ``t`` exactly (tested); an eraser
that also steers its first answer tokens can then be asked whether a token's refusal comes from that token's own
write or from the prompt's, read back through attention (``positions="answer"`` / ``"prompt"``).

Hooks must edit residual-stream sites (``blocks.{l}.hook_resid_pre`` / ``hook_resid_post``): the write is then a
term of every later reader's input.  Several hooks are several writers; each reader gets the sum of the writes
before it.  Readers at or after the first block a hook changed are scored (earlier ones see nothing; a hook
that only reads, such as a gate's reader, opens no path).

>>> import torch
>>> from interp.tiny import tiny_vlm
>>> from interp.patching import logit_diff
>>> model = tiny_vlm("llava", n_layers=2)
>>> inputs = model.encode(images=[None], prompts=["who is this"])
>>> v = torch.ones(model.d_model)
>>> paths = hook_paths(model, inputs, [("blocks.1.hook_resid_pre", lambda x, ctx: x + v)], logit_diff(5, 6))
>>> paths.readers, abs(paths.all_readers - paths.hooked) < 1e-4   # every path at once: the hooked run
(['L1.attn_in', 'L1.mlp_in', 'logits'], True)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .attribution_patching import check_steps
from .edge_attribution import grad_names, reader_grads
from .edge_patching import norm_module, put_reader_input, reader_heads, rms_norm
from .gradients import run_with_grads
from .edges import EdgeGraph, edge_graph, reader_input_name, reader_site_name
from .hooks import HookContext, HookFn, HookSpec, expand_hooks, first_steps
from .inputs import VLMInputs
from .io import JsonRecord, json_number
from .patching import Metric, PositionSpec, _apply_metric, _mean, _patch_mask, _position_label, normalised
from .steering import repeat_inputs

if TYPE_CHECKING:
    from .model import HookedVLM

_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


@dataclass
class HookPaths(JsonRecord):
    """A hook's effect through each reader alone: ``patched[j]`` is the batch-mean metric of the plain run with
    reader ``readers[j]`` alone given the hook's write; ``plain`` / ``hooked`` the two runs' means, and
    ``all_readers`` every reader given it at once (= ``hooked`` when patched, a check; the summed estimate when
    estimated, ``meta["method"]``)."""

    readers: list[str]
    patched: np.ndarray
    plain: float
    hooked: float
    all_readers: float
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.patched = np.asarray(self.patched, dtype=float)
        if self.patched.shape != (len(self.readers),):
            raise ValueError(f"patched has shape {self.patched.shape}, expected ({len(self.readers)},): one per reader")

    @property
    def effects(self) -> np.ndarray:
        """``(patched - plain) / (hooked - plain)``: 1 = the hook's whole effect through that reader alone."""
        return normalised(self.patched, self.hooked, self.plain)

    def value(self, reader: str) -> float:
        try:
            return float(self.effects[self.readers.index(reader)])
        except ValueError:
            raise KeyError(f"no reader {reader!r} in these paths (readers: {self.readers[:4]} ...)") from None

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` readers through which the hook acts most (largest absolute effect)."""
        eff = self.effects
        order = np.argsort(-np.nan_to_num(np.abs(eff), nan=-1.0), kind="stable")[:k]
        return [(self.readers[i], float(eff[i])) for i in order]

    def by_kind(self) -> dict[str, float]:
        """The summed effect into each kind of reader (``attn_in`` or ``q`` / ``k`` / ``v``, ``mlp_in``,
        ``logits``)."""
        out: dict[str, float] = {}
        for r, e in zip(self.readers, self.effects):
            kind = "logits" if r == "logits" else r.rsplit(".", 1)[1]
            out[kind] = out.get(kind, 0.0) + float(np.nan_to_num(e))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": "interp.HookPaths", "readers": list(self.readers), "patched": self.patched.tolist(),
                "plain": self.plain, "hooked": self.hooked, "all_readers": self.all_readers, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HookPaths":
        if d.get("format") != "interp.HookPaths":
            raise ValueError(f"not a HookPaths (format {d.get('format')!r})")
        return cls(readers=list(d["readers"]), patched=np.array([json_number(x) for x in d["patched"]], dtype=float),
                   plain=json_number(d["plain"]), hooked=json_number(d["hooked"]),
                   all_readers=json_number(d["all_readers"]), meta=dict(d.get("meta", {})))


def write_start(model: "HookedVLM", site: str) -> int:
    """The first block whose readers see a write at ``site``: ``l`` for ``blocks.{l}.hook_resid_pre``, ``l + 1``
    for ``hook_resid_post`` (the logits are block ``n_layers``); raises for any other site."""
    m = _RESID.match(site)
    if m is None or int(m.group(1)) >= model.n_layers:
        raise ValueError(f"hook paths need edits of the language model's residual stream: "
                         f"'blocks.{{l}}.hook_resid_pre' or 'hook_resid_post' (l < {model.n_layers}), got {site!r}")
    return int(m.group(1)) + (m.group(2) == "post")


def hook_writes(model: "HookedVLM", inputs: VLMInputs, hooks: HookSpec
                ) -> tuple[dict[str, Float[Tensor, "batch pos d_model"]], Tensor]:
    """What each edited site's hooks wrote in the hooked run (output minus input, float32, prefill), and the
    hooked run's logits."""
    by_site = expand_hooks(list(hooks or []), model.hook_names())  # names, lists of names or predicates
    hooks = [(n, fn) for n, fns in by_site.items() for fn in fns]
    if not hooks:
        raise ValueError("no hooks: there is nothing to trace")
    sites = list(by_site)
    for s in sites:
        write_start(model, s)
    before: dict[str, Tensor] = {}
    writes: dict[str, Tensor] = {}

    def record(name: str, into: dict[str, Tensor]) -> HookFn:
        def hook(x: Tensor, ctx: HookContext) -> None:
            if ctx.is_prefill:
                into[name] = x.detach().float().clone()  # a copy: an in-place hook must not change "before"
        return hook

    spec = [(s, record(s, before)) for s in sites] + hooks + [(s, record(s, writes)) for s in sites]
    with torch.no_grad():
        logits = model.run_with_hooks(inputs, spec)
    return {s: writes[s] - before[s] for s in sites}, logits


def generation_writes(model: "HookedVLM", inputs: VLMInputs, hooks: HookSpec, answer_step: int,
                      every_step: bool = False
                      ) -> tuple[VLMInputs, dict[str, Float[Tensor, "batch pos d_model"]], Tensor]:
    """What each edited site's hooks wrote while generating, up to the step that chooses answer token
    ``answer_step`` (0 = the prefill, the first answer token).  Returns the prompt with the first ``answer_step``
    generated tokens appended (:meth:`VLMInputs.with_tokens`), the writes over all of its positions (the
    prefill's at the prompt, each decode step's at its token) and the hooked logits there, step by step as
    generation computed them.  One plain forward pass of those inputs with the writes added reproduces the
    hooked logits (tested, both architectures), so the paths of a hook's effect on a later answer token are
    those of that teacher-forced run.  ``every_step`` as in :meth:`HookedVLM.generate` (hooks marked
    :func:`~interp.hooks.first_steps` act where their mark says).  Rows must still be answering at that step."""
    if not isinstance(answer_step, int) or isinstance(answer_step, bool) or answer_step < 0:
        raise ValueError(f"answer_step must be an int >= 0, got {answer_step!r}")
    if answer_step == 0:
        writes, logits = hook_writes(model, inputs, hooks)
        return inputs, writes, logits
    by_site = expand_hooks(list(hooks or []), model.hook_names())
    if not any(by_site.values()):
        raise ValueError("no hooks: there is nothing to trace")
    for s in by_site:
        write_start(model, s)
    before: dict[str, dict[int, Tensor]] = {s: {} for s in by_site}
    after: dict[str, dict[int, Tensor]] = {s: {} for s in by_site}
    logits: dict[int, Tensor] = {}

    def record(into: dict[int, Tensor]) -> HookFn:
        def hook(x: Tensor, ctx: HookContext) -> None:
            into[ctx.step] = x.detach().float().clone()
        return first_steps(hook, answer_step)

    spec = ([(s, record(before[s])) for s in by_site] + [(n, fn) for n, fns in by_site.items() for fn in fns]
            + [(s, record(after[s])) for s in by_site] + [("hook_logits", record(logits))])
    with torch.no_grad():
        gen = model.generate(inputs, max_new_tokens=answer_step + 1, hooks=spec, every_step=every_step)
    tokens = gen.new_tokens[:, :answer_step]
    eos = model.tokenizer.eos_token_id
    ended = sorted({int(r) for r in (tokens == eos).nonzero()[:, 0]}) if eos is not None else []
    if ended or len(logits) <= answer_step:
        raise ValueError(f"rows {ended or 'all'} ended before answer step {answer_step}: trace an earlier step, or "
                         f"leave out the rows with shorter answers")
    steps = range(answer_step + 1)
    writes = {s: torch.cat([after[s][t] - before[s][t] for t in steps], 1) for s in by_site}
    forced = inputs.with_tokens(tokens)
    # generation keeps the prefill's logits at the last prompt token only: the positions before it are NaN
    known = torch.cat([logits[t][:, -1:] for t in steps], 1)
    full = known.new_full((known.shape[0], forced.input_ids.shape[1], known.shape[2]), float("nan"))
    full[:, -known.shape[1]:] = known
    return forced, writes, full


def _written(writes: dict[str, Tensor]) -> dict[str, Tensor]:
    """The sites where the hooks changed something (a hook that only reads, such as a gate's reader, writes
    nothing and opens no path)."""
    out = {s: w for s, w in writes.items() if bool(w.abs().max() > 0)}
    if not out:
        raise ValueError(f"the hooks wrote nothing at {list(writes)}: there is no path to trace")
    return out


def _at(writes: dict[str, Tensor], inputs: VLMInputs, positions: PositionSpec) -> dict[str, Tensor]:
    """The sites that were written, each write kept at ``positions`` only (zero elsewhere)."""
    writes = _written(writes)
    mask = _patch_mask(positions, next(iter(writes)), inputs)
    if mask is None:
        return writes
    return {s: w * mask.to(w.device).unsqueeze(-1).float() for s, w in writes.items()}


ANSWER_POSITIONS = ("prompt", "answer")


def _resolve(positions: PositionSpec, n_prompt: int, n_total: int) -> PositionSpec:
    """``"prompt"`` / ``"answer"`` (the positions before / from ``n_prompt``: the prompt and the appended answer
    tokens of an answer step's run) as mask functions; any other spec as it is."""
    if not (isinstance(positions, str) and positions in ANSWER_POSITIONS):
        return positions
    answer = positions == "answer"
    if answer and n_prompt >= n_total:
        raise ValueError("positions='answer' needs answer_step >= 1: at the prefill there are no answer tokens yet")

    def mask(inputs: VLMInputs) -> Tensor:
        at = torch.arange(inputs.input_ids.shape[1], device=inputs.input_ids.device) >= n_prompt
        return (at if answer else ~at).expand_as(inputs.input_ids)

    mask.__name__ = positions
    return mask


def _readers(model: "HookedVLM", graph: EdgeGraph, writes: dict[str, Tensor]) -> tuple[list[str], dict[str, Tensor]]:
    """The readers after the first write, and each one's summed write (every write before it)."""
    starts = {s: write_start(model, s) for s in writes}
    first = min(starts.values())
    readers = [v for v in graph.downstream if graph.reader(v)[1] >= first]
    total = {v: sum(w for s, w in writes.items() if starts[s] <= graph.reader(v)[1]) for v in readers}
    return readers, total


def hook_paths(model: "HookedVLM", inputs: VLMInputs, hooks: HookSpec, metric: Metric, qkv: bool = False,
               max_rows: Optional[int] = 32, positions: PositionSpec = "all", answer_step: int = 0,
               every_step: bool = False) -> HookPaths:
    """The hook's effect through each reader alone (module docstring), several readers a forward pass (the batch
    repeated, at most ``max_rows`` rows a pass), and every reader at once (``all_readers``: the hooked run when
    ``positions="all"``).  ``positions`` gives only the write at those positions (``"image"``, ``"text"``,
    ``"last"`` or a mask function, as in :mod:`interp.patching`): which part of a prompt-wide steering matters.
    For several position sets, :func:`hook_paths_by_position` shares the runs.

    ``answer_step=t`` traces the hook's effect on the logits that choose answer token ``t`` of a hooked greedy
    generation (:func:`generation_writes`; the metric then reads the last of the prompt + ``t`` answer tokens,
    teacher-forced): the writes of the prefill and of decode steps ``1..t`` are given to the readers at every
    position, and ``positions`` may also be ``"prompt"`` or ``"answer"`` (the write at the prompt, or at the
    answer tokens, alone).  ``every_step`` as in :meth:`HookedVLM.generate`."""
    return next(iter(hook_paths_by_position(model, inputs, hooks, metric, [positions], qkv, max_rows, answer_step,
                                            every_step).values()))


def hook_paths_by_position(model: "HookedVLM", inputs: VLMInputs, hooks: HookSpec, metric: Metric,
                           positions: Sequence[PositionSpec] = ("all", "image", "text", "last"), qkv: bool = False,
                           max_rows: Optional[int] = 32, answer_step: int = 0, every_step: bool = False
                           ) -> dict[str, HookPaths]:
    """:func:`hook_paths` for each of several ``positions`` (keyed by their labels, in order), with one hooked run
    recording the writes and one plain run for all of them, and every set's rows batched into the same passes:
    asking where a prompt-wide steering acts from its image, text and last-token parts costs one call, not four.
    ``answer_step`` / ``every_step`` as in :func:`hook_paths`."""
    if isinstance(positions, str) or callable(positions):
        raise TypeError(f"positions must be a sequence of position specs, e.g. ['all', 'last']; got {positions!r}")
    labels = [_position_label(p) for p in positions]
    if not labels:
        raise ValueError("no positions given: name at least one, e.g. ['all']")
    if len(set(labels)) != len(labels):
        raise ValueError(f"positions must have distinct labels (a mask function is labelled by its __name__); "
                         f"got {labels}")
    graph = edge_graph(model, qkv=qkv)
    n_prompt = inputs.input_ids.shape[1]
    inputs, recorded, hooked_logits = generation_writes(model, inputs, hooks, answer_step, every_step)
    positions = [_resolve(p, n_prompt, inputs.input_ids.shape[1]) for p in positions]
    parts = {label: _readers(model, graph, _at(recorded, inputs, p)) for label, p in zip(labels, positions)}
    readers = next(iter(parts.values()))[0]  # the same for every set: the sites written decide it
    b = inputs.batch_size
    with torch.no_grad():
        plain = _mean(_apply_metric(metric, model.run_with_hooks(inputs, []), inputs))
    hooked = _mean(_apply_metric(metric, hooked_logits, inputs))
    copies = [(chosen, total) for _, total in parts.values() for chosen in [[v] for v in readers] + [readers]]
    per = len(copies) if max_rows is None else max(1, max_rows // b)
    means: list[float] = []
    for s in range(0, len(copies), per):
        chunk = copies[s:s + per]
        run = repeat_inputs(inputs, len(chunk))
        with torch.no_grad():
            logits = model.run_with_hooks(run, _path_hooks(model, graph, chunk, b))
        rows = _apply_metric(metric, logits, run)
        means += [_mean(rows[c * b:(c + 1) * b]) for c in range(len(chunk))]
    n = len(readers) + 1
    sites = list(_written(recorded))
    return {label: HookPaths(readers=readers, patched=np.array(means[i * n:(i + 1) * n - 1]), plain=plain,
                             hooked=hooked, all_readers=means[(i + 1) * n - 1],
                             meta={"method": "patching", "qkv": qkv, "sites": sites, "positions": label,
                                   "answer_step": answer_step})
            for i, label in enumerate(labels)}


def _path_hooks(model: "HookedVLM", graph: EdgeGraph, copies: Sequence[tuple[Sequence[str], dict[str, Tensor]]],
                n_rows: int) -> list[tuple[str, HookFn]]:
    """Copy ``c`` of the batch gives the readers ``copies[c][0]`` their summed write from ``copies[c][1]``; the rest
    run plain."""
    current: dict[str, Tensor] = {}
    chosen_sets, totals = [set(readers) for readers, _ in copies], [total for _, total in copies]
    wanted = set().union(*chosen_sets)
    inputs = sorted({reader_input_name(model, v) for v in wanted}, key=model.hook_names().index)

    def record(name: str) -> HookFn:
        def hook(x: Tensor, ctx: HookContext) -> None:
            if ctx.is_prefill:
                current[name] = x
        return hook

    by_site: dict[str, list[str]] = {}
    for v in graph.downstream:
        if v in wanted:
            by_site.setdefault(reader_site_name(model, v), []).append(v)

    def patch(site: str, readers: list[str]) -> HookFn:
        norm = norm_module(model, readers[0])
        inp = reader_input_name(model, readers[0])
        heads = reader_heads(model, graph, readers)

        def hook(y: Tensor, ctx: HookContext) -> Optional[Tensor]:
            if not ctx.is_prefill:
                return None
            out = y.clone()
            x = current[inp]
            for c, (chosen, total) in enumerate(zip(chosen_sets, totals)):
                rows = slice(c * n_rows, (c + 1) * n_rows)
                for v in readers:
                    if v not in chosen:
                        continue
                    normed = rms_norm(x[rows].float() + total[v].to(x.device), norm.weight, norm.variance_epsilon,
                                      dtype=x.dtype)
                    put_reader_input(out, rows, normed, heads.get(v))
            return out
        return hook

    return [(n, record(n)) for n in inputs] + [(site, patch(site, rs)) for site, rs in by_site.items()]


def attribution_hook_paths(model: "HookedVLM", inputs: VLMInputs, hooks: HookSpec, metric: Metric,
                           qkv: bool = False, steps: int = 0, positions: PositionSpec = "all", answer_step: int = 0,
                           every_step: bool = False) -> HookPaths:
    """:func:`hook_paths` estimated: ``write . d metric / d input_r`` through each reader alone (the readers'
    gradients as in :func:`interp.edge_attribution.reader_grads`).  ``steps=0``: first order, from one
    differentiated plain run.  ``steps=K``: integrated along the path that scales every write from 0 to 1 (the
    recorded writes added back, times ``alpha``, so ``alpha = 1`` is the hooked run), ``K + 1`` differentiated runs
    and the trapezoid rule; the readers' terms then add up to the whole effect.  ``all_readers`` is the plain
    metric plus every reader's term.  ``positions`` as in :func:`hook_paths` (integrated: along the path that
    scales the write at those positions only); ``answer_step`` / ``every_step`` as there."""
    check_steps(steps)
    graph = edge_graph(model, qkv=qkv)
    n_prompt = inputs.input_ids.shape[1]
    inputs, writes, hooked_logits = generation_writes(model, inputs, hooks, answer_step, every_step)
    label = _position_label(positions)
    written = _at(writes, inputs, _resolve(positions, n_prompt, inputs.input_ids.shape[1]))
    readers, total = _readers(model, graph, written)
    reads = sorted({reader_input_name(model, v) for v in readers}, key=model.hook_names().index)

    def grads_at(alpha: float) -> tuple[list[float], dict[str, Tensor]]:
        def add(w: Tensor) -> HookFn:
            def hook(x: Tensor, ctx: HookContext) -> Optional[Tensor]:
                return (x.float() + alpha * w.to(x.device)).to(x.dtype) if ctx.is_prefill else None
            return hook

        extra = [(s, add(w)) for s, w in written.items()] if alpha else []
        run = run_with_grads(model, inputs, grad_names(model, qkv), metric, hooks=extra, reads=reads)
        return run.values.tolist(), reader_grads(model, run, readers, qkv)

    values, grads = grads_at(0.0)
    plain = _mean(values)
    if steps:  # the trapezoid rule: the mean gradient of each segment, times the segment's share of the write
        mean = {v: 0.5 * grads[v] for v in readers}
        for j in range(1, steps + 1):
            _, g = grads_at(j / steps)
            for v in readers:
                mean[v] = mean[v] + (g[v] if j < steps else 0.5 * g[v])
        grads = {v: m / steps for v, m in mean.items()}
    terms = [float((total[v].to(grads[v].device) * grads[v]).sum()) / inputs.batch_size for v in readers]
    return HookPaths(readers=readers, patched=np.array([plain + t for t in terms]), plain=plain,
                     hooked=_mean(_apply_metric(metric, hooked_logits, inputs)), all_readers=plain + sum(terms),
                     meta={"method": "attribution", "steps": steps, "qkv": qkv, "sites": list(written),
                           "positions": label, "answer_step": answer_step})


__all__ = ["ANSWER_POSITIONS", "HookPaths", "attribution_hook_paths", "generation_writes", "hook_paths",
           "hook_paths_by_position", "hook_writes", "write_start"]
