"""The method's settings (:class:`EraserConfig`), checked when built so a bad value fails before any activation is
collected, and the split between fitted settings and the ones that only say how a fitted eraser is applied.

>>> EraserConfig(layers=[2, 1], rho=0.5).layers   # a list (or an artifact's JSON list) is stored as a tuple
(2, 1)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from interp.collect import READS

from .features import site_name


@dataclass(frozen=True)
class EraserConfig:
    """Method settings.  Defaults follow the release for LLaVA (METHOD.md).

    ``layers`` None means every decoder layer except 0.  Exactly one of
    ``rho`` (null-space dimension as a fraction of d) or ``energy`` (retain
    energy the null space may hold) is used; ``energy`` wins when set.
    ``use_null_space=False`` is the ablation with ``P = I``.  ``gate_read`` is what the gate (and so
    the forget/retain statistics) reads: ``"last"``, the paper's last prompt token, or ``"mean"``, the
    mean over the prompt positions (an extension; see :func:`eraser.steer.gate_input`).  The erasure
    direction is always taken at the last prompt token.  ``gate_window`` ``(lo, hi)``, when set, passes
    the gate through :func:`eraser.gate.window` (0 below ``lo``, 1 above ``hi``): an extension, chosen
    automatically by :func:`eraser.autotune.choose_window`; None is the paper's linear gate.
    ``concept_gates`` fits one gate per forget concept (profile) and steers by their maximum
    (:func:`eraser.gate.gate_score`): an extension; the paper's gate is one per layer.
    ``gate_stack``, when set, replaces the per-layer gates by one gate over the concatenated reads at
    those layers' sites (:mod:`eraser.features`), shared by every steered layer; every steered layer
    must come at or after the last stacked one, so one forward pass reads before it steers.  An extension.
    ``answer_steps`` > 0 also steers the first that many generated tokens, along an answer direction
    read one token into the answer with ``answer_prefix`` (the refusal's first word) forced, scaled by
    the gate the prefill computed (:func:`eraser.steer.answer_steering`; an extension: the paper steers
    the prefill only, or every step with a fresh gate, ``every_step``, which this overrides).  Its hooks are
    marked ``first_steps(fn, answer_steps)``, so every backend applies them to those steps, with or without
    ``generate(..., every_step=True)``.
    """

    layers: tuple[int, ...] | None = None
    site: str = "resid_pre"
    rho: float | None = 0.3
    energy: float | None = None
    gamma: float = 0.1
    strength: float = -0.25
    use_null_space: bool = True
    every_step: bool = False
    batch_size: int = 32
    gate_read: str = "last"
    gate_window: tuple[float, float] | None = None
    concept_gates: bool = False
    gate_stack: tuple[int, ...] | None = None
    answer_steps: int = 0
    answer_prefix: str = "I"

    def __post_init__(self) -> None:
        if self.site not in ("resid_pre", "resid_post"):
            raise ValueError(f"site must be 'resid_pre' or 'resid_post', got {self.site!r}")
        if self.gate_read not in READS:
            raise ValueError(f"gate_read must be one of {READS} ('last' is the paper's h_T), got {self.gate_read!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.layers is not None:
            try:
                layers = tuple(int(l) for l in self.layers)  # also accepts a list or the JSON list an artifact stores
            except (TypeError, ValueError):
                raise ValueError(f"layers must be decoder layer indices, got {self.layers!r}") from None
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers {list(self.layers)} repeat a layer; each layer is steered once")
            object.__setattr__(self, "layers", layers)
        if not isinstance(self.every_step, bool):
            raise ValueError(f"every_step must be True or False, got {self.every_step!r}")
        if isinstance(self.strength, (str, bool)):
            raise ValueError(f"strength must be a finite number, got {self.strength!r}")
        try:
            strength = float(self.strength)  # also a numpy or 0-d torch scalar from a strength search
        except (TypeError, ValueError):
            strength = math.nan
        if not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {self.strength!r}")
        object.__setattr__(self, "strength", strength)
        # checked here, not only in the solve: a bad value must fail before any activation is collected
        gamma = _finite_float(self.gamma, "gamma")
        if gamma < 0:
            raise ValueError(f"gamma (the gate's ridge penalty) must be a finite number >= 0, got {self.gamma!r}")
        object.__setattr__(self, "gamma", gamma)
        if self.rho is None and self.energy is None:
            raise ValueError("give rho (the null space's share of d) or energy (the retain energy it may hold)")
        if self.rho is not None:  # None is allowed when energy (which wins) is set
            rho = _finite_float(self.rho, "rho")
            if not 0 < rho <= 1:
                raise ValueError(f"rho (the null space's share of d) must lie in (0, 1], got {self.rho!r}")
            object.__setattr__(self, "rho", rho)
        if self.energy is not None:
            energy = _finite_float(self.energy, "energy")
            if not 0 < energy < 1:
                raise ValueError(f"energy (the retain energy the null space may hold) must lie in (0, 1), "
                                 f"got {self.energy!r}")
            object.__setattr__(self, "energy", energy)
        if self.gate_window is not None:
            try:
                lo, hi = (float(x) for x in self.gate_window)  # also accepts the JSON list an artifact stores
            except (TypeError, ValueError):
                lo = hi = math.nan
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"gate_window must be two finite numbers lo < hi, got {self.gate_window!r}")
            object.__setattr__(self, "gate_window", (lo, hi))
        if self.gate_stack is not None:
            try:
                stack = tuple(int(l) for l in self.gate_stack)  # also accepts the JSON list an artifact stores
            except (TypeError, ValueError):
                stack = ()
            if not stack or list(stack) != sorted(set(stack)) or min(stack) < 0:
                raise ValueError(f"gate_stack must be distinct layer indices >= 0 in increasing order, "
                                 f"got {self.gate_stack!r}")
            object.__setattr__(self, "gate_stack", stack)
        if isinstance(self.answer_steps, bool) or not isinstance(self.answer_steps, int) or self.answer_steps < 0:
            raise ValueError(f"answer_steps must be an integer >= 0, got {self.answer_steps!r}")
        if self.answer_steps and not self.answer_prefix.strip():
            raise ValueError("answer_steps needs an answer_prefix (the refusal's first word, e.g. 'I')")

    def hook_name(self, layer: int) -> str:
        return site_name(self.site, layer)


#: The :class:`EraserConfig` fields that only say how fitted gates are applied (:meth:`MLLMEraser.with_config`).
APPLICATION_FIELDS = frozenset({"strength", "every_step", "gate_window", "answer_steps", "batch_size"})


def _finite_float(value: Any, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return out
