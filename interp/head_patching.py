"""Activation patching per attention head: which heads carry the difference between two runs?

Why per head: site patching (:mod:`interp.patching`) says a layer's attention
output matters; a circuit is made of heads, and one layer's output is the sum
of its heads' outputs through ``o_proj`` (``attn.hook_z`` holds them side by
side).  Patching head ``h`` of layer ``l`` alone, clean -> corrupted, gives one
number per (layer, head): the TransformerLens "attention head output" patching
experiment, here with images, modality-aware positions and batched passes.

As in :func:`interp.patching.patch_from_run`, several cells run in one
forward pass: the corrupted batch is repeated once per (layer, head) and copy
``c`` gets only cell ``c``'s patch, so each copy computes exactly the
one-head-at-a-time result.

>>> from interp.tiny import tiny_vlm
>>> from PIL import Image
>>> from interp.patching import answer_logprob
>>> model = tiny_vlm("llava", n_layers=2)
>>> clean = model.encode(images=[Image.new("RGB", (32, 32), "red")], prompts=["who is this"])
>>> corrupt = model.encode(images=[Image.new("RGB", (32, 32), "blue")], prompts=["who is this"])
>>> res = patch_heads(model, clean, corrupt, answer_logprob([5]))
>>> res.effects.shape                                  # [layer, head]
(2, 4)
>>> patch_heads(model, clean, corrupt, answer_logprob([5]), component="v").meta
{'component': 'v'}

``component`` patches what a head reads instead of what it writes: its query (``"q"``), key (``"k"``) or value
(``"v"``), at ``attn.hook_q`` / ``hook_k`` / ``hook_v`` (before the rotary embedding), the TransformerLens
experiments of the same names.  With grouped-query attention (Qwen2.5-VL) a key or value head is shared by several
query heads, so the ``k`` / ``v`` grids have ``n_kv_heads`` columns.

``tower="vision"`` patches the vision tower's heads instead (``vision.blocks.{l}.attn.hook_z``, every patch of
every image; ``q`` / ``k`` / ``v`` too, Qwen2.5-VL's as thirds of its fused projection): which heads of the
image encoder carry what the answer needs from the picture.  The metric is still read at the language model's
logits, one value per prompt row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from .hooks import HookSpec
from .inputs import VLMInputs
from .io import JsonRecord, json_number
from .patching import (
    Metric, PositionSpec, _apply_metric, _mean, _patch_hook, _patch_mask, _position_label, check_aligned,
    check_max_rows, normalised,
)
from .steering import repeat_inputs
from .sweep import Grid

if TYPE_CHECKING:
    from .model import HookedVLM


@dataclass
class HeadPatchResult(JsonRecord):
    """Metric values of per-head patching; ``effects[i, j]`` is layer ``layers[i]``, head ``j``, normalised to
    clean = 1, corrupted = 0.

    ``patched[i, j]`` is the batch-mean metric with that head patched alone; ``clean`` / ``corrupted`` the
    batch means of the two runs; ``rows`` the per-row values (``"clean"``, ``"corrupted"``, ``"L{l}H{h}"``).
    """

    layers: list[int]
    patched: np.ndarray
    clean: float
    corrupted: float
    positions: str = "all"
    rows: dict[str, list[float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_heads(self) -> int:
        return int(self.patched.shape[1])

    @property
    def effects(self) -> np.ndarray:
        """``(patched - corrupted) / (clean - corrupted)``; NaN where clean and corrupted agree."""
        return normalised(self.patched, self.clean, self.corrupted)

    def top(self, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest absolute effect: ``[(layer, head, effect), ...]``."""
        eff = self.effects
        order = np.argsort(-np.nan_to_num(np.abs(eff), nan=-1.0), axis=None)[:k]
        return [(self.layers[i // self.n_heads], int(i % self.n_heads), float(eff.flat[i])) for i in order]

    def grid(self, value: str = "effects") -> Grid:
        """A layer x head grid for a heatmap (``value``: ``"effects"`` or ``"patched"``)."""
        if value not in ("effects", "patched"):
            raise ValueError(f"value must be 'effects' or 'patched', got {value!r}")
        vals = self.effects if value == "effects" else self.patched
        return Grid(row_key="layer", col_key="head", rows=list(self.layers), cols=list(range(self.n_heads)),
                    values=np.array(vals, dtype=float))

    def to_dict(self) -> dict[str, Any]:
        return {"format": "interp.HeadPatchResult", "layers": list(self.layers), "patched": self.patched.tolist(),
                "clean": self.clean, "corrupted": self.corrupted, "positions": self.positions,
                "rows": dict(self.rows), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadPatchResult":
        if d.get("format") != "interp.HeadPatchResult":
            raise ValueError(f"not a HeadPatchResult (format {d.get('format')!r})")
        return cls(layers=[int(l) for l in d["layers"]], patched=np.array(d["patched"], dtype=float),
                   clean=json_number(d["clean"]), corrupted=json_number(d["corrupted"]),
                   positions=d.get("positions", "all"),
                   rows={k: [json_number(x) for x in v] for k, v in d.get("rows", {}).items()},
                   meta=dict(d.get("meta", {})))


#: What :func:`patch_heads` can patch per head: the output (``z``, before ``o_proj``) or the query, key or value.
COMPONENTS = ("z", "q", "k", "v")


TOWERS = ("lm", "vision")


def head_site(component: str) -> str:
    """The per-head hook site (``attn.hook_z`` ...) of a component; raises naming the choices."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS} (output, query, key, value), got {component!r}")
    return f"attn.hook_{component}"


def head_names(model: "HookedVLM", layers: Sequence[int], component: str = "z", tower: str = "lm") -> dict[int, str]:
    """``{layer: hook name}`` of a component's per-head site in one tower; raises for a site the tower lacks."""
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    prefix = "blocks" if tower == "lm" else "vision.blocks"
    names = {l: f"{prefix}.{l}.{head_site(component)}" for l in layers}
    if names and next(iter(names.values())) not in model.hook_names():
        raise ValueError(f"the {model.arch} {tower} tower has no per-head {head_site(component)}: patch component='z' "
                         "there")
    return names


def component_heads(model: "HookedVLM", component: str, tower: str = "lm") -> int:
    """How many heads a component has per layer: the query heads for ``z`` / ``q``, the key/value heads for
    ``k`` / ``v``."""
    head_site(component)
    n_q, n_kv = model.head_counts[tower]
    return n_kv if component in ("k", "v") else n_q


def check_layers(model: "HookedVLM", layers: Optional[Sequence[int]], tower: str = "lm") -> list[int]:
    """``layers`` as a list of distinct layers of ``tower`` (all of them for None); anything else is an error."""
    n = model.n_layers if tower == "lm" else model.n_vision_layers
    layers = list(range(n)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < n]
    if not layers or bad or len(set(layers)) != len(layers):
        what = "LM" if tower == "lm" else "vision"
        raise ValueError(f"layers must be distinct {what} layers in 0..{n - 1}, got {layers}")
    return layers


def patch_heads(
    model: "HookedVLM",
    clean_inputs: VLMInputs,
    corrupted_inputs: VLMInputs,
    metric: Metric,
    layers: Optional[Sequence[int]] = None,
    positions: PositionSpec = "all",
    max_rows: Optional[int] = 32,
    component: str = "z",
    tower: str = "lm",
) -> HeadPatchResult:
    """Patch each attention head's output (``blocks.{l}.attn.hook_z``, one head) clean -> corrupted, alone; or its
    query, key or value (``component``), or the vision tower's heads (``tower``; module docstring).

    ``layers``: the tower's layers to patch (default: all).  ``positions`` and ``max_rows`` as in
    :func:`interp.patching.patch_from_run` (``"last"`` asks which heads write the answer-relevant
    information into the last prompt token; ``"image"`` which heads do it at the image tokens; the vision tower
    takes ``"all"`` or ``"image"``, the same there).
    """
    check_aligned(clean_inputs, corrupted_inputs)
    check_max_rows(max_rows)
    if tower == "vision" and not corrupted_inputs.has_images:
        raise ValueError("the batch has no images: there are no vision-tower heads to patch")
    names = head_names(model, check_layers(model, layers, tower), component, tower)
    layers = list(names)
    mask = _patch_mask(positions, names[layers[0]], corrupted_inputs)  # validate before any forward pass
    n_heads = component_heads(model, component, tower)

    clean_logits, cache = model.run_with_cache(clean_inputs, names=list(names.values()))
    rows: dict[str, list[float]] = {"clean": _apply_metric(metric, clean_logits, corrupted_inputs)}
    del clean_logits
    rows["corrupted"] = _apply_metric(metric, model.run_with_hooks(corrupted_inputs, []), corrupted_inputs)

    b, p = corrupted_inputs.input_ids.shape
    base = torch.ones((b, p), dtype=torch.bool) if mask is None else mask.cpu()
    cells = [(l, h) for l in layers for h in range(n_heads)]
    per = len(cells) if max_rows is None else max(1, max_rows // b)  # checked on entry
    patched = np.full((len(layers), n_heads), np.nan)
    for s in range(0, len(cells), per):
        chunk = cells[s:s + per]
        hooks: HookSpec = []
        for c, (l, h) in enumerate(chunk):
            if tower == "vision":  # every patch of every image: the cache's layout, whatever the tower's
                head_mask = torch.zeros(cache[names[l]].shape[:-1], dtype=torch.bool)
                head_mask[..., h] = True
            else:
                head_mask = torch.zeros((b, p, n_heads), dtype=torch.bool)
                head_mask[..., h] = base
            hooks.append((names[l], _patch_hook(cache[names[l]], head_mask, c, len(chunk))))
        logits = model.run_with_hooks(repeat_inputs(corrupted_inputs, len(chunk)), hooks)
        for c, (l, h) in enumerate(chunk):
            vals = _apply_metric(metric, logits[c * b:(c + 1) * b], corrupted_inputs)
            rows[f"L{l}H{h}"] = vals
            patched[layers.index(l), h] = _mean(vals)
        del logits
    return HeadPatchResult(layers=layers, patched=patched, clean=_mean(rows["clean"]),
                           corrupted=_mean(rows["corrupted"]), positions=_position_label(positions), rows=rows,
                           meta={"component": component} | ({"tower": tower} if tower != "lm" else {}))
