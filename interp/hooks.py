"""Hook functions: what they receive, and how hook specs are normalised.

A hook is ``fn(activation, ctx) -> activation | None``.  ``ctx`` tells the
hook where and when it runs, so one function can steer only the last prompt
token (``ctx.last_index``), only image tokens (``ctx.image_mask``) or only the
prefill pass (``ctx.step == 0``).  Returning None leaves the activation as is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

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
    prefill pass and puts it back when the call ends, so the decode steps of a
    steered ``generate`` run with no hook dispatch at all.  The mark is a
    promise about the function, not a filter: an unmarked function is called
    at every step, as before.  Returns ``fn`` itself (usable as a decorator).
    """
    fn.prefill_only = True  # type: ignore[attr-defined]
    return fn


def is_prefill_only(fn: HookFn) -> bool:
    return bool(getattr(fn, "prefill_only", False))


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
