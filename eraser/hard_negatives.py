"""Hard-negative mining for the retain statistics: weight the retain queries a fitted gate fires on.

Why: the null-space gate treats every retain query alike, ``K_r = sum_i h_i h_i^T``, so a retain query
that reads almost like a forget one weighs no more than thousands of easy ones, and the projector's
energy rule may keep the little subspace where the two differ from the forget person.  On the Intel
quick model at forget 5 % the one forget person (Ben Brandt) shares his surname with a celebrity
(Oscar Brandt): the window gate scored the forget person's last answered question 0.667 and the
celebrity's questions up to 0.643 (window 0.42-0.85), so no strength steered one and spared the other.

The remedy is the textbook one (hard-negative mining): score every retain query with the gate a first
fit chose, and add the second moment of those over the window's ``lo`` (the ones it would steer at all)
again, ``weight`` times, ``K_r' = K_r + weight * sum_{hard} h h^T``.  The refit's null space and ridge
then have to keep those queries at a gate of ~0.  One more streaming pass over the retain set; no
parameter is learnt by gradient, and the artifact is unchanged in form.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interp import HookedVLM

from .features import gate_row_stream, gate_rows
from .gate import gate_score
from .nullspace import SecondMoment
from .stats import FitStats

__all__ = ["hard_negative_moments", "with_hard_negatives"]


def hard_negative_moments(model: HookedVLM, retain: Sequence[Any], w: Float[Tensor, "rows *c f"], config: Any,
                          layers: Sequence[int], threshold: float, progress: bool = False
                          ) -> tuple[Float[Tensor, "rows f f"], Bool[Tensor, "rows n"]]:
    """``(K_hard, hard)``: per gate row, ``sum h h^T`` over the retain queries whose gate ``w . h`` exceeds
    ``threshold``, and which queries those were (``hard.sum(1)`` counts them; ``hard.any(0)``, a query over it
    at some row).

    ``w`` is the gate a first fit chose, calibrated as it is deployed (``MLLMEraser.w`` after ``scaled``);
    per-concept gates score the maximum over concepts, as steering does (:func:`eraser.gate.gate_score`).
    """
    if not retain:
        raise ValueError("hard-negative mining needs retain queries; the retain set is empty")
    if not torch.isfinite(torch.as_tensor(threshold)):
        raise ValueError(f"hard-negative threshold must be a finite number, got {threshold!r}")
    n_rows = len(gate_rows(config, layers))
    if w.shape[0] != n_rows:
        raise ValueError(f"gate weights have {w.shape[0]} rows, the config reads {n_rows} gate rows")
    K = [SecondMoment(w.shape[-1]) for _ in range(n_rows)]
    masks: list[Tensor] = []
    for feats in gate_row_stream(model, retain, config, layers, progress, desc="retain (hard negatives)"):
        over = torch.stack([gate_score(h.double(), w[i].double()) > threshold for i, h in enumerate(feats)])
        for i, h in enumerate(feats):
            if over[i].any():
                K[i].update(h[over[i]])
        masks.append(over.cpu())
    return torch.stack([k.K.cpu() for k in K]), torch.cat(masks, dim=1)


def with_hard_negatives(stats: FitStats, K_hard: Float[Tensor, "rows f f"], weight: float,
                        counts: Sequence[int] | None = None) -> FitStats:
    """``stats`` with ``K_r + weight * K_hard`` (pure): the retain statistics that count each hard query
    ``1 + weight`` times.  ``counts`` (hard queries per gate row, ``hard.sum(1)``) is recorded in ``stats.counts``."""
    if not (weight >= 0 and torch.isfinite(torch.as_tensor(weight))):
        raise ValueError(f"hard-negative weight must be a finite number >= 0, got {weight!r}")
    if K_hard.shape != stats.K_r.shape:
        raise ValueError(f"hard-negative moments of shape {tuple(K_hard.shape)} do not match the retain "
                         f"statistics {tuple(stats.K_r.shape)}")
    extra = {"hard_negatives": int(sum(counts))} if counts is not None else {}
    return replace(stats, K_r=stats.K_r + weight * K_hard.to(stats.K_r), counts={**stats.counts, **extra})
