"""The training-based unlearning objectives the paper compares MLLMEraser with, as pure functions.

Why pure functions on per-row quantities: the training loop
(:mod:`eraser.baselines.finetune`) owns batching, the frozen reference model
and the optimiser; the maths of each baseline is then a few lines that can be
checked against hand-computed numbers.  Every loss is *minimised*: gradient
ascent on the forget set appears as ``-NLL_forget``.

* GA (gradient ascent): ``-mean NLL_forget``.
* GradDiff: ``-mean NLL_forget + w * mean NLL_retain``.
* KL_Min: ``-mean NLL_forget + w * mean KL(p_ref || p_theta)`` over the retain answer tokens.
* NPO: ``mean -(2/beta) log sigmoid(-beta (log p_theta(y|x) - log p_ref(y|x)))`` over forget
  sequences (sequence log-probabilities), optionally ``+ w * mean NLL_retain``.

>>> import torch
>>> round(float(npo_loss(torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1)), 4)  # (2/beta) log 2
13.8629
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "answer_mask",
    "sequence_logprob",
    "token_kl",
    "ga_loss",
    "grad_diff_loss",
    "kl_min_loss",
    "npo_loss",
]


def answer_mask(labels: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos_1"]:
    """1.0 where position ``t`` predicts a labelled (answer) token ``t + 1``; labels use -100 for "no loss"."""
    return (labels[:, 1:] != -100).float()


def sequence_logprob(logits: Float[Tensor, "batch pos vocab"], labels: Int[Tensor, "batch pos"]
                     ) -> Float[Tensor, " batch"]:
    """``log p(answer | prompt)``: the *sum* of each row's answer-token log-probabilities (NPO's quantity)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * answer_mask(labels)).sum(-1)


def token_kl(logits: Float[Tensor, "batch pos vocab"], ref_logits: Float[Tensor, "batch pos vocab"],
             labels: Int[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
    """Mean over each row's answer positions of ``KL(p_ref || p_theta)`` of the next-token distributions.

    Zero when the two models agree; the reference is detached (it is the frozen vanilla model).
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits[:, :-1].float().detach(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    mask = answer_mask(labels)
    return (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def ga_loss(forget_nll: Float[Tensor, " batch"]) -> Float[Tensor, ""]:
    """Gradient ascent: minimise ``-NLL`` of the forget answers (unbounded below: the model can collapse)."""
    return -forget_nll.mean()


def grad_diff_loss(forget_nll: Float[Tensor, " batch"], retain_nll: Float[Tensor, " batch"],
                   retain_weight: float = 1.0) -> Float[Tensor, ""]:
    """Gradient difference: ascend on the forget answers, descend on the retain answers."""
    return -forget_nll.mean() + retain_weight * retain_nll.mean()


def kl_min_loss(forget_nll: Float[Tensor, " batch"], retain_kl: Float[Tensor, " batch"],
                retain_weight: float = 1.0) -> Float[Tensor, ""]:
    """KL minimisation: ascend on the forget answers, stay close to the frozen model on retain (``retain_kl``
    from :func:`token_kl`)."""
    return -forget_nll.mean() + retain_weight * retain_kl.mean()


def npo_loss(logp_theta: Float[Tensor, " batch"], logp_ref: Float[Tensor, " batch"], beta: float = 0.1,
             retain_nll: Float[Tensor, " batch"] | None = None, retain_weight: float = 1.0) -> Float[Tensor, ""]:
    """Negative preference optimisation on forget sequences (log-probs from :func:`sequence_logprob`).

    ``-(2/beta) log sigmoid(-beta (log p_theta - log p_ref))``: equals ``(2/beta) log 2`` at the reference,
    decreases (towards 0) as the model's probability of the forget answer falls below the reference's, and its
    gradient vanishes once the answer is unlikely, so unlike GA it does not diverge.  With ``retain_nll`` the
    retain NLL is added (the "NPO + RT" variant).
    """
    if not 0 < beta < float("inf"):  # also NaN
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    log_ratio = logp_theta - logp_ref.detach()
    loss = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()
    if retain_nll is not None:
        loss = loss + retain_weight * retain_nll.mean()
    return loss
