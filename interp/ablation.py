"""Ablation: what an input loses when a site, or one head, is replaced by zero or by its mean, per modality.

Why: patching (:mod:`interp.patching`) asks what carries the *difference* between two inputs; ablation asks
what one input *needs*, with no second input to pair it with (a forget question, a refusal).  Zero is far off
the activations' distribution, so the usual choice is the mean over a reference set; in a VLM the image tokens
(the projector's output and what the blocks make of it) and the text tokens have very different statistics,
so :func:`modality_means` keeps one mean per modality and an ablated image position gets the image mean, a
text position the text mean.  Per-head sites (``attn.hook_z``, ``attn.hook_q/k/v``) can be ablated one head
at a time.

In generation the new tokens are text, so a hook ablating text (or every) position also replaces them with the
text mean, on every step it runs (attached with ``model.hooks(...)``, or passed with ``every_step=True``;
``generate`` applies a hook it is given to the prefill alone by default).

>>> from interp.tiny import tiny_vlm
>>> from PIL import Image
>>> from interp.patching import answer_logprob
>>> model = tiny_vlm("llava", n_layers=2)
>>> inputs = model.encode(images=[Image.new("RGB", (32, 32), "red"), None], prompts=["who is this", "who is he"])
>>> means = modality_means(model, [inputs], ["blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"])
>>> res = ablate_heads(model, inputs, answer_logprob(5), means, layers=[0])
>>> res.names[:2], res.meta["how"]
(['L0H0', 'L0H1'], 'mean')
>>> zero = ablate_sites(model, inputs, ["blocks.1.hook_mlp_out"], answer_logprob(5), how="zero")
>>> bool(zero.effects["blocks.1.hook_mlp_out"] != 0)
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .hooks import HookContext, HookFn
from .inputs import VLMInputs
from .io import JsonRecord, atomic_path, json_number
from .names import is_vision_side, resolve_names_except_read_only
from .patching import Metric, PositionSpec, _apply_metric, _mean, _patch_mask, _position_label
from .sweep import Grid

if TYPE_CHECKING:
    from .model import HookedVLM

HOW = ("zero", "mean")
MODALITIES = ("image", "text")


@dataclass
class ModalityMeans:
    """Each site's mean activation over the image positions and over the text positions of a reference set.

    ``means[name][modality]`` has the site's per-position shape (``[d_model]``, ``[head, d_head]``); ``counts``
    how many positions each mean is over (a modality with none has no mean).  Saves as safetensors + JSON.
    """

    means: dict[str, dict[str, Tensor]]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def check(self, name: str) -> None:
        """Raise unless there is a mean for ``name`` (of at least one modality)."""
        if not self.means.get(name):
            raise ValueError(f"no mean for {name!r}: compute it with modality_means(model, inputs, [..., {name!r}]) "
                             f"(have: {sorted(self.means)[:6]})")

    def get(self, name: str, modality: str) -> Tensor:
        self.check(name)
        if modality not in self.means[name]:
            raise ValueError(f"no {modality} mean for {name!r}: the reference set had no {modality} positions")
        return self.means[name][modality]

    def save(self, path: str | Path) -> Path:
        """One safetensors file (tensors named ``name|modality``, the counts in its metadata), atomically."""
        import json

        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"{n}|{m}": t.contiguous().cpu() for n, d in self.means.items() for m, t in d.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "interp.ModalityMeans", "counts": json.dumps(self.counts)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ModalityMeans":
        import json

        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "interp.ModalityMeans":
                    raise ValueError(f"{path} is not a saved ModalityMeans (format {meta.get('format')!r})")
                means: dict[str, dict[str, Tensor]] = {}
                for key in f.keys():
                    name, _, modality = key.rpartition("|")
                    means.setdefault(name, {})[modality] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, json.JSONDecodeError) as e:  # not safetensors, or truncated
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
        return cls(means, json.loads(meta.get("counts", "{}")))


def _lm_names(model: "HookedVLM", names: Sequence[str] | str) -> list[str]:
    resolved = resolve_names_except_read_only(names, model.hook_names(), "attention patterns are not ablated; "
                                              "ablate attn.hook_z (the heads' outputs) instead")
    vision = [n for n in resolved if is_vision_side(n)]
    if vision:
        raise ValueError(f"{vision[:3]} are vision-side sites: they have no image/text positions to take means over; "
                         "ablate language-model sites (the projector's output reaches the LM as 'hook_embed')")
    if not resolved:
        raise ValueError("no sites to ablate")
    return resolved


def modality_means(model: "HookedVLM", batches: Iterable[VLMInputs], names: Sequence[str] | str) -> ModalityMeans:
    """The mean of each language-model site over every image position and every text position (padding left
    out) of ``batches``, accumulated in float64 one batch at a time."""
    names = _lm_names(model, names)
    sums: dict[str, dict[str, Tensor]] = {n: {} for n in names}
    counts: dict[str, dict[str, int]] = {n: {m: 0 for m in MODALITIES} for n in names}
    seen = False
    for inputs in batches:
        seen = True
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names=names, stop_early=True)
        for n in names:
            x = cache[n]
            for m, mask in (("image", inputs.image_mask), ("text", inputs.text_mask)):
                sel = x[mask.to(x.device)]  # [positions, ...]
                if sel.shape[0]:
                    s = sel.double().sum(0).cpu()
                    sums[n][m] = s if m not in sums[n] else sums[n][m] + s
                    counts[n][m] += int(sel.shape[0])
    if not seen:
        raise ValueError("no reference batches to take means over (an empty set)")
    means = {n: {m: (sums[n][m] / counts[n][m]).float() for m in sums[n]} for n in names}
    return ModalityMeans(means, counts)


def _check_heads(model: "HookedVLM", name: str, heads: Optional[Sequence[int]]) -> Optional[list[int]]:
    if heads is None:
        return None
    kind = model.site(name).heads
    if kind is None:
        raise ValueError(f"{name!r} is not a per-head site: heads= applies to attn.hook_z / hook_q / hook_k / hook_v")
    n = model.head_counts["lm"][0 if kind == "q" else 1]
    heads = [int(h) for h in heads]
    if not heads or any(not 0 <= h < n for h in heads) or len(set(heads)) != len(heads):
        raise ValueError(f"heads must be distinct indices in 0..{n - 1} at {name!r}, got {heads}")
    return heads


def ablation_hook(model: "HookedVLM", name: str, how: str = "mean", means: Optional[ModalityMeans] = None,
                  heads: Optional[Sequence[int]] = None, positions: PositionSpec = "all") -> HookFn:
    """A hook for ``name`` that replaces its activation at ``positions`` (for per-head sites, only ``heads``) by
    zero or by the modality's mean (image positions the image mean, text positions the text mean)."""
    if how not in HOW:
        raise ValueError(f"how must be one of {HOW}, got {how!r}")
    _lm_names(model, [name])
    heads = _check_heads(model, name, heads)
    if how == "mean":
        if means is None:
            raise ValueError("mean ablation needs means: modality_means(model, reference_batches, names)")
        means.check(name)
    label = _position_label(positions)

    def hook(x: Tensor, ctx: HookContext) -> Optional[Tensor]:
        if ctx.step == 0:
            where = _patch_mask(positions, name, ctx.inputs)
            if where is None:
                where = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            image = ctx.image_mask.to(x.device)
        elif label in ("all", "text"):  # generated tokens are text
            where = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            image = torch.zeros_like(where)
        else:
            return None
        where = where.to(x.device)
        if how == "zero":
            value = torch.zeros_like(x)
        else:
            value = torch.zeros_like(x)
            for m, sel in (("image", image), ("text", ~image)):
                if bool((where & sel).any()):
                    mean = means.get(name, m).to(device=x.device, dtype=x.dtype)
                    value = torch.where(sel.reshape(*sel.shape, *([1] * (x.dim() - 2))), mean, value)
        m = where.reshape(*where.shape, *([1] * (x.dim() - 2)))
        if heads is not None:
            keep = torch.zeros(x.shape[2], dtype=torch.bool, device=x.device)
            keep[heads] = True
            m = m & keep.reshape(1, 1, -1, *([1] * (x.dim() - 3)))
        return torch.where(m, value, x)

    return hook


@dataclass
class AblationResult(JsonRecord):
    """Metric values with each site (or head) ablated alone: ``ablated[name]`` the batch mean, ``base`` the
    unablated run's; ``rows`` per-row values (``"base"`` and each name); ``meta`` how and where."""

    names: list[str]
    ablated: dict[str, float]
    base: float
    rows: dict[str, list[float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def effects(self) -> dict[str, float]:
        """``ablated - base`` per name: what the metric loses (negative) or gains without it."""
        return {n: self.ablated[n] - self.base for n in self.names}

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` names whose ablation moves the metric most: ``[(name, ablated - base), ...]``."""
        eff = self.effects
        return sorted(((n, eff[n]) for n in self.names if math.isfinite(eff[n])), key=lambda kv: -abs(kv[1]))[:k]

    def grid(self) -> Grid:
        """For head ablations (names ``L{l}H{h}``): a layer x head grid of effects."""
        cells = {}
        for n in self.names:
            if not (n.startswith("L") and "H" in n):
                raise ValueError(f"grid() is for head ablations (L{{l}}H{{h}}), got {n!r}")
            l, h = n[1:].split("H")
            cells[(int(l), int(h))] = self.effects[n]
        layers, heads = sorted({k[0] for k in cells}), sorted({k[1] for k in cells})
        vals = np.full((len(layers), len(heads)), np.nan)
        for (l, h), v in cells.items():
            vals[layers.index(l), heads.index(h)] = v
        return Grid(row_key="layer", col_key="head", rows=layers, cols=heads, values=vals)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "interp.AblationResult", "names": list(self.names), "ablated": dict(self.ablated),
                "effects": self.effects, "base": self.base, "rows": dict(self.rows), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AblationResult":
        if d.get("format") != "interp.AblationResult":
            raise ValueError(f"not an AblationResult (format {d.get('format')!r})")
        return cls(names=list(d["names"]), ablated={k: json_number(v) for k, v in d["ablated"].items()},
                   base=json_number(d["base"]), rows={k: [json_number(x) for x in v] for k, v in d["rows"].items()},
                   meta=dict(d.get("meta", {})))


def _run(model: "HookedVLM", inputs: VLMInputs, hooks: list, metric: Metric) -> list[float]:
    with torch.no_grad():
        return _apply_metric(metric, model.run_with_hooks(inputs, hooks), inputs)


def _ablate(model: "HookedVLM", inputs: VLMInputs, metric: Metric, specs: dict[str, tuple[str, Optional[list[int]]]],
            how: str, means: Optional[ModalityMeans], positions: PositionSpec) -> AblationResult:
    hooks = {label: ablation_hook(model, name, how, means, heads, positions) for label, (name, heads) in specs.items()}
    _patch_mask(positions, "hook_embed", inputs)  # validate positions before any forward pass
    rows = {"base": _run(model, inputs, [], metric)}
    for label, (name, _) in specs.items():
        rows[label] = _run(model, inputs, [(name, hooks[label])], metric)
    return AblationResult(names=list(specs), ablated={k: _mean(rows[k]) for k in specs}, base=_mean(rows["base"]),
                          rows=rows, meta={"how": how, "positions": _position_label(positions)})


def ablate_sites(model: "HookedVLM", inputs: VLMInputs, names: Sequence[str] | str, metric: Metric,
                 means: Optional[ModalityMeans] = None, how: str = "mean", positions: PositionSpec = "all"
                 ) -> AblationResult:
    """The metric with each language-model site in ``names`` (list or glob) ablated alone, one forward pass each."""
    resolved = _lm_names(model, names)
    return _ablate(model, inputs, metric, {n: (n, None) for n in resolved}, how, means, positions)


def ablate_heads(model: "HookedVLM", inputs: VLMInputs, metric: Metric, means: Optional[ModalityMeans] = None,
                 how: str = "mean", layers: Optional[Sequence[int]] = None, positions: PositionSpec = "all",
                 component: str = "z") -> AblationResult:
    """The metric with each attention head's output (``attn.hook_z``, one head) ablated alone, or its query, key
    or value (``component`` as in :func:`interp.head_patching.patch_heads`; mean ablation needs the means of that
    site); names ``L{l}H{h}`` (:meth:`AblationResult.grid` for a heatmap)."""
    from .head_patching import check_layers, component_heads, head_names

    names = head_names(model, check_layers(model, layers), component)
    n_heads = component_heads(model, component)
    specs = {f"L{l}H{h}": (name, [h]) for l, name in names.items() for h in range(n_heads)}
    return _ablate(model, inputs, metric, specs, how, means, positions)


__all__ = ["AblationResult", "ModalityMeans", "ablate_heads", "ablate_sites", "ablation_hook", "modality_means"]
