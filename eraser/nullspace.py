"""Stage 2a: the retain null-space projector, from streaming uncentred second moments.

Why streaming: the projector needs only ``K = H_r^T H_r`` (d x d), which is a
sum over queries, so it can be accumulated batch by batch in float64 and
memory stays flat however many retain queries there are.  Why uncentred: the
gate ``g(h) = w . h`` has no bias, so it is the raw second moment, not the
covariance, whose small directions make ``g`` vanish on retain inputs.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor


class SecondMoment:
    """Running ``K = sum_i h_i h_i^T`` and count, in float64, on the device of the first batch.

    Why there: on a GPU the per-batch ``h^T h`` (F x F, F up to a few times d_model) is the fit's
    heaviest arithmetic after the forward passes; done on the CPU it would also copy every batch over.
    """

    def __init__(self, d: int) -> None:
        self.K = torch.zeros(d, d, dtype=torch.float64)
        self.n = 0

    def update(self, h: Float[Tensor, "batch d"]) -> "SecondMoment":
        if h.dim() != 2 or h.shape[1] != self.K.shape[0]:
            raise ValueError(f"expected activations [batch, {self.K.shape[0]}], got {tuple(h.shape)}")
        if not torch.isfinite(h).all():
            raise ValueError("activations contain NaN or inf; refusing to fit a projector on them")
        if self.n == 0 and self.K.device != h.device:
            self.K = self.K.to(h.device)
        h64 = h.detach().to(self.K.device, torch.float64)
        self.K += h64.T @ h64
        self.n += h.shape[0]
        return self


@dataclass(frozen=True)
class ProjectorInfo:
    """What a projector keeps: its rank and the share of retain energy that still leaks through it."""

    rank: int
    d: int
    leak: float  # trace(P K) / trace(K): retain energy left after projection
    rule: str
    # numerical rank of K; when d - retain_rank > rank the kept directions are an arbitrary pick inside K's
    # exact null space (``underdetermined``): too few retain queries for the rule
    retain_rank: int | None = None
    underdetermined: bool = False


def null_space_projector(
    K: Float[Tensor, "d d"], rho: float | None = None, energy: float | None = None
) -> tuple[Float[Tensor, "d d"], ProjectorInfo]:
    """``P = Q Q^T`` over the eigenvectors of ``K`` with the smallest eigenvalues.

    Exactly one rule: ``rho`` keeps ``k = floor(rho * d)`` directions (the
    release's rule); ``energy`` keeps the largest ``k`` whose eigenvalues sum to
    at most ``energy`` of ``trace(K)``.  Both report the leak, so a too-large
    null space shows up as a number rather than as retain damage.

    With fewer retain directions than ``d - k`` (``rank(K) < d - k``) the rho
    rule's pick inside ``K``'s exact null space is arbitrary: it warns and says
    so in the info (``underdetermined``); the energy rule keeps the whole exact
    null space, so it never is.

    ``k`` is at least 1 under both rules (a gate needs a direction to live in):
    a ``rho`` under ``1/d``, or an ``energy`` below the smallest eigenvalue's
    share, still keeps that one direction, and the info's ``leak`` then exceeds
    the ``energy`` asked for (the number is reported, not hidden).
    """
    if (rho is None) == (energy is None):
        raise ValueError("give exactly one of rho (fraction of d) or energy (fraction of retain energy)")
    d = K.shape[0]
    evals, evecs = torch.linalg.eigh(K.to(torch.float64))  # ascending
    evals = evals.clamp(min=0)
    total = float(evals.sum())
    if total <= 0:
        raise ValueError("the retain second moment is zero: no retain activations were accumulated")
    if rho is not None:
        if not 0 < rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {rho}")
        k = max(1, math.floor(rho * d))
        rule = f"rho={rho}"
    else:
        if not 0 < energy < 1:
            raise ValueError(f"energy must be in (0, 1), got {energy}")
        k = int((torch.cumsum(evals, 0) <= energy * total).sum())
        k = max(1, k)
        rule = f"energy={energy}"
    Q = evecs[:, :k]
    P = Q @ Q.T
    leak = float(evals[:k].sum()) / total
    retain_rank = int((evals > 1e-10 * float(evals[-1])).sum())
    underdetermined = d - retain_rank > k
    if underdetermined:
        warnings.warn(
            f"the retain second moment has rank {retain_rank} of {d}, so its exact null space has "
            f"{d - retain_rank} directions and {rule} keeps {k} of them: an arbitrary pick (it changes with "
            "float rounding, e.g. the batch size), so the gate is not reproducible; use more retain queries "
            "(at least d - k) or the energy rule, which keeps the whole exact null space", stacklevel=2)
    return P, ProjectorInfo(rank=k, d=d, leak=leak, rule=rule, retain_rank=retain_rank,
                            underdetermined=underdetermined)
