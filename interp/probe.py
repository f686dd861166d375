"""Linear probes: is a property linearly readable from a site's activations?

Why probes in a VLM toolkit: before steering or erasing a concept at a layer,
one wants evidence that the layer *represents* it (for example: does the last
prompt token at block 12 already know which person is in the image?).  A
linear probe's held-out accuracy, layer by layer, answers that cheaply.

Three pieces:

* :func:`collect_features` turns queries into one vector per query and site,
  read at the last prompt token, averaged over image tokens, or averaged over
  text tokens (vision-tower sites: averaged over the image's patches);
* :class:`LinearProbe` is a multinomial logistic regression trained in torch
  (standardised features, L2 weight decay, full-batch L-BFGS) that saves and
  loads itself (safetensors, JSON metadata, no pickle);
* :func:`probe_accuracy` / :func:`probe_layers` fit on a seeded stratified
  split and report train/test accuracy next to the chance level.

>>> import torch
>>> X = torch.cat([torch.randn(50, 8) + 4, torch.randn(50, 8) - 4])
>>> y = torch.tensor([0] * 50 + [1] * 50)
>>> probe_accuracy(X, y)["test_acc"]
1.0
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from .hooks import HookSpec
from .inputs import RowImages, VLMInputs
from .model import HookedVLM
from .names import NameFilter, is_vision_side, resolve_names_except_read_only

Position = Literal["last", "image_mean", "text_mean"]
POSITIONS = ("last", "image_mean", "text_mean")
_FORMAT = "interp.LinearProbe"


# -- features ------------------------------------------------------------------
def _masked_mean(t: Float[Tensor, "batch pos d"], mask: Tensor, name: str, what: str) -> Float[Tensor, "batch d"]:
    mask = mask.to(t.device)
    counts = mask.sum(1)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"{name!r}: row(s) {rows} of this batch have no {what} tokens to average")
    m = mask.unsqueeze(-1).to(t.dtype)
    return (t * m).sum(1) / counts.unsqueeze(-1).to(t.dtype)


def _per_image(model: HookedVLM, t: Tensor, inputs: VLMInputs, name: str) -> tuple[Tensor, Tensor]:
    """Per-image patch sums ``[n_images, d]`` and patch counts ``[n_images]`` of a vision-side activation."""
    t = t.float()
    if model.adapter.vision_batched:
        if t.dim() != 3:
            raise ValueError(f"{name!r}: expected [n_images, patches, d], got shape {tuple(t.shape)}")
        return t.sum(1), torch.full((t.shape[0],), t.shape[1], device=t.device, dtype=t.dtype)
    # Flat towers (Qwen2.5-VL): all images' patches in one [total, d] sequence, image after image.
    # Inside an image the window attention permutes patches, which a mean does not see.
    grid = inputs.image_kwargs.get("image_grid_thw")
    if grid is None or t.dim() != 2:
        raise NotImplementedError(f"{name!r}: cannot split a flat vision activation of shape {tuple(t.shape)} "
                                  f"into images without image_grid_thw ({model.arch})")
    counts = grid.prod(-1).to(torch.long)
    total = int(counts.sum())
    if t.shape[0] != total:  # after the patch merger: one row per merge_size**2 patches
        if t.shape[0] == 0 or total % t.shape[0]:
            raise ValueError(f"{name!r}: {t.shape[0]} rows do not split into images of {counts.tolist()} patches")
        counts = counts // (total // t.shape[0])
    chunks = torch.split(t, counts.tolist())
    return torch.stack([c.sum(0) for c in chunks]), counts.to(device=t.device, dtype=t.dtype)


def _vision_rows(model: HookedVLM, t: Tensor, inputs: VLMInputs, name: str) -> Float[Tensor, "batch d"]:
    """Mean over all patches of each row's images (several images in a row are pooled together)."""
    sums, counts = _per_image(model, t, inputs, name)
    if sums.shape[0] != sum(inputs.n_images):
        raise ValueError(f"{name!r}: {sums.shape[0]} images in the activation, {sum(inputs.n_images)} in the batch")
    out, k = [], 0
    for row, n in enumerate(inputs.n_images):
        if n == 0:
            raise ValueError(f"{name!r} is a vision-side site, but row {row} ({inputs.prompts[row][:40]!r}...) has no image")
        out.append(sums[k:k + n].sum(0) / counts[k:k + n].sum())
        k += n
    return torch.stack(out)


def features_from_cache(model: HookedVLM, cache, inputs: VLMInputs, position: Position = "last"
                        ) -> dict[str, Float[Tensor, "batch d"]]:
    """One vector per row for every cached name (see :func:`collect_features`)."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    per_head = {n for n in cache.names if model.site(n).heads is not None}
    out = {}
    for name in cache.names:
        t = cache[name]
        if name in per_head:  # [..., head, d_head]: the heads' vectors side by side
            t = t.flatten(-2)
        if is_vision_side(name):
            out[name] = _vision_rows(model, t, inputs, name)
        elif position == "last":
            out[name] = cache.last(name).float().flatten(1)
        elif position == "image_mean":
            out[name] = _masked_mean(t.float(), inputs.image_mask, name, "image")
        else:
            out[name] = _masked_mean(t.float(), inputs.text_mask, name, "text")
    return out


def collect_features(
    model: HookedVLM,
    images: Sequence[RowImages],
    prompts: Sequence[str],
    names: NameFilter,
    position: Position = "last",
    batch_size: int = 32,
    hooks: HookSpec | None = None,
) -> dict[str, Float[Tensor, "n d"]]:
    """One feature vector per query and site: ``{name: [n_queries, d]}`` (float32, on CPU).

    Per-head sites (``attn.hook_z``, ...) give the heads' vectors side by side (``[n, heads * d_head]``);
    attention patterns are left out of globs (naming one is an error).
    ``position``: ``"last"`` (the last prompt token, where the answer is
    decided), ``"image_mean"`` (mean over the image-token positions) or
    ``"text_mean"`` (mean over real text tokens, no padding).  Vision-side
    sites (``vision.*``, ``projector.*``) have no prompt positions: for them
    the vector is always the mean over the row's image patches, whatever
    ``position`` says (LLaVA's CLIP blocks include the CLS position;
    Qwen2.5-VL's flat ``[total_patches, d]`` is split per image by
    ``image_grid_thw``).  ``hooks`` run during collection (e.g. probe a
    steered model).

    >>> from interp.tiny import tiny_vlm
    >>> model = tiny_vlm("llava", n_layers=2)
    >>> feats = collect_features(model, [None, None], ["who is he", "who"], "blocks.*.hook_resid_post")
    >>> feats["blocks.1.hook_resid_post"].shape
    torch.Size([2, 128])
    """
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    if not prompts:
        raise ValueError("collect_features needs at least one query")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    resolved = resolve_names_except_read_only(
        names, model.hook_names(), "attention patterns are [batch, head, query, key], not one vector per position; "
        "probe attn.hook_z (each head's output) or attn.hook_q instead")
    out: dict[str, list[Tensor]] = {}
    for s in range(0, len(prompts), batch_size):
        inputs = model.encode(images=images[s:s + batch_size], prompts=prompts[s:s + batch_size])
        _, cache = model.run_with_cache(inputs, names=resolved, hooks=hooks)
        for name, f in features_from_cache(model, cache, inputs, position).items():
            out.setdefault(name, []).append(f.detach().float().cpu())
    return {n: torch.cat(fs) for n, fs in out.items()}


# -- the probe -----------------------------------------------------------------
def _labels(y: Any) -> Int[Tensor, " n"]:
    if isinstance(y, str) or (isinstance(y, (list, tuple)) and any(isinstance(v, str) for v in y)) or (
            isinstance(y, np.ndarray) and y.dtype.kind in "USO"):
        raise ValueError("labels must be integer class ids, not strings: map them first, e.g. "
                         "classes = sorted(set(y)); y = [classes.index(v) for v in y]")
    try:
        y = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"labels must be a 1-D sequence of integer class ids ({type(e).__name__}: {e})") from None
    if y.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError("no labels: a probe needs at least one labelled example per class")
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()) or not bool((y == y.round()).all()):
            raise ValueError("labels must be integers (class ids), finite")
        y = y.long()
    return y.long()


def _features(X: Any) -> Float[Tensor, "n d"]:
    X = torch.as_tensor(X).float()
    if X.dim() != 2:
        raise ValueError(f"features must be [n, d], got shape {tuple(X.shape)}")
    bad = ~torch.isfinite(X).all(1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()
        raise ValueError(f"features contain NaN or inf in {len(rows)} of {X.shape[0]} rows (first: {rows[:5]})")
    return X


@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features.

    ``logits = ((X - mean) / std) @ weight + bias``; ``classes[k]`` is the
    label of output ``k`` (labels may be any integers, not only ``0..C-1``).
    Standardising makes one weight decay sensible across layers whose
    residual norms differ by orders of magnitude.

    >>> import torch
    >>> X, y = torch.randn(40, 4), torch.tensor([3, 7] * 20)
    >>> probe = LinearProbe.fit(X + 5 * (y == 7).float()[:, None], y)
    >>> probe.classes.tolist()
    [3, 7]
    """

    weight: Float[Tensor, "d n_classes"]
    bias: Float[Tensor, " n_classes"]
    mean: Float[Tensor, " d"]
    std: Float[Tensor, " d"]
    classes: Int[Tensor, " n_classes"]
    weight_decay: float = 1e-3
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return int(self.classes.shape[0])

    @property
    def d(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def fit(cls, X: Float[Tensor, "n d"], y: Int[Tensor, " n"], weight_decay: float = 1e-3, max_iter: int = 300,
            meta: Mapping[str, Any] | None = None) -> "LinearProbe":
        """Fit by full-batch L-BFGS on ``mean cross-entropy + weight_decay/2 * ||W||^2`` (deterministic: zero init)."""
        try:
            decay = math.nan if isinstance(weight_decay, (bool, str)) else float(weight_decay)
        except (TypeError, ValueError):
            decay = math.nan
        if not (math.isfinite(decay) and decay >= 0):
            # a negative decay rewards large weights: L-BFGS runs off to NaN weights, and the probe still "predicts"
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        weight_decay = decay
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        X = _features(X)
        y = _labels(y).to(X.device)
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"{X.shape[0]} feature rows for {y.shape[0]} labels")
        classes = torch.unique(y)
        if classes.numel() < 2:
            raise ValueError(f"a probe needs at least 2 classes, got {classes.tolist()}")
        target = torch.searchsorted(classes, y)
        mean = X.mean(0)
        std = X.std(0, unbiased=False).clamp_min(1e-6)
        Z = (X - mean) / std
        W = torch.zeros(X.shape[1], classes.numel(), device=X.device, requires_grad=True)
        b = torch.zeros(classes.numel(), device=X.device, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20,
                                tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(Z @ W + b, target) + 0.5 * weight_decay * (W * W).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls(W.detach(), b.detach(), mean, std, classes, float(weight_decay), dict(meta or {}))

    def logits(self, X: Float[Tensor, "n d"]) -> Float[Tensor, "n n_classes"]:
        X = _features(X).to(self.weight.device)
        if X.shape[1] != self.d:
            raise ValueError(f"probe expects {self.d} features, got {X.shape[1]}")
        return ((X - self.mean) / self.std) @ self.weight + self.bias

    def predict_proba(self, X: Float[Tensor, "n d"]) -> Float[Tensor, "n n_classes"]:
        return torch.softmax(self.logits(X), dim=-1)

    def predict(self, X: Float[Tensor, "n d"]) -> Int[Tensor, " n"]:
        """Predicted labels (values from :attr:`classes`)."""
        return self.classes[self.logits(X).argmax(-1)]

    def accuracy(self, X: Float[Tensor, "n d"], y: Int[Tensor, " n"]) -> float:
        y = _labels(y).to(self.classes.device)
        if y.numel() == 0:
            return float("nan")
        return float((self.predict(X) == y).float().mean())

    def save(self, path: str | Path) -> None:
        """One safetensors file: tensors plus JSON metadata (weight decay, ``meta``); no pickle."""
        from .io import atomic_path

        tensors = {k: getattr(self, k).detach().contiguous().cpu() for k in ("weight", "bias", "mean", "std", "classes")}
        metadata = {"format": _FORMAT, "weight_decay": json.dumps(self.weight_decay), "meta": json.dumps(self.meta)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> "LinearProbe":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a saved LinearProbe (format={metadata.get('format')!r})")
            t = load_file(str(path))
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable LinearProbe file ({type(e).__name__}: {e})") from None
        return cls(t["weight"], t["bias"], t["mean"], t["std"], t["classes"],
                   json.loads(metadata["weight_decay"]), json.loads(metadata["meta"]))


# -- evaluation ----------------------------------------------------------------
def stratified_split(y: Int[Tensor, " n"], train_frac: float = 0.7, seed: int = 0
                     ) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
    """Seeded per-class split: each class with >= 2 examples lands in both train and test; singletons go to train."""
    if not 0.0 < train_frac < 1.0:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
    y = _labels(y).cpu()
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n = idx.numel()
        k = n if n < 2 else min(max(int(round(train_frac * n)), 1), n - 1)
        train.append(idx[:k])
        test.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def group_split(groups: Int[Tensor, " n"], strata: Int[Tensor, " n"] | None = None, train_frac: float = 0.7,
                seed: int = 0) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
    """Seeded split that keeps every group (e.g. one person's queries) whole, on one side.

    Why: a per-query split holds out queries of people the probe has seen, so a probe for an attribute
    (birthplace) can pass by recognising the person; held-out *groups* ask whether the attribute itself is
    readable in people never seen.  ``strata`` (one label per row, constant within a group, e.g. forget vs
    retain) splits each stratum's groups separately, as :func:`stratified_split` does classes: a stratum with
    >= 2 groups lands on both sides, a single group goes to training.
    """
    if not 0.0 < train_frac < 1.0:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
    groups = _labels(groups).cpu()
    strata = torch.zeros_like(groups) if strata is None else _labels(strata).cpu()
    if strata.shape != groups.shape:
        raise ValueError(f"{strata.numel()} strata labels for {groups.numel()} rows")
    ids = torch.unique(groups)
    of = {}
    for g in ids.tolist():
        values = torch.unique(strata[groups == g])
        if values.numel() != 1:
            raise ValueError(f"group {g} spans strata {values.tolist()}: a group must sit in one stratum")
        of[g] = int(values)
    gen = torch.Generator().manual_seed(seed)
    train_groups: list[int] = []
    for st in sorted(set(of.values())):
        members = torch.tensor([g for g in ids.tolist() if of[g] == st])
        members = members[torch.randperm(members.numel(), generator=gen)]
        n = members.numel()
        k = n if n < 2 else min(max(int(round(train_frac * n)), 1), n - 1)
        train_groups += members[:k].tolist()
    in_train = torch.isin(groups, torch.tensor(train_groups, dtype=groups.dtype))
    return torch.nonzero(in_train).flatten(), torch.nonzero(~in_train).flatten()


def probe_accuracy(X: Float[Tensor, "n d"], y: Int[Tensor, " n"], train_frac: float = 0.7, seed: int = 0,
                   **fit_kw: Any) -> dict[str, float | int]:
    """Fit a :class:`LinearProbe` on a stratified split and report how well it reads ``y`` off ``X``.

    Returns ``train_acc``, ``test_acc``, ``chance`` (the best constant guess
    on the test set: its majority-class rate), ``n_classes``, ``n_train``,
    ``n_test``.  Compare ``test_acc`` with ``chance``, never with 0.
    """
    X, y = _features(X).cpu(), _labels(y).cpu()
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"{X.shape[0]} feature rows for {y.shape[0]} labels")
    tr, te = stratified_split(y, train_frac, seed)
    if te.numel() == 0:
        raise ValueError("no held-out examples: every class has a single example, and a stratified split keeps "
                         "singletons for training; a probe's accuracy needs at least 2 examples of some class")
    probe = LinearProbe.fit(X[tr], y[tr], **fit_kw)
    counts = torch.unique(y[te], return_counts=True)[1]
    return {
        "train_acc": probe.accuracy(X[tr], y[tr]),
        "test_acc": probe.accuracy(X[te], y[te]),
        "chance": float(counts.max()) / te.numel() if te.numel() else float("nan"),
        "n_classes": int(torch.unique(y).numel()),
        "n_train": int(tr.numel()),
        "n_test": int(te.numel()),
    }


def probe_layers(features: Mapping[str, Float[Tensor, "n d"]], y: Int[Tensor, " n"], train_frac: float = 0.7,
                 seed: int = 0, **fit_kw: Any) -> dict[str, dict[str, float | int]]:
    """:func:`probe_accuracy` for every site (same split for all), e.g. on :func:`collect_features` output.

    >>> import torch
    >>> y = torch.arange(60) % 3
    >>> feats = {"noise": torch.randn(60, 5), "signal": torch.nn.functional.one_hot(y).float() * 3 + torch.randn(60, 3)}
    >>> res = probe_layers(feats, y)
    >>> res["signal"]["test_acc"] > res["noise"]["test_acc"]
    True
    """
    return {name: probe_accuracy(X, y, train_frac=train_frac, seed=seed, **fit_kw) for name, X in features.items()}
