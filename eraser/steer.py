"""Applying the gate: small pure functions, composed into one hook per steered layer.

``h_t <- h_t + lambda * g(h_T) * d`` for every prompt position ``t``, where
``h_T`` is the layer input at the last prompt token.  Composed per layer, in
order, so each layer's gate already sees earlier layers' steering.  The same
hook functions run on the nnsight backend (composable, remote-capable) and on
the plain-PyTorch backend (deployment); the tests assert identical outputs.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interp import HookContext, first_steps, prefill_only
from interp.collect import READS, prompt_mean, prompt_positions

from .gate import gate_score, window as gate_window


def scale(g: Float[Tensor, " batch"], strength: float) -> Float[Tensor, " batch"]:
    return strength * g


def add_direction(x: Float[Tensor, "batch pos d"], coef: Float[Tensor, " batch"], direction: Float[Tensor, " d"],
                  mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d"]:
    """``x + coef[b] * direction`` at the masked positions only."""
    return x + (coef[:, None, None] * mask[..., None].to(x.dtype)) * direction.to(x.dtype)


def prompt_mask(x: Tensor, ctx: HookContext) -> Bool[Tensor, "batch pos"]:
    """Real prompt positions up to and including the last prompt token (not padding, not teacher-forced answers)."""
    return prompt_positions(ctx.inputs, x.shape[1]).to(x.device)


def last_token(x: Tensor, ctx: HookContext) -> Float[Tensor, "batch d"]:
    return x[torch.arange(x.shape[0], device=x.device), ctx.last_index.to(x.device)]


def gate_input(x: Tensor, ctx: HookContext, read: str = "last",
               mask: Bool[Tensor, "batch pos"] | None = None) -> Float[Tensor, "batch d"]:
    """What the gate reads at prefill: the last prompt token (the paper's h_T), or the mean over the prompt.

    ``mask`` is :func:`prompt_mask` when the caller has it already (the hook needs it anyway).

    Why "mean" exists: in a shallow model the person's identity reaches the last prompt token only in
    the last layers, so a last-token gate at earlier layers cannot tell forget from retain; the
    prompt mean sees the name and image tokens directly (measured on the quick model: validation leak
    ratio 0.08 instead of 0.58).  It is an extension, not the paper's method.
    """
    if read == "last":
        return last_token(x, ctx)
    if read == "mean":
        return prompt_mean(x, prompt_mask(x, ctx) if mask is None else mask)
    raise ValueError(f"gate read must be one of {READS}, got {read!r}")


def gated_hook(w: Tensor, direction: Tensor, strength: float, every_step: bool = False,
               record: list | None = None, read: str = "last", window: tuple[float, float] | None = None,
               answer_direction: Tensor | None = None, answer_steps: int = 0
               ) -> Callable[[Tensor, HookContext], Tensor | None]:
    """The hook for one layer.  ``record`` (optional) collects the gate values it computed, per call.

    ``read`` is where the prefill gate reads its input (:func:`gate_input`); generated tokens, in the
    every-step mode, always read their own position.  ``window`` ``(lo, hi)`` saturates the gate
    (:func:`eraser.gate.window`); None keeps the paper's linear gate.  With ``answer_direction``, the
    first ``answer_steps`` generated tokens are steered too, along it, with the gate the prefill computed
    (:func:`answer_steering`); it overrides ``every_step``.
    """
    if read not in READS:
        raise ValueError(f"gate read must be one of {READS}, got {read!r}")
    w = w.float()
    direction = direction.float()
    held: dict[str, Tensor] = {}
    answering = answer_direction is not None and answer_steps > 0

    def hook(x: Tensor, ctx: HookContext) -> Tensor | None:
        if ctx.is_prefill:
            mask = prompt_mask(x, ctx)
            g = gate_score(gate_input(x, ctx, read, mask).float(), w.to(x.device))
        elif answering:
            return answer_steering(x, ctx, held.get("g"), strength, answer_direction, answer_steps)
        elif every_step:
            g = gate_score(x[:, -1].float(), w.to(x.device))
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:
            return None
        if window is not None:
            g = gate_window(g, *window)
        if ctx.is_prefill:
            held["g"] = g
        if record is not None:
            record.append((ctx.layer, ctx.step, g.detach().cpu()))
        return add_direction(x, scale(g, strength).to(x.dtype), direction.to(x.device), mask)

    if answering:
        return first_steps(hook, answer_steps)
    return hook if every_step else prefill_only(hook)


def static_hook(direction: Tensor, strength: float, every_step: bool = False) -> Callable[[Tensor, HookContext], Tensor | None]:
    """The no-gate ablation: the same direction added to every input, as if the gate were always 1."""
    direction = direction.float()

    def hook(x: Tensor, ctx: HookContext) -> Tensor | None:
        if not ctx.is_prefill and not every_step:
            return None
        mask = prompt_mask(x, ctx) if ctx.is_prefill else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        coef = torch.full((x.shape[0],), strength, dtype=x.dtype, device=x.device)
        return add_direction(x, coef, direction.to(x.device), mask)

    return hook if every_step else prefill_only(hook)


def stacked_hooks(stack: Sequence[str], steered: Sequence[tuple[str, Tensor, float, Tensor | None]], w: Tensor,
                  every_step: bool = False, record: list | None = None, read: str = "last",
                  window: tuple[float, float] | None = None, answer_steps: int = 0) -> list[tuple[str, Callable]]:
    """Hooks for one gate over several sites' reads (``gate_stack``), steering every
    ``(name, direction, strength, answer direction or None)``.

    A reader at each ``stack`` site keeps its :func:`gate_input` (the first one starts a new pass); the
    first steered site scores the concatenation once (:func:`eraser.gate.gate_score`, then ``window``) and
    every steered site adds ``strength * g * direction``.  The readers come first in the returned list, so
    at a site that is both read and steered the gate reads the unsteered activation.  The caller must
    order the steered sites at or after the last stacked one (:func:`eraser.features.check_stack`): a
    forward pass then visits every reader before the first steering.  With ``answer_steps`` and answer
    directions, the first generated tokens are steered too (:func:`answer_steering`; the readers rest after
    prefill); it overrides ``every_step``.
    """
    if read not in READS:
        raise ValueError(f"gate read must be one of {READS}, got {read!r}")
    w = w.float()
    state: dict[Any, Tensor] = {}

    def reader(i: int) -> Callable[[Tensor, HookContext], None]:
        def hook(x: Tensor, ctx: HookContext) -> None:
            if ctx.is_prefill:
                feat = gate_input(x, ctx, read)
            elif every_step and not answer_steps:
                feat = x[:, -1]
            else:
                return None
            if i == 0:
                state.clear()
            state[i] = feat.float()
            return None
        return hook

    def steerer(direction: Tensor, strength: float, answer_direction: Tensor | None
                ) -> Callable[[Tensor, HookContext], Tensor | None]:
        direction = direction.float()

        def hook(x: Tensor, ctx: HookContext) -> Tensor | None:
            if ctx.is_prefill:
                mask = prompt_mask(x, ctx)
            elif answer_steps and answer_direction is not None:
                return answer_steering(x, ctx, state.get("g"), strength, answer_direction, answer_steps)
            elif every_step:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            else:
                return None
            if "g" not in state:
                missing = [stack[i] for i in range(len(stack)) if i not in state]
                if missing:
                    raise RuntimeError(f"stacked gate: {missing} were not read before steering; steered sites "
                                       f"must come at or after the last stacked one")
                h = torch.cat([state[i].to(x.device) for i in range(len(stack))], dim=-1)
                g = gate_score(h, w.to(x.device))
                state["g"] = gate_window(g, *window) if window is not None else g
            g = state["g"]
            if record is not None:
                record.append((ctx.layer, ctx.step, g.detach().cpu()))
            return add_direction(x, scale(g, strength).to(x.dtype), direction.to(x.device), mask)
        return hook

    answering = bool(answer_steps) and any(a is not None for *_, a in steered)
    readers = [(name, reader(i)) for i, name in enumerate(stack)]
    if not (every_step and not answering):  # the readers act on the prefill only
        readers = [(name, prefill_only(fn)) for name, fn in readers]
    steerers = []
    for name, d, lam, a in steered:
        fn = steerer(d, lam, a)
        if answer_steps and a is not None:  # the prefill, then the first answer_steps tokens
            fn = first_steps(fn, answer_steps)
        elif not every_step:
            fn = prefill_only(fn)
        steerers.append((name, fn))
    return readers + steerers


def answer_steering(x: Tensor, ctx: HookContext, g: Tensor | None, strength: float, direction: Tensor,
                    steps: int) -> Tensor | None:
    """A generation step's steering: ``x + strength * g * direction`` at the new token(s) for steps ``1..steps``.

    ``g`` is the gate the prefill computed for each row (None: no prefill seen yet, nothing to do), and
    ``direction`` the answer direction (:func:`eraser.direction.first_answer_means`), read one token into
    the answer.  Why (an extension): prefill-only steering reaches the answer only through the steered
    prompt's keys and values, so a model can start the refusal and drift back to the fact one token
    later ("i enjoys fishing", measured on the default model); the prompt's direction pushes the first
    answer token, and it is the wrong push once "i" is there (steered every step, it repeats "i i i").
    The answer direction contrasts recall and refusal contexts after the refusal's first word, so it
    pushes "i" on to "cannot"; the gate stays the prompt's, so retain inputs (gate 0) are untouched.
    """
    if g is None or not 1 <= ctx.step <= steps:
        return None
    mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return add_direction(x, scale(g.to(x.device), strength).to(x.dtype), direction.float().to(x.device), mask)
