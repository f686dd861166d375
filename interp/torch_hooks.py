"""The plain-PyTorch backend for hooks: the same hook specs as the nnsight backend, as module hooks.

Why two backends: nnsight traces are what researchers compose and what runs
remotely or sharded; a plain forward (pre-)hook is what a deployment wants,
with no tracing cost on every generated token.  Both call the same hook
functions with the same :class:`~interp.hooks.HookContext`, and the tests
assert they give identical outputs.

The context (masks, last prompt index, step) comes from the inputs of the
HookedVLM call in flight; a raw ``hf_model(...)`` call outside HookedVLM gets a
context built from its own ``input_ids``/``attention_mask`` assuming left padding.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .adapters import get_module
from .hooks import HookContext, HookFn
from .names import layer_of
from .sites import resolve_site

if TYPE_CHECKING:
    from .inputs import VLMInputs
    from .model import HookedVLM


@dataclass
class _Active:
    inputs: "VLMInputs"
    prompt_len: int
    calls: dict[str, int] = field(default_factory=dict)


ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("interp_active_inputs", default=None)


class active_inputs:
    """Mark ``inputs`` as the batch in flight, so module hooks can build their context from it."""

    def __init__(self, inputs: "VLMInputs") -> None:
        self.inputs = inputs
        self.token: Any = None

    def __enter__(self) -> "VLMInputs":
        self.token = ACTIVE.set(_Active(self.inputs, self.inputs.input_ids.shape[1]))
        return self.inputs

    def __exit__(self, *exc: Any) -> None:
        ACTIVE.reset(self.token)


def _context(model: "HookedVLM", name: str, x: Tensor) -> HookContext:
    active = ACTIVE.get()
    if active is None:
        raise RuntimeError(
            f"hook on {name!r} fired outside a HookedVLM call; run the model through "
            "model.run_with_hooks / run_with_cache / generate (or wrap a raw call in interp.torch_hooks.active_inputs)"
        )
    # Each module runs once per forward, so its call count is the generation step.
    step = active.calls.get(name, 0)
    active.calls[name] = step + 1
    return HookContext(name=name, layer=layer_of(name), step=step, inputs=active.inputs)


def register(model: "HookedVLM", hooks: dict[str, list[HookFn]]) -> list[RemovableHandle]:
    """Register ``{name: [fn, ...]}`` as module hooks; returns handles to remove them."""
    handles: list[RemovableHandle] = []
    for name, fns in hooks.items():
        site = resolve_site(model.adapter, name)
        module = get_module(model.hf_model, site.module)

        def run(value: Tensor, _name: str = name, _fns: list[HookFn] = fns) -> Tensor | None:
            ctx = _context(model, _name, value)
            changed = False
            for fn in _fns:
                new = fn(value, ctx)
                if new is not None:
                    value, changed = new, True
            return value if changed else None

        if site.kind == "input":
            def pre(mod: torch.nn.Module, args: tuple, _run=run) -> tuple | None:
                new = _run(args[0])
                return None if new is None else (new,) + tuple(args[1:])

            handles.append(module.register_forward_pre_hook(pre))
        else:
            def post(mod: torch.nn.Module, args: tuple, out: Any, _run=run, _site=site) -> Any:
                new = _run(_site.get(out))
                return None if new is None else _site.set(out, new)

            handles.append(module.register_forward_hook(post))
    return handles


def remove(handles: list[RemovableHandle]) -> None:
    for h in handles:
        h.remove()
