"""Stage 1: the erasure direction, the mean difference between recall and refusal activations.

``d_l = mean_recall h_l - mean_erase h_l`` points from "refuses" towards
"recalls"; it is applied with a negative strength, pushing forget queries
towards refusal.  One site throughout (the block input by default), which
fixes the release's off-by-one between where the direction is read and where
the gate is fit.

:class:`ErasureDirection` is the stage's value object: the per-layer directions
with where they were read and on which model, saved and loaded on their own
(safetensors + JSON), so a researcher can study, compare or steer with a
direction without the gate.  An :class:`~eraser.method.MLLMEraser` hands out its
own as ``eraser.direction``.

>>> direction = ErasureDirection.fit(model, recall_pairs, erase_pairs, layers=[4, 8])  # doctest: +SKIP
>>> direction.cosine(other)                      # per-layer agreement with another fit
>>> with model.hooks(direction.hooks(strength=-1.0)):   # static steering along it, no gate
...     out = model.generate(inputs, max_new_tokens=16)
>>> direction.save("direction.safetensors"); ErasureDirection.load("direction.safetensors", model)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .artifact import ArtifactError, check_fingerprint, check_shape, layer_indices, read_artifact, write_artifact
from .features import site_name
from .queries import Query, hash_queries, split_queries

SITES = ("resid_pre", "resid_post")


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


def unit_rows(v: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    """Each row scaled to unit norm, in float64 (a zero row stays zero)."""
    v = v.double()
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def cosine_rows(a: Float[Tensor, "n d"], b: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
    """Row-wise cosine similarity (float64), e.g. of two directions layer by layer."""
    return (unit_rows(a) * unit_rows(b)).sum(-1)


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


def pair_means(model: Any, images: Sequence[Any], prompts: Sequence[str], names: Sequence[str],
               batch_size: int = 32, progress: bool = False, desc: str = "pairs"
               ) -> dict[str, Float[Tensor, " d"]]:
    """Mean last-prompt-token activation (float64) at each of ``names``, streamed batch by batch.

    Why streamed: a direction needs only the sums, so memory stays flat however many pairs there are.
    """
    from interp.collect import iter_query_activations  # the model-running part; the maths above is pure

    sums: dict[str, Tensor] = {}
    for batch in iter_query_activations(model, images, prompts, list(names), batch_size, progress=progress,
                                        desc=desc):
        for n, h in batch.items():
            if not torch.isfinite(h).all():
                raise ValueError(f"{desc} activations at {n} contain NaN or inf")
            sums[n] = sums.get(n, 0) + h.double().sum(0)
    return {n: s / len(prompts) for n, s in sums.items()}


FORMAT = "mllmeraser.direction.v1"


@dataclass(frozen=True, eq=False)  # identity equality: tensors have no single truth value
class ErasureDirection:
    """Per layer, ``d_l = mean_recall h_l - mean_erase h_l`` at the last prompt token of ``blocks.{l}.hook_{site}``.

    ``answer`` (optional, ``[n_layers, d]``) holds the answer directions read one token into the answer
    (:func:`first_answer_means`; ``EraserConfig.answer_steps``) with ``answer_prefix`` forced, the refusal's first
    word they were read at.  ``fingerprint`` names the model the
    direction was read on (:func:`interp.fingerprint.model_fingerprint`), so loading it onto another model
    fails; ``counts`` and ``data_hashes`` say which pairs it was read from.
    """

    layers: list[int]
    site: str
    vectors: Float[Tensor, "n_layers d"]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    answer: Float[Tensor, "n_layers d"] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    data_hashes: dict[str, str] = field(default_factory=dict)
    answer_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {self.site!r}")
        layers = layer_indices(self.layers)
        object.__setattr__(self, "layers", layers)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(layers):
            raise ValueError(f"vectors of shape {tuple(self.vectors.shape)} for {len(layers)} layers "
                             "(expected [n_layers, d])")
        for name, t in (("vectors", self.vectors), ("answer directions", self.answer)):
            if t is not None and (not t.is_floating_point() or not bool(torch.isfinite(t).all())):
                raise ValueError(f"{name} must be finite floating-point numbers")
        if self.answer is not None:
            if self.answer.shape != self.vectors.shape:
                raise ValueError(f"answer directions of shape {tuple(self.answer.shape)}, expected "
                                 f"{tuple(self.vectors.shape)}")
            if not isinstance(self.answer_prefix, str) or not self.answer_prefix.strip():
                raise ValueError("answer directions need their answer_prefix (the refusal's first word they were "
                                 "read at)")

    # -- building ------------------------------------------------------------------
    @classmethod
    def fit(cls, model: Any, recall_pairs: Sequence[Query], erase_pairs: Sequence[Query],
            layers: Sequence[int] | None = None, site: str = "resid_pre", batch_size: int = 32,
            answer_prefix: str | None = None, progress: bool = False) -> "ErasureDirection":
        """Read the directions on ``model`` (a ``HookedVLM``) from ``(image or None, prompt)`` pairs.

        ``layers`` None means every decoder layer except 0 (the eraser's default).  With ``answer_prefix``
        (the refusal's first word, e.g. "I") the answer directions are read too.  Two streaming passes
        (three or four with answer directions); the result equals ``MLLMEraser.fit(...).direction``.
        """
        from interp.fingerprint import model_fingerprint

        layers = layer_indices(layers) if layers is not None else list(range(1, model.n_layers))
        bad = [l for l in layers if not 0 <= l < model.n_layers]
        if bad or not layers:
            raise ValueError(f"layers {bad or layers} are not decoder layers of this {model.n_layers}-layer model")
        if site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {site!r}")
        sets = {"recall": split_queries(recall_pairs, "recall"), "erase": split_queries(erase_pairs, "erase")}
        names = [site_name(site, l) for l in layers]
        vectors = directions_from_pairs(model, sets["recall"], sets["erase"], names, batch_size, progress)
        answer = None
        if answer_prefix is not None:
            first = {k: first_answer_means(model, *v, names, answer_prefix, batch_size, progress, desc=f"{k} answer")
                     for k, v in sets.items()}
            answer = torch.stack([first["recall"][n] - first["erase"][n] for n in names])
        return cls(layers, site, vectors, model_fingerprint(model), answer,
                   counts={k: len(v[1]) for k, v in sets.items()},
                   data_hashes={k: hash_queries(list(zip(*v))) for k, v in sets.items()}, answer_prefix=answer_prefix)

    # -- reading ---------------------------------------------------------------------
    def hook_name(self, layer: int) -> str:
        return site_name(self.site, layer)

    def __getitem__(self, layer: int) -> Float[Tensor, " d"]:
        """The direction at decoder layer ``layer`` (a layer index, not a position in ``layers``)."""
        try:
            return self.vectors[self.layers.index(layer)]
        except ValueError:
            raise KeyError(f"no direction at layer {layer}; this one covers layers {self.layers}") from None

    def norms(self) -> Float[Tensor, " n_layers"]:
        """Each layer's direction norm: how far apart recall and refusal sit there (the steering's natural scale)."""
        return self.vectors.double().norm(dim=-1)

    def unit(self) -> Float[Tensor, "n_layers d"]:
        """The directions scaled to unit norm (a zero direction stays zero)."""
        return unit_rows(self.vectors)

    def project(self, h: Float[Tensor, "... d"], layer: int) -> Float[Tensor, "..."]:
        """Scalar projection of activations ``h`` read at ``layer`` on its unit direction."""
        return projection(h, self[layer])

    def cosine(self, other: "ErasureDirection") -> Float[Tensor, " n_layers"]:
        """Per-layer cosine similarity with another direction over the same layers and site (e.g. another seed,
        image-only vs text-only pairs)."""
        if other.layers != self.layers or other.site != self.site:
            raise ValueError(f"directions over different sites: layers {self.layers} at {self.site} vs "
                             f"{other.layers} at {other.site}")
        if other.vectors.shape != self.vectors.shape:
            raise ValueError(f"widths differ: {tuple(self.vectors.shape)} vs {tuple(other.vectors.shape)}")
        return cosine_rows(self.vectors, other.vectors)

    def hooks(self, strength: float = -1.0, every_step: bool = False) -> list:
        """Static steering along the directions (``h + strength * d_l`` at every position, no gate): hook specs
        for ``model.hooks`` / ``run_with_hooks`` / ``generate``.  The paper's ungated ablation."""
        import math

        from .steer import static_hook

        try:  # numpy and 0-d torch scalars too, as the eraser's strengths
            value = math.nan if isinstance(strength, (bool, str)) else float(strength)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"strength must be a finite number, got {strength!r}")
        return [(self.hook_name(l), static_hook(self.vectors[i], value, every_step))
                for i, l in enumerate(self.layers)]

    def check_model(self, model: Any) -> None:
        """Refuse a model whose depth or width does not fit, or (with a fingerprint) another model."""
        check_shape(self.layers, self.vectors.shape[-1], model.n_layers, model.d_model, "this direction",
                    "the model")
        check_fingerprint(self.fingerprint, model, "this direction")

    def __repr__(self) -> str:
        fp = self.fingerprint or {}
        return (f"ErasureDirection({fp.get('arch', '?')} d_model {self.vectors.shape[-1]}: layers {self.layers} at "
                f"{self.site}, norms {[round(float(x), 3) for x in self.norms()]}"
                + (", with answer directions" if self.answer is not None else "") + ")")

    # -- persistence -------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """One safetensors file, its JSON metadata in the header; written atomically."""
        meta = {"format": FORMAT, "layers": self.layers, "site": self.site, "fingerprint": self.fingerprint,
                "counts": self.counts, "data_hashes": self.data_hashes, "answer_prefix": self.answer_prefix}
        return write_artifact(path, {"vectors": self.vectors, "answer": self.answer}, "mllmeraser_direction", meta)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "ErasureDirection":
        """Read a saved direction (no code executed); refuse it if ``model`` is not the model it was read on."""
        tensors, meta = read_artifact(path, "mllmeraser_direction", FORMAT, "erasure direction",
                                      tensors=("vectors",), fields=("layers", "site"))
        try:
            out = cls(meta["layers"], meta["site"], tensors["vectors"], dict(meta.get("fingerprint") or {}),
                      tensors.get("answer"), dict(meta.get("counts") or {}), dict(meta.get("data_hashes") or {}),
                      meta.get("answer_prefix"))
            fp = out.fingerprint
            check_shape(out.layers, out.vectors.shape[-1], fp.get("n_layers"), fp.get("d_model"), "the direction",
                        "the model its fingerprint names")
        except (TypeError, ValueError) as e:  # ArtifactMismatchError too: the file contradicts itself
            raise ArtifactError(f"{path}: not a consistent erasure direction ({e})") from None
        if model is not None:
            out.check_model(model)
        return out


def directions_from_pairs(model: Any, recall: tuple[Sequence[Any], Sequence[str]],
                          erase: tuple[Sequence[Any], Sequence[str]], names: Sequence[str], batch_size: int = 32,
                          progress: bool = False) -> Float[Tensor, "n_names d"]:
    """``mean_recall - mean_erase`` (float64) at each of ``names``; ``recall`` / ``erase`` are ``(images, prompts)``."""
    means = {key: pair_means(model, imgs, prompts, names, batch_size, progress, desc=key)
             for key, (imgs, prompts) in (("recall", recall), ("erase", erase))}
    return torch.stack([mean_difference(means["recall"][n][None], means["erase"][n][None]) for n in names])
