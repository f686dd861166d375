"""Every nnsight call of the project: wrapping a model and running a plan of sites and hooks inside a trace.

A :class:`Plan` is the list of sites to visit in execution order (nnsight
requires that order), the hooks to apply at each, and which values to keep.
The same body runs once for a forward pass, once for the prefill pass of a
generation, or on every generation step.
"""
from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import nnsight
import torch
from torch import Tensor

from .adapters.base import Site
from .hooks import HookContext, HookFn, checked_result, last_step, plan_last_step
from .names import is_vision_side, layer_of

if TYPE_CHECKING:
    from .inputs import VLMInputs
    from .model import HookedVLM


@dataclass
class Plan:
    sites: list[tuple[str, Site]]
    hooks: dict[str, list[HookFn]] = field(default_factory=dict)
    cache: set[str] = field(default_factory=set)
    eager: tuple[str, ...] = ()  # module paths whose attention must run eagerly (a site reads attention weights)
    # ids of hook functions attached for a whole block (``HookedVLM.hooks``): like module hooks, an unmarked one
    # acts on every generation step, whatever ``generate``'s ``every_step`` says
    attached: frozenset[int] = frozenset()

    @property
    def empty(self) -> bool:
        return not self.sites


def wrap(hf_model: torch.nn.Module):
    """The nnsight envoy of a transformers model."""
    return nnsight.NNsight(hf_model)


def wrap_remotable(hf_model: torch.nn.Module, tokenizer: Any):
    """An envoy that can ship traces to a remote host (``remote=True``) or simulate it (``remote="local"``)."""
    import logging

    logger = logging.getLogger("transformers.pipelines.base")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # TransformersModel builds a text-generation pipeline it never uses; silence its complaint
    try:
        return nnsight.TransformersModel(hf_model, tokenizer=tokenizer)
    finally:
        logger.setLevel(level)


def envoy_at(root, path: str):
    env = root
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _groups(sites: list[tuple[str, Site]]):
    """Consecutive names that share one module and kind are read (and written) once."""
    group: list[tuple[str, Site]] = []
    for name, site in sites:
        if group and (group[-1][1].module, group[-1][1].kind) != (site.module, site.kind):
            yield group
            group = []
        group.append((name, site))
    if group:
        yield group


def apply_plan(root, plan: Plan, inputs: "VLMInputs", step: int, acts: dict[str, Tensor]) -> Tensor | None:
    """Visit each site inside a running trace: apply hooks, write back changes, keep requested values.

    Returns the (possibly hooked) logits if ``hook_logits`` was visited.
    """
    logits = None
    for group in _groups(plan.sites):
        site0 = group[0][1]
        env = envoy_at(root, site0.module)
        raw = env.output if site0.kind == "output" else env.input
        changed = False
        for name, site in group:  # names on one module read (and write) the same raw value, each its own way
            value = site.get(raw)
            touched = False
            for fn in plan.hooks.get(name, ()):
                new = fn(value, HookContext(name=name, layer=layer_of(name), step=step, inputs=inputs))
                if new is not None:
                    value, touched = checked_result(name, new, value), True
            if touched:
                raw, changed = site.set(raw, value), True
            if name in plan.cache:
                acts[name] = value.detach()
            if name == "hook_logits":
                logits = value
        if changed:
            if site0.kind == "output":
                env.output = raw
            else:
                env.input = raw
    return logits


def run(model: "HookedVLM", inputs: "VLMInputs", plan: Plan, remote: bool | str = False,
        kwargs: dict[str, Any] | None = None, step: int = 0, stop: bool = False
        ) -> tuple[Tensor | None, dict[str, Tensor]]:
    """One forward pass under ``plan``; a plain forward when the plan is empty (same numbers, no tracing cost).

    ``remote`` ships the trace (hook functions included, by value) to an NDIF
    host (True) or runs nnsight's exact serialise/deserialise round trip in
    process (``"local"``).  ``kwargs`` (default: ``inputs.model_kwargs()``) and
    ``step`` (what hooks see as ``ctx.step``) let a caller continue from a KV
    cache: one new position per row, hooked as a decode step.  ``stop`` halts
    the model right after the plan's last site (nnsight's ``tracer.stop()``):
    later layers and the unembedding never run, and the logits are None.
    """
    kwargs = inputs.model_kwargs() if kwargs is None else kwargs
    if stop and plan.empty:
        raise ValueError("stop=True needs at least one site to stop after")
    with torch.no_grad():
        if plan.empty and not remote:
            return model.hf_model(**kwargs).logits, {}
        root = model.remote_envoy if remote else model.envoy
        acts: dict[str, Tensor] = {}
        trace_kwargs = {"remote": remote} if remote else {}
        logits = None
        with root.trace(**kwargs, **trace_kwargs) as tracer:
            hooked = apply_plan(root, plan, inputs, step, acts)
            acts = nnsight.save(acts)
            if stop:
                tracer.stop()
            else:
                logits = (hooked if hooked is not None else envoy_at(root, model.adapter.lm_head).output).save()
    return logits, dict(acts)


@contextmanager
def _stood_down_when(root, hf_model: torch.nn.Module, finished: list) -> Iterator[None]:
    """Inside a generation trace, stand nnsight down after the first forward pass that ends with ``finished``
    non-empty (the trace body appends to it once it has applied its plan to every step it acts on).

    Why: while a trace interleaves, every module call of every decode step goes through nnsight's
    per-module handoff, even once the body has finished; at 7B sizes the graph path cost 8-13 % of a
    steered ``generate`` (``docs/scale_check``, measured before this), and on a 32-layer CPU model the
    cost grew with the number of new tokens.  A plan that acts on the prefill only (or on steps 0..k,
    :func:`~interp.hooks.first_steps`) is done after that pass, so the interleaver is stood down the way
    nnsight stands it down for an ad-hoc ``Envoy.__call__`` and the later decode steps run as plain
    PyTorch; it is restored before the trace ends.  Keyed on the body's own signal rather than on a
    count of forward passes, so an extra pass inside ``generate`` can never cut a plan short.  Tokens are
    unchanged (tested against plain pre-hooks).
    """
    interleaver = getattr(root, "interleaver", None)
    if not hasattr(interleaver, "interleaving"):
        yield
        return
    before = interleaver.interleaving

    def after_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
        if finished:
            interleaver.interleaving = False

    handle = hf_model.register_forward_hook(after_forward)
    try:
        yield
    finally:
        handle.remove()
        interleaver.interleaving = before


def _acts_on(fn: HookFn, step: int, attached: frozenset[int]) -> bool:
    """Whether ``fn`` acts on decode ``step`` of a generate without ``every_step``: its mark says so, or it is
    unmarked and attached for a block (a module hook's behaviour)."""
    last = last_step(fn)
    return last >= step if last is not None else id(fn) in attached


def marked_plan(plan: Plan, step: int) -> Plan:
    """The part of ``plan`` that acts on decode step ``step`` without ``every_step``: the hook functions marked
    :func:`~interp.hooks.first_steps` up to at least that step, and unmarked ones attached with
    ``HookedVLM.hooks`` (unmarked functions passed to ``generate`` act on the prefill only)."""
    hooks = {n: kept for n, fns in plan.hooks.items() if (kept := [fn for fn in fns if _acts_on(fn, step, plan.attached)])}
    return Plan(sites=[(n, s) for n, s in plan.sites if n in hooks], hooks=hooks, attached=plan.attached)


def decode_plan(plan: Plan) -> Plan:
    """``plan`` without its vision-side sites (``vision.*``, ``projector.*``), for decode steps after the prefill.

    Why: the vision tower and the projector run on the prefill only.  A trace that still waited for them on a
    later step never got them, and skipped the rest of that step's body with them, so a language-model hook
    next to any vision hook acted on the prefill alone (an audit: steps [0] instead of [0..5], other tokens
    than the torch backend's), silently, since "was never reached" warnings are filtered here.
    """
    vision = {n for n, _ in plan.sites if is_vision_side(n)}
    if not vision:
        return plan
    return dataclasses.replace(plan, sites=[(n, s) for n, s in plan.sites if n not in vision],
                               hooks={n: fns for n, fns in plan.hooks.items() if n not in vision},
                               cache=set(plan.cache) - vision)


def generate(model: "HookedVLM", inputs: "VLMInputs", plan: Plan, max_new_tokens: int, every_step: bool,
             kwargs: dict[str, Any]) -> Tensor:
    """Generate under ``plan``: hooks on the prefill pass only, or on every step.

    Every step means every step the plan's functions act on: when they are all marked
    (:func:`~interp.hooks.first_steps`), the trace serves steps ``0..k`` and stands down after them.
    Without ``every_step``, unmarked functions passed to ``generate`` act on the prefill only, and a function
    marked ``first_steps(fn, k)`` still acts on its steps ``0..k``: the mark is the function's own statement
    of where it acts, so a multi-step hook (an eraser's answer steps) is never cut to the prefill silently.
    Unmarked functions attached for a block (``HookedVLM.hooks(..., backend="nnsight")``) act on every step,
    as the plain-PyTorch backend's module hooks do, so the two backends give the same tokens.
    """
    model_kwargs = inputs.model_kwargs()
    with torch.no_grad():
        if plan.empty:
            return model.hf_model.generate(**model_kwargs, max_new_tokens=max_new_tokens, **kwargs)
        root = model.envoy
        box: list[Tensor] = []
        finished: list[bool] = []
        decode = decode_plan(plan)  # what later steps can reach: no vision-side site runs after the prefill
        fns = [fn for fns in decode.hooks.values() for fn in fns]
        if decode.empty:
            last = 0  # only vision-side hooks: nothing to serve after the prefill (an empty step would never end)
        elif every_step:
            last = plan_last_step(fns)
        elif any(last_step(fn) is None and id(fn) in plan.attached for fn in fns):
            last = None  # an unmarked hook attached for the block acts on every step, as a module hook does
        else:
            last = max([l for fn in fns if (l := last_step(fn)) is not None] + [0])

        def step_plan(step: int) -> Plan:
            if step == 0:
                return plan
            return decode if every_step else marked_plan(decode, step)

        def capture(*args: Any, **kw: Any) -> Tensor:
            # The result is caught here rather than read from tracer.result: after an
            # open-ended every-step loop nnsight runs no further statement of the body.
            with _stood_down_when(root, model.hf_model, finished):
                out = model.hf_model.generate(*args, **kw)
            box.append(out)
            return out

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with root.trace(**model_kwargs, fn=capture, max_new_tokens=max_new_tokens, **kwargs) as tracer:
                if last is None:
                    for step in tracer.all():
                        apply_plan(root, step_plan(step), inputs, step, {})
                else:
                    for step in tracer.iter[:last + 1]:
                        apply_plan(root, step_plan(step), inputs, step, {})
                    finished.append(True)
    return box[0]
