"""The plain-PyTorch backend for hooks: the same hook specs as the nnsight backend, as module hooks.

Why two backends: nnsight traces are what researchers compose and what runs
remotely or sharded; a plain forward (pre-)hook is what a deployment wants,
with no tracing cost on every generated token.  Both call the same hook
functions with the same :class:`~interp.hooks.HookContext`, and the tests
assert they give identical outputs.

The context (masks, last prompt index, step) comes from the inputs of the
HookedVLM call in flight; a raw ``hf_model(...)`` call outside HookedVLM is a
clear error (wrap it in :class:`active_inputs`).  Hooks whose functions are all
:func:`~interp.hooks.prefill_only` step aside after the prefill pass (and those marked
:func:`~interp.hooks.first_steps` after their last step), so steered generation costs nothing per
decoded token.
"""
from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle

from .adapters import get_module
from .adapters.base import Site
from .hooks import HookContext, HookFn, checked_result, plan_last_step
from .names import layer_of
from .sites import resolve_site

if TYPE_CHECKING:
    from .inputs import VLMInputs
    from .model import HookedVLM


@dataclass
class _Active:
    inputs: "VLMInputs"
    calls: dict[int, int] = field(default_factory=dict)
    stepped_aside: list["_Dispatcher"] = field(default_factory=list)


ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("interp_active_inputs", default=None)


class active_inputs:
    """Mark ``inputs`` as the batch in flight, so module hooks can build their context from it.

    On exit, module hooks that stepped aside after the prefill pass (all their functions are
    :func:`~interp.hooks.prefill_only`, or :func:`~interp.hooks.first_steps`) are put back for the next call.
    """

    def __init__(self, inputs: "VLMInputs") -> None:
        self.inputs = inputs
        self.token: Any = None

    def __enter__(self) -> "VLMInputs":
        self.token = ACTIVE.set(_Active(self.inputs))
        return self.inputs

    def __exit__(self, *exc: Any) -> None:
        active = ACTIVE.get()
        ACTIVE.reset(self.token)
        for dispatcher in active.stepped_aside if active is not None else ():
            dispatcher.arm()


@dataclass(eq=False)
class Handle:
    """One registered ``(name, fns)`` entry; :meth:`remove` detaches it (idempotent)."""

    name: str
    site: Site
    fns: list[HookFn]
    dispatcher: "_Dispatcher | None" = None

    def remove(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.discard(self)
            self.dispatcher = None


class _Dispatcher:
    """Every interp hook on one module and one side (input or output), behind a single torch hook.

    Why one torch hook per module: the step of a call is "how many times has this module run in the
    current HookedVLM call", which must be counted once per module call however many entries (from
    however many nested ``model.hooks`` blocks) hook it; entries run in registration order.  Why it
    steps aside: when every entry acts on the prefill pass only, the torch hook removes itself after
    that pass (after step k when every entry acts on steps 0..k at most, :func:`~interp.hooks.first_steps`),
    so the later decode steps run with no hook dispatch at all (the deployment fast path costs nothing per
    generated token); :class:`active_inputs` puts it back when the call ends.  The torch hook is
    prepended, so it runs before any hook other code registered on the module: transformers records
    ``hidden_states`` with its own forward hooks, and LLaVA's projector reads a vision block's output
    from that record, so an edit there must be made before the record is, as the nnsight backend's is.
    """

    def __init__(self, module: torch.nn.Module, kind: str) -> None:
        self.module, self.kind = module, kind
        self.entries: list[Handle] = []
        self.torch_handle: RemovableHandle | None = None
        self.last_step: int | None = None  # the last step any entry acts on (None: every step), kept with entries

    def add(self, entry: Handle) -> None:
        self.entries.append(entry)
        entry.dispatcher = self
        self._update_last_step()
        self.arm()

    def discard(self, entry: Handle) -> None:
        self.entries = [e for e in self.entries if e is not entry]
        self._update_last_step()
        if not self.entries:
            self.step_aside()
            _DISPATCHERS.get(self.module, {}).pop(self.kind, None)

    def _update_last_step(self) -> None:
        self.last_step = plan_last_step(fn for e in self.entries for fn in e.fns)

    def arm(self) -> None:
        if self.torch_handle is not None or not self.entries:
            return
        if self.kind == "input":
            self.torch_handle = self.module.register_forward_pre_hook(self._pre, prepend=True)
        else:
            self.torch_handle = self.module.register_forward_hook(self._post, prepend=True)

    def step_aside(self) -> None:
        if self.torch_handle is not None:
            self.torch_handle.remove()
            self.torch_handle = None

    def _run(self, value: Any, get: Any, put: Any) -> Any:
        active = ACTIVE.get()
        if active is None:
            name = self.entries[0].name if self.entries else "?"
            raise RuntimeError(
                f"hook on {name!r} fired outside a HookedVLM call; run the model through "
                "model.run_with_hooks / run_with_cache / generate (or wrap a raw call in interp.torch_hooks.active_inputs)"
            )
        # Each module runs once per forward, so its call count is the generation step.
        step = active.calls.get(id(self), 0)
        active.calls[id(self)] = step + 1
        changed = False
        for entry in list(self.entries):
            ctx = HookContext(name=entry.name, layer=layer_of(entry.name), step=step, inputs=active.inputs)
            x, touched = get(value, entry.site), False
            for fn in entry.fns:
                new = fn(x, ctx)
                if new is not None:
                    x, touched = checked_result(entry.name, new, x), True
            if touched:
                value, changed = put(value, entry.site, x), True
        if self.last_step is not None and step >= self.last_step:
            self.step_aside()
            active.stepped_aside.append(self)
        return value if changed else None

    def _pre(self, mod: torch.nn.Module, args: tuple) -> tuple | None:
        return self._run(args, lambda a, site: site.get(a[0]), lambda a, site, x: (site.set(a[0], x),) + tuple(a[1:]))

    def _post(self, mod: torch.nn.Module, args: tuple, out: Any) -> Any:
        return self._run(out, lambda o, site: site.get(o), lambda o, site, x: site.set(o, x))


#: module -> {"input" | "output": dispatcher}; an entry lives while some handle on that module is registered.
_DISPATCHERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, _Dispatcher]]" = weakref.WeakKeyDictionary()


def has_hooks(model: "HookedVLM") -> bool:
    """Whether any module of ``model`` has plain hooks registered through :func:`register` right now."""
    return any(_DISPATCHERS.get(module) for module in model.hf_model.modules())  # emptied entries are popped


def register(model: "HookedVLM", hooks: dict[str, list[HookFn]]) -> list[Handle]:
    """Register ``{name: [fn, ...]}`` as module hooks; returns handles to remove them."""
    handles: list[Handle] = []
    for name, fns in hooks.items():
        site = resolve_site(model.adapter, name, model.head_counts)  # names come validated (expand_hooks)
        module = get_module(model.hf_model, site.module)
        per_module = _DISPATCHERS.setdefault(module, {})
        dispatcher = per_module.get(site.kind)
        if dispatcher is None:
            dispatcher = per_module[site.kind] = _Dispatcher(module, site.kind)
        handle = Handle(name, site, list(fns))
        dispatcher.add(handle)
        handles.append(handle)
    return handles


def remove(handles: list[Handle]) -> None:
    for h in handles:
        h.remove()
