"""Stage 1: the erasure direction, the mean difference between recall and refusal activations.

``d_l = mean_recall h_l - mean_erase h_l`` points from "refuses" towards
"recalls"; it is applied with a negative strength, pushing forget queries
towards refusal.  One site throughout (the block input by default), which
fixes the release's off-by-one between where the direction is read and where
the gate is fit.
"""
from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def mean_difference(h_recall: Float[Tensor, "n d"], h_erase: Float[Tensor, "m d"]) -> Float[Tensor, " d"]:
    if h_recall.shape[0] == 0 or h_erase.shape[0] == 0:
        raise ValueError(f"need at least one pair on each side (recall {h_recall.shape[0]}, erase {h_erase.shape[0]})")
    if h_recall.shape[1:] != h_erase.shape[1:]:
        raise ValueError(f"width mismatch: recall {tuple(h_recall.shape)} vs erase {tuple(h_erase.shape)}")
    return h_recall.to(torch.float64).mean(0) - h_erase.to(torch.float64).mean(0)


def projection(h: Float[Tensor, "... d"], direction: Float[Tensor, " d"]) -> Float[Tensor, "..."]:
    """Scalar projection of activations on the unit direction (the activation shift the paper pictures)."""
    d = direction.to(h.dtype)
    return h @ (d / d.norm().clamp(min=1e-12))
