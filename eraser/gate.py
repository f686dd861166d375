"""Stage 2b: the closed-form ridge gate, stored in its rank-one (or low-rank) form.

The release fits ``Delta* = pinv(P H_f^T H_f P + gamma P) P H_f^T 1 d^T`` and
steers with the d x d matrix ``S = P Delta*``.  Every target row is the same
direction ``d``, so ``S = w d^T`` with ``w = P pinv(P H_f^T H_f P + gamma P) P H_f^T 1``:
the steering is a scalar gate ``g(h) = w . h`` times ``d``.  We store ``w``
and ``d`` (2d floats per layer instead of d^2).  With several concepts
(targets ``Y`` one-hot over C concepts, directions ``D`` d x C) the same
algebra gives ``S = W D^T`` with ``W = P pinv(...) P H_f^T Y``.

:class:`NullSpaceGate` is the stage's value object: the fitted ``w`` with what
it reads (site, prompt read, stacked layers), its window, the solve's settings
and the null space's report, saved and loaded on its own (safetensors + JSON).
An :class:`~eraser.method.MLLMEraser` hands out its own as ``eraser.gate``.

>>> gate = NullSpaceGate.from_stats(stats, gamma=1.0, energy=0.01)   # doctest: +SKIP
>>> gate.values(model, forget_queries).mean(0)    # near 1 on the forget queries it was fitted on (small gamma)
>>> gate.save("gate.safetensors"); NullSpaceGate.load("gate.safetensors", model)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .artifact import ArtifactError, check_fingerprint, check_shape, layer_indices, read_artifact, write_artifact
from .features import row_names, stream_rows


def _ridge_core(H_f: Tensor, P: Tensor, gamma: float) -> Tensor:
    """``P pinv(P H^T H P + gamma P) P H^T``: the map from per-query targets to gate weights."""
    if H_f.shape[0] == 0:
        raise ValueError("the forget set is empty: no activations to fit the gate on")
    if not torch.isfinite(H_f).all():
        raise ValueError("forget activations contain NaN or inf")
    if not (math.isfinite(gamma) and gamma >= 0):  # NaN too; inf shrank the gate to exactly zero, silently
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    H = H_f.to(torch.float64)
    P = P.to(torch.float64)
    A = P @ H.T @ H @ P + gamma * P
    return P @ torch.linalg.pinv(A, hermitian=True) @ P @ H.T


def fit_gate(H_f: Float[Tensor, "n d"], P: Float[Tensor, "d d"], gamma: float) -> Float[Tensor, " d"]:
    """Rank-one gate weights ``w`` so that ``w . h ~ 1`` on forget activations and ``w`` lies in the null space."""
    core = _ridge_core(H_f, P, gamma)
    return core @ torch.ones(H_f.shape[0], dtype=torch.float64, device=core.device)


def fit_gate_from_moments(K_f: Float[Tensor, "d d"], s_f: Float[Tensor, "d *c"], P: Float[Tensor, "d d"],
                          gamma: float) -> Float[Tensor, "d *c"]:
    """The same ``w`` from streaming statistics ``K_f = H_f^T H_f`` and ``s_f = H_f^T 1``.

    The fit needs nothing else, so forget activations never have to be held in memory at once.
    With ``s_f = H_f^T Y`` (``[d, C]``, one column of sums per concept) it returns the ``[d, C]``
    weights :func:`fit_gates` would: one gate per concept, sharing ``K_f`` and the null space.
    """
    if not torch.isfinite(K_f).all() or not torch.isfinite(s_f).all():
        raise ValueError("forget statistics contain NaN or inf")
    if not (math.isfinite(gamma) and gamma >= 0):  # NaN too; inf shrank the gate to exactly zero, silently
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    P = P.to(torch.float64)
    K_f = K_f.to(torch.float64)
    s_f = s_f.to(torch.float64)
    if gamma > 0:
        # A = P K_f P + gamma P is singular off the null space, so the release takes its pseudo-inverse.  But
        # M = A + gamma (I - P) = P K_f P + gamma I is positive definite, block-diagonal over range(P) and its
        # complement, and agrees with A on range(P): P A^+ P s = P M^-1 P s.  A Cholesky solve of M is ~4x
        # cheaper than the eigendecomposition pinv runs (measured at d = 1024; it matters at d = 4096 x 31
        # layers, and in the automatic choice of gamma, which refits many times).
        M = P @ K_f @ P
        M.diagonal().add_(gamma)
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) == 0:
            rhs = P @ s_f
            w = P @ torch.cholesky_solve(rhs[:, None] if rhs.ndim == 1 else rhs, L)
            return w[:, 0] if s_f.ndim == 1 else w
    A = P @ K_f @ P + gamma * P  # gamma = 0, or M too ill-conditioned for Cholesky: the release's pinv
    return P @ torch.linalg.pinv(A, hermitian=True) @ P @ s_f


def fit_gates(H_f: Float[Tensor, "n d"], Y: Float[Tensor, "n c"], P: Float[Tensor, "d d"], gamma: float
              ) -> Float[Tensor, "d c"]:
    """Low-rank generalisation: one gate per concept; ``Y[i, c] = 1`` if query ``i`` is about concept ``c``."""
    if Y.shape[0] != H_f.shape[0]:
        raise ValueError(f"Y has {Y.shape[0]} rows for {H_f.shape[0]} activations")
    return _ridge_core(H_f, P, gamma) @ Y.to(torch.float64)


def release_steering_matrix(H_f: Float[Tensor, "n d"], P: Float[Tensor, "d d"], direction: Float[Tensor, " d"],
                            gamma: float) -> Float[Tensor, "d d"]:
    """The release's d x d matrix ``S = P Delta*``, for testing that ``S == w d^T`` (never used to steer)."""
    H = H_f.to(torch.float64)
    P = P.to(torch.float64)
    target = torch.ones(H.shape[0], 1, dtype=torch.float64, device=H.device) @ direction.to(torch.float64)[None]
    delta = torch.linalg.pinv(P @ H.T @ H @ P + gamma * P, hermitian=True) @ P @ H.T @ target
    return P @ delta


def gate_score(h: Float[Tensor, "... d"], w: Float[Tensor, "*c d"]) -> Float[Tensor, "..."]:
    """``g(h) = w . h`` in the activations' dtype; with per-concept weights ``w`` ``[C, d]``, ``max_c w_c . h``.

    Why the max (an extension, not the paper): one gate per forget concept (person), each calibrated
    to ~1 on its own concept, steers an input as much as the concept it reads most like.  A single
    gate must fire on every forget person at once, so with several people its weights average their
    signatures and a weak one (a text-only question about one of them) falls under the retain tail;
    per-concept gates keep each signature sharp (measured on the quick model, seed 0, validation gates
    calibrated: the 10th-percentile forget gate over the 99th-percentile retain gate rose from 1.61 to
    2.07 at forget 10 % and from 1.19 to 1.78 at forget 15 %).
    The sum would add every concept's small retain leak; the max adds none.
    """
    if w.ndim == 1:
        return h @ w.to(h.dtype)
    return (h @ w.to(h.dtype).T).amax(-1)


def window(g: Float[Tensor, "..."], lo: float, hi: float) -> Float[Tensor, "..."]:
    """A saturating gate: 0 below ``lo``, 1 above ``hi``, linear in between (an extension, not the paper).

    Why: the linear gate's value is proportional to how strongly an input reads as "forget", so a
    forget question whose identity signal is weak (text-only, where the name is a few tokens of a long
    prompt) gets a fraction of the steering an image question gets, and no single strength both
    flips it to a refusal and spares retain inputs (measured on the quick model: forget text-only
    gates 0.2-0.8, image gates 1.1-1.7, retain |g| <= 0.36).  Windowed, every input past ``hi`` gets
    the full strength and every input under ``lo`` none.  METHOD.md asks whether a linear gate is
    enough; this is the measured answer's tool.
    """
    if not hi > lo:
        raise ValueError(f"a gate window needs lo < hi, got ({lo}, {hi})")
    return ((g - lo) / (hi - lo)).clamp(0.0, 1.0)


FORMAT = "mllmeraser.gate.v1"
READS = ("last", "mean")


@dataclass(frozen=True, eq=False)  # identity equality: tensors have no single truth value
class NullSpaceGate:
    """The closed-form gates of one fit: ``g_l(h) = w_l . h`` per steered layer, fitted in the retain null space.

    ``w`` is ``[n_layers, d]`` (the paper), ``[n_layers, C, d]`` with one gate per forget concept (``concepts``
    names them; the score is their max), or, with ``stack`` (layers whose reads are concatenated), one row over
    the stacked features, ``[1, F]`` / ``[1, C, F]``, seen by every steered layer.  ``read`` is where in the prompt
    the gate reads (``"last"`` token, the paper's; ``"mean"`` over the prompt), ``window`` the optional
    saturating window (:func:`window`).  ``settings`` records the solve (gamma, rho / energy, use_null_space) and
    ``projector`` each layer's null-space report (:class:`~eraser.nullspace.ProjectorInfo`: rank, leak, rule);
    ``fingerprint`` the model, ``counts`` and ``data_hashes`` the forget and retain queries it was fitted on.
    """

    layers: list[int]
    site: str
    w: Float[Tensor, "rows *c f"]
    read: str = "last"
    stack: list[int] | None = None
    window: tuple[float, float] | None = None
    concepts: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    projector: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    data_hashes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", layer_indices(self.layers))
        if self.site not in ("resid_pre", "resid_post"):
            raise ValueError(f"site must be 'resid_pre' or 'resid_post', got {self.site!r}")
        if self.read not in READS:
            raise ValueError(f"read must be one of {READS}, got {self.read!r}")
        if self.stack is not None:
            stack = layer_indices(self.stack, "stack") if list(self.stack) else []
            if stack != sorted(stack):
                raise ValueError(f"stack must list its layers in increasing order, got {self.stack!r}")
            object.__setattr__(self, "stack", stack or None)
        if self.window is not None:
            lo, hi = (float(x) for x in self.window)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"a gate window needs finite lo < hi, got {self.window}")
            object.__setattr__(self, "window", (lo, hi))
        if not self.w.is_floating_point() or not bool(torch.isfinite(self.w).all()):
            raise ValueError("gate weights must be finite floating-point numbers")
        rows = 1 if self.stack else len(self.layers)
        ndim = 3 if self.concepts else 2
        if self.w.ndim != ndim or self.w.shape[0] != rows or (self.concepts and self.w.shape[1] != len(self.concepts)):
            raise ValueError(f"gate weights of shape {tuple(self.w.shape)} do not fit {rows} gate row(s)"
                             + (f" with {len(self.concepts)} concepts" if self.concepts else ""))
        if self.stack and self.w.shape[-1] % len(self.stack):
            raise ValueError(f"a gate stacked over {len(self.stack)} layers reads {len(self.stack)} x d features; "
                             f"its weights are {self.w.shape[-1]} wide")

    @property
    def d_model(self) -> int:
        """The width of one layer's read (the stacked gate's features are ``len(stack)`` of them)."""
        return self.w.shape[-1] // (len(self.stack) if self.stack else 1)

    # -- building ------------------------------------------------------------------
    @classmethod
    def from_stats(cls, stats: Any, gamma: float = 0.1, rho: float | None = 0.3, energy: float | None = None,
                   use_null_space: bool = True, concept_gates: bool = False, read: str = "last",
                   window: tuple[float, float] | None = None) -> "NullSpaceGate":
        """The closed-form solve on :class:`~eraser.stats.FitStats` (milliseconds: no model pass).

        ``energy`` wins over ``rho``, as in :class:`~eraser.config.EraserConfig`; ``read`` must be the read the
        statistics were collected with (``EraserConfig.gate_read``).
        """
        from types import SimpleNamespace

        from .stats import gates_from_stats

        settings = {"gamma": float(gamma), "rho": rho, "energy": energy, "use_null_space": bool(use_null_space)}
        w, infos = gates_from_stats(stats, SimpleNamespace(**settings, concept_gates=concept_gates))
        return cls(list(stats.layers), stats.site, w.float(), read, stats.gate_stack, window,
                   list(stats.concepts) if concept_gates else [], settings,
                   dict(zip(map(str, stats.layers), infos)), dict(stats.fingerprint),
                   {k: v for k, v in stats.counts.items() if k in ("forget", "retain")},
                   {k: v for k, v in stats.data_hashes.items() if k in ("forget", "retain")})

    # -- scoring ---------------------------------------------------------------------
    def rows(self) -> list[list[str]]:
        """Per gate row, the hook names whose reads it concatenates (:func:`eraser.features.row_names`)."""
        return row_names(self.site, self.layers, self.stack)

    def score(self, rows: Sequence[Float[Tensor, "batch f"]], raw: bool = False) -> Float[Tensor, "batch n_layers"]:
        """Gate values per steered layer from each row's features (what :meth:`rows` names, read as ``read``):
        through the window unless ``raw``."""
        if len(rows) != self.w.shape[0]:
            raise ValueError(f"{len(rows)} feature rows for {self.w.shape[0]} gate row(s)")
        g = torch.stack([gate_score(h, self.w[i].to(h.device)) for i, h in enumerate(rows)], dim=1)
        if self.stack:  # one gate, seen by every steered layer
            g = g.expand(-1, len(self.layers)).contiguous()
        if self.window is not None and not raw:
            g = window(g, *self.window)
        return g

    def values(self, model: Any, queries: Sequence[Any], batch_size: int = 32, raw: bool = False
               ) -> Float[Tensor, "n_queries n_layers"]:
        """``[n_queries, n_layers]`` gate values on ``model``'s vanilla activations for ``(image or None, prompt)``
        queries: what each steered layer's gate sees unsteered."""
        from .queries import split_queries

        self.check_model(model)
        images, prompts = split_queries(queries, "gate-value")
        return torch.cat([self.score(feats, raw) for feats in stream_rows(
            model, images, prompts, self.rows(), self.read, batch_size, desc="gate values")])

    def check_model(self, model: Any) -> None:
        """Refuse a model whose depth or width does not fit, or (with a fingerprint) another model."""
        check_shape(self.layers + list(self.stack or []), self.d_model, model.n_layers, model.d_model, "this gate",
                    "the model")
        check_fingerprint(self.fingerprint, model, "this gate")

    def __repr__(self) -> str:
        shape = "stacked over layers " + str(self.stack) if self.stack else f"per layer at {self.layers}"
        return (f"NullSpaceGate({shape}, {self.site} read {self.read!r}, w {tuple(self.w.shape)}"
                + (f", {len(self.concepts)} concepts" if self.concepts else "")
                + (f", window {self.window}" if self.window else "") + f", settings {self.settings})")

    # -- persistence -------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """One safetensors file, its JSON metadata in the header; written atomically."""
        meta = {"format": FORMAT, "layers": self.layers, "site": self.site, "read": self.read, "stack": self.stack,
                "window": list(self.window) if self.window else None, "concepts": self.concepts,
                "settings": self.settings, "projector": self.projector, "fingerprint": self.fingerprint,
                "counts": self.counts, "data_hashes": self.data_hashes}
        return write_artifact(path, {"w": self.w}, "mllmeraser_gate", meta)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "NullSpaceGate":
        """Read a saved gate (no code executed); refuse it if ``model`` is not the model it was fitted on."""
        tensors, meta = read_artifact(path, "mllmeraser_gate", FORMAT, "null-space gate", tensors=("w",),
                                      fields=("layers", "site"))
        try:
            out = cls(meta["layers"], meta["site"], tensors["w"], meta.get("read", "last"), meta.get("stack"),
                      tuple(meta["window"]) if meta.get("window") else None, list(meta.get("concepts") or []),
                      dict(meta.get("settings") or {}), dict(meta.get("projector") or {}),
                      dict(meta.get("fingerprint") or {}), dict(meta.get("counts") or {}),
                      dict(meta.get("data_hashes") or {}))
            fp = out.fingerprint
            check_shape(out.layers + list(out.stack or []), out.d_model, fp.get("n_layers"), fp.get("d_model"),
                        "the gate", "the model its fingerprint names")
        except (TypeError, ValueError) as e:  # ArtifactMismatchError too: the file contradicts itself
            raise ArtifactError(f"{path}: not a consistent null-space gate ({e})") from None
        if model is not None:
            out.check_model(model)
        return out
