"""The sufficient statistics of an MLLMEraser fit, and the closed-form solve on them.

Why a value object of its own: everything the gate depends on besides the
hyper-parameters (gamma, rho or the energy threshold) is four sums over the
data: the erasure directions, the retain second moment ``K_r = H_r^T H_r``,
the forget second moment ``K_f`` and the forget sum ``s_f = H_f^T 1`` (and, when
the forget queries are labelled by concept, the per-concept sums ``S_f = H_f^T Y``).
Keeping them lets a hyper-parameter search (``eraser.autotune.choose_gate``)
refit every candidate in milliseconds, and lets a researcher study the
projector and the ridge solve without re-running the model.  They are d x d
per layer, so unlike the deployed artifact (2d floats per layer) they are not
meant for shipping; they save and load with safetensors + JSON like it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from interp.io import atomic_path

from .gate import fit_gate_from_moments
from .nullspace import ProjectorInfo, null_space_projector

__all__ = ["FitStats", "gates_from_stats", "projectors_from_stats"]


@dataclass
class FitStats:
    """Per steered layer: direction ``d_l``, ``K_r``, ``K_f`` (d x d, float64) and ``s_f`` (float64).

    ``S_f`` (``[n_layers, C, d]``) holds the forget sums per concept, in the order of ``concepts`` (the
    forget profiles' ids), when the forget queries came with labels; per-concept gates need it.
    With ``gate_stack`` (a stacked gate, :mod:`eraser.features`) the gate statistics have one row over
    the stacked features (``K_r`` ``[1, F, F]`` etc.) while ``directions`` stay one per steered layer.
    ``answer_directions`` (``[n_layers, d]``) are read one token into the answer, when the config asked
    for answer steering (:func:`eraser.direction.first_answer_means`).
    """

    layers: list[int]
    site: str
    directions: Float[Tensor, "n_layers d"]
    K_r: Float[Tensor, "n_layers d d"]
    K_f: Float[Tensor, "n_layers d d"]
    s_f: Float[Tensor, "n_layers d"]
    S_f: Float[Tensor, "n_layers c d"] | None = None
    concepts: list[str] = field(default_factory=list)
    gate_stack: list[int] | None = None
    answer_directions: Float[Tensor, "n_layers d"] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    data_hashes: dict[str, str] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = ("directions", "K_r", "K_f", "s_f", "S_f", "answer_directions")
        meta = {k: v for k, v in asdict(self).items() if k not in tensors}
        with atomic_path(path) as tmp:
            save_file({k: getattr(self, k).cpu().contiguous() for k in tensors if getattr(self, k) is not None},
                      str(tmp),
                      metadata={"mllmeraser_stats": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FitStats":
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["mllmeraser_stats"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(**meta, **tensors)


def projectors_from_stats(stats: FitStats, rho: float | None = 0.3, energy: float | None = None,
                          use_null_space: bool = True) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """One null-space projector per layer (``energy`` wins over ``rho``); ``P = I`` without the null space."""
    Ps, infos = [], []
    d = stats.K_r.shape[-1]
    for K in stats.K_r:
        if not use_null_space:
            P = torch.eye(d, dtype=torch.float64, device=K.device)
            info = ProjectorInfo(rank=d, d=d, leak=1.0, rule="identity")
        elif energy is not None:
            P, info = null_space_projector(K, energy=energy)
        else:
            P, info = null_space_projector(K, rho=rho)
        Ps.append(P)
        infos.append(asdict(info))
    return Ps, infos


def gates_from_stats(stats: FitStats, config: Any, projectors: tuple[list[Tensor], list[dict]] | None = None
                     ) -> tuple[Float[Tensor, "n_layers *c d"], list[dict[str, Any]]]:
    """``(w, projector infos)`` for an :class:`~eraser.config.EraserConfig` (its rho/energy/gamma/use_null_space).

    ``w`` is ``[n_layers, d]`` (the rank-one gate), or ``[n_layers, C, d]`` with ``config.concept_gates``
    (one gate per forget concept, from ``S_f``).  ``projectors`` (from :func:`projectors_from_stats`)
    skips the eigendecompositions when only gamma changes.
    """
    Ps, infos = projectors or projectors_from_stats(stats, config.rho, config.energy, config.use_null_space)
    if getattr(config, "concept_gates", False):
        if stats.S_f is None:
            raise ValueError("per-concept gates need forget statistics per concept: collect them with "
                             "forget_concepts (one label per forget query)")
        ws = [fit_gate_from_moments(K_f, S.T, P, config.gamma).T for K_f, S, P in zip(stats.K_f, stats.S_f, Ps)]
    else:
        ws = [fit_gate_from_moments(K_f, s_f, P, config.gamma) for K_f, s_f, P in zip(stats.K_f, stats.s_f, Ps)]
    return torch.stack(ws), infos
