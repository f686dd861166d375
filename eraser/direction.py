"""Stage 1: the erasure direction, the mean difference between recall and refusal activations.

``d_l = mean_recall h_l - mean_erase h_l`` points from "refuses" towards
"recalls"; it is applied with a negative strength, pushing forget queries
towards refusal.  One site throughout (the block input by default), which
fixes the release's off-by-one between where the direction is read and where
the gate is fit.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm


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


def first_answer_means(model: Any, images: Sequence[Any], prompts: Sequence[str], names: Sequence[str],
                       prefix: str, batch_size: int = 32, progress: bool = False, desc: str = "answer"
                       ) -> dict[str, Float[Tensor, " d"]]:
    """Mean activation (float64) at each of ``names`` one token into the answer, with ``prefix`` forced as the answer.

    Why: the answer direction (``EraserConfig.answer_steps``) is ``recall - erase`` read where the
    model has just written the refusal's first word (``prefix``, e.g. "I") and decides whether to go
    on refusing or to answer: the position after the last prompt token, with ``prefix`` teacher-forced
    on both sides.  Causal attention makes the read independent of anything after ``prefix``.
    """
    if not prompts:
        raise ValueError(f"no queries to read the {desc} direction from (an empty set)")
    if not prefix.strip():
        raise ValueError("the answer prefix (the refusal's first word) must not be empty")
    sums: dict[str, Tensor] = {}
    for s in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        ims, ps = list(images[s:s + batch_size]), list(prompts[s:s + batch_size])
        enc = model.encode(images=ims, prompts=ps, answers=[prefix] * len(ps))
        _, cache = model.run_with_cache(enc, names=list(names), stop_early=True)
        rows = torch.arange(len(ps))
        for n in names:
            h = cache[n][rows, enc.last_index.to(cache[n].device) + 1].double()
            if not torch.isfinite(h).all():
                raise ValueError(f"{desc} activations at {n} contain NaN or inf")
            sums[n] = sums.get(n, 0) + h.sum(0)
    return {n: v / len(prompts) for n, v in sums.items()}
