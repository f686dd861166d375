"""Hook functions: what they receive, and how hook specs are normalised.

A hook is ``fn(activation, ctx) -> activation | None``.  ``ctx`` tells the
hook where and when it runs, so one function can steer only the last prompt
token (``ctx.last_index``), only image tokens (``ctx.image_mask``) or only the
prefill pass (``ctx.step == 0``).  Returning None leaves the activation as is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from .inputs import VLMInputs
from .names import resolve_names

HookFn = Callable[[Tensor, "HookContext"], Optional[Tensor]]
HookSpec = Sequence[tuple[Union[str, Sequence[str], Callable[[str], bool]], HookFn]]


@dataclass
class HookContext:
    """Where and when a hook runs.

    At ``step == 0`` (the prefill pass) the activation covers every prompt
    position and the masks describe it; at later generation steps it covers
    only the newly generated position(s), which are text.
    """

    name: str
    layer: Optional[int]
    step: int
    inputs: VLMInputs

    @property
    def is_prefill(self) -> bool:
        return self.step == 0

    @property
    def image_mask(self) -> Tensor:
        return self.inputs.image_mask

    @property
    def text_mask(self) -> Tensor:
        return self.inputs.text_mask

    @property
    def last_index(self) -> Tensor:
        return self.inputs.last_index

    def last_token_mask(self, like: Tensor) -> Tensor:
        """Bool ``[batch, pos]`` selecting the last prompt token in ``like`` (the last position after prefill)."""
        b, p = like.shape[:2]
        mask = torch.zeros((b, p), dtype=torch.bool, device=like.device)
        idx = self.last_index.to(like.device) if self.is_prefill else torch.full((b,), p - 1, device=like.device)
        mask[torch.arange(b, device=like.device), idx] = True
        return mask


def prefill_only(fn: HookFn) -> HookFn:
    """Mark ``fn`` as acting on the prefill pass only (it must return None whenever ``ctx.step > 0``).

    Why: the plain-PyTorch backend then removes the module hook after the
    prefill pass and puts it back when the call ends, and the nnsight backend
    stands the trace down, so the decode steps of a steered ``generate`` run
    with no hook dispatch at all.  The mark is a promise about the function,
    not a filter: an unmarked function is called at every step, as before.
    Returns ``fn`` itself (usable as a decorator).  ``first_steps(fn, 0)``.
    """
    return first_steps(fn, 0)


def first_steps(fn: HookFn, last: int) -> HookFn:
    """Mark ``fn`` as acting on generation steps ``0..last`` only (it must return None whenever ``ctx.step > last``).

    The generalisation of :func:`prefill_only` (``last`` 0) for hooks that also steer the first few
    generated tokens (e.g. an eraser's answer steps): both backends stop dispatching to the hook after
    step ``last``.  Returns ``fn`` itself.
    """
    if not isinstance(last, int) or isinstance(last, bool) or last < 0:
        raise ValueError(f"first_steps needs a last step >= 0, got {last!r}")
    fn.last_step = last  # type: ignore[attr-defined]
    return fn


def last_step(fn: HookFn) -> int | None:
    """The last generation step ``fn`` acts on (:func:`first_steps`), or None: every step."""
    return getattr(fn, "last_step", None)


def checked_result(name: str, new: object, value: Tensor) -> Tensor:
    """A hook's return value, after checking it can replace ``value``: a tensor of the same shape, in
    ``value``'s dtype and on its device.

    Both backends call this, so a hook that returns the wrong thing fails the same way on each, at the
    hook that did it, instead of deep inside the next module (or, on the plain-PyTorch backend, not at
    all: a shorter sequence ran on silently).  A hook may compute in another float dtype (float32 or
    float64 on a bf16 model): its result is cast back to the site's, as the next module needs.  An integer
    or bool result for a float site is an error (the values were truncated).
    """
    if not isinstance(new, Tensor):
        raise TypeError(f"hook on {name!r} returned {type(new).__name__}; return a tensor shaped like its input, "
                        "or None to leave it as is")
    if new.shape != value.shape:
        raise ValueError(f"hook on {name!r} returned shape {tuple(new.shape)}, expected {tuple(value.shape)}")
    if new.dtype != value.dtype:
        if value.is_floating_point() and not new.is_floating_point():
            raise TypeError(f"hook on {name!r} returned a {new.dtype} tensor for a {value.dtype} site; return "
                            "floating-point values (an integer result has lost the fraction)")
        new = new.to(value.dtype)
    if new.device != value.device:
        new = new.to(value.device)
    return new


def plan_last_step(fns: Iterable[HookFn]) -> int | None:
    """The last step any of ``fns`` acts on: None (every step) if one of them is unmarked.

    >>> plan_last_step([first_steps(lambda x, c: None, 3), prefill_only(lambda x, c: None)])
    3
    >>> plan_last_step([]) is None
    True
    """
    lasts = [last_step(fn) for fn in fns]
    if not lasts or any(l is None for l in lasts):
        return None
    return max(lasts)


def expand_hooks(hooks: HookSpec | None, valid: Sequence[str]) -> dict[str, list[HookFn]]:
    """``[(name_or_glob_or_predicate, fn), ...]`` -> ``{name: [fn, ...]}``, validating every name."""
    out: dict[str, list[HookFn]] = {}
    for item in hooks or ():
        if not (isinstance(item, tuple) and len(item) == 2 and callable(item[1])):
            raise TypeError("hooks must be a list of (name, fn) pairs with fn(tensor, ctx) -> tensor | None")
        spec, fn = item
        for name in resolve_names(spec, valid):
            out.setdefault(name, []).append(fn)
    return out
