"""Weight saliency for MMUnlearner: which parameters matter more for the forget set than for what must be kept.

MMUnlearner (Huo et al., ACL 2025 Findings, arXiv 2502.11051) restricts
gradient ascent to the parameters whose importance for the forget people's
*visual* questions outweighs their importance for what must survive: the
retained people and the forget people's *textual* knowledge.  Everything
else is left bit-identical, which is why it damages retain knowledge less than
plain GA.  Reconstructed from the paper's description, not from its code:

* importance ``I(theta) = mean over batches of (dL/dtheta)^2`` (a diagonal,
  Fisher-style estimate from batch gradients of the answer NLL);
* mask ``M = I_forget / (I_keep + eps) > threshold`` (the importance ratio);
* update: ``theta <- theta - lr * Adam(M * grad)`` of the GradDiff objective.

Pure functions on name -> tensor dicts, so the maths is checked on hand-made
numbers and the training loop (:mod:`eraser.baselines.finetune`) stays the only
place that knows about models and optimisers.

>>> import torch
>>> m = saliency_mask({"w": torch.tensor([4.0, 1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0, 0.0])}, threshold=2.0)
>>> m["w"].tolist()
[True, False, False]
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["squared_grad_importance", "saliency_mask", "mask_fraction", "mask_gradients"]


def squared_grad_importance(params: Mapping[str, torch.nn.Parameter], batches: Iterable,
                            loss_of: Callable[[object], Tensor]) -> dict[str, Tensor]:
    """Mean over ``batches`` of each parameter's squared gradient of ``loss_of(batch)``.

    Leaves every ``.grad`` as it found it (None).  Parameters that get no
    gradient from any batch have importance 0.  Float32 accumulators whatever
    the parameters' dtype, so a bf16 model does not round small squares to 0.
    """
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    n_batches = 0
    for batch in batches:
        for p in params.values():
            p.grad = None
        loss_of(batch).backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n] += p.grad.detach().float() ** 2
        n_batches += 1
    for p in params.values():
        p.grad = None
    if n_batches == 0:
        raise ValueError("no batches to estimate importance from")
    return {n: a / n_batches for n, a in acc.items()}


def saliency_mask(forget: Mapping[str, Tensor], keep: Mapping[str, Tensor], threshold: float = 1.0,
                  eps: float = 1e-12) -> dict[str, Tensor]:
    """``forget / (keep + eps) > threshold`` per entry: True where a parameter may change.

    A parameter neither set moves (both importances 0) is never selected;
    one only the forget set moves is always selected.
    """
    if not threshold > 0:  # also NaN
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    if set(forget) != set(keep):
        raise ValueError(f"importance dicts name different parameters: {sorted(set(forget) ^ set(keep))[:5]}")
    out = {}
    for n, f in forget.items():
        k = keep[n]
        if f.shape != k.shape:
            raise ValueError(f"{n}: forget importance {tuple(f.shape)} vs keep {tuple(k.shape)}")
        out[n] = (f > 0) & (f > threshold * (k.float() + eps))
    return out


def mask_fraction(mask: Mapping[str, Tensor]) -> float:
    """The fraction of all entries the mask selects."""
    total = sum(m.numel() for m in mask.values())
    return float(sum(int(m.sum()) for m in mask.values()) / max(total, 1))


def mask_gradients(params: Mapping[str, torch.nn.Parameter], mask: Mapping[str, Tensor]) -> None:
    """Zero every gradient entry outside the mask, in place (parameters without a gradient are skipped)."""
    for n, p in params.items():
        if p.grad is not None:
            p.grad.mul_(mask[n].to(p.grad.dtype))
