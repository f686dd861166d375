"""Activation patching for VLMs: which sites carry the difference between two runs?

Why: probing says *where* information is readable; patching says where it is
*used*.  Run a "clean" input (image of person A) and a "corrupted" one (image
of person B, same prompt), then rerun the corrupted input with one site's
activation replaced by the clean run's.  The normalised effect

    (patched - corrupted) / (clean - corrupted)

of a metric (e.g. the logit difference between the two names) is 1 where
that site alone restores the clean behaviour and 0 where it carries nothing.

Patching needs the two runs to line up position by position: the clean and
corrupted prompts must have the same token length (the same prompt with two
different images is the usual design), else a clear error is raised.

For speed, several sites are patched in one forward pass: the corrupted
batch is repeated once per site and copy ``c`` gets only site ``c``'s patch,
so each copy computes exactly the one-site-at-a-time result.

:func:`patch_from_run` patches from any :class:`~interp.ActivationCache`,
e.g. a run with steering hooks, to ask which layer's steered activations,
patched alone into the vanilla run, reproduce the steered behaviour
(:func:`patch_hooks` does both steps).

>>> from interp.tiny import tiny_vlm
>>> from PIL import Image
>>> model = tiny_vlm("llava", n_layers=2)
>>> clean = model.encode(images=[Image.new("RGB", (32, 32), "red")], prompts=["who is this"])
>>> corrupt = model.encode(images=[Image.new("RGB", (32, 32), "blue")], prompts=["who is this"])
>>> res = patch_sites(model, clean, corrupt, ["hook_embed", "blocks.1.hook_resid_post"], answer_logprob([5]))
>>> round(res.effects["hook_embed"], 4)
1.0
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .cache import ActivationCache
from .hooks import HookContext, HookFn, HookSpec
from .inputs import VLMInputs
from .io import JsonRecord, json_number
from .names import (SITE_ORDER, NameFilter, is_vision_side, parse_block_name,
                    resolve_names_except_read_only)
from .steering import repeat_inputs
from .sweep import Grid

if TYPE_CHECKING:
    from .model import HookedVLM

Metric = Callable[[Float[Tensor, "batch pos vocab"], VLMInputs], Float[Tensor, " batch"]]
PositionSpec = Union[str, Callable[[VLMInputs], Bool[Tensor, "batch pos"]]]
POSITIONS = ("all", "last", "image", "text")
IdSpec = Union[int, Sequence[int], Tensor]


# -- metrics -------------------------------------------------------------------
def _row_ids(ids: IdSpec, batch: int, device: torch.device) -> Tensor:
    """One id per row: a single id for every row, one per row, or one per row of a batch the patching functions
    repeated ``k`` times (:func:`interp.steering.repeat_inputs` stacks whole copies, so the ids tile)."""
    t = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() == 0 or batch % t.numel():
        raise ValueError(f"got {t.numel()} token ids for a batch of {batch}; give one id, or one per row")
    return t.repeat(batch // t.numel())


def _last_logits(logits: Float[Tensor, "batch pos vocab"], inputs: VLMInputs) -> Float[Tensor, "batch vocab"]:
    idx = inputs.last_index.to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), idx].float()


def logit_diff(answer_ids: IdSpec, wrong_ids: IdSpec) -> Metric:
    """Metric: ``logit[answer] - logit[wrong]`` at the last prompt token, per row (one id, or one per row)."""

    def metric(logits: Tensor, inputs: VLMInputs) -> Tensor:
        last = _last_logits(logits, inputs)
        b = last.shape[0]
        rows = torch.arange(b, device=last.device)
        return last[rows, _row_ids(answer_ids, b, last.device)] - last[rows, _row_ids(wrong_ids, b, last.device)]

    return metric


def answer_logprob(answer_ids: IdSpec) -> Metric:
    """Metric: ``log p(answer)`` of the next token after the prompt, per row."""

    def metric(logits: Tensor, inputs: VLMInputs) -> Tensor:
        logp = torch.log_softmax(_last_logits(logits, inputs), dim=-1)
        b = logp.shape[0]
        return logp[torch.arange(b, device=logp.device), _row_ids(answer_ids, b, logp.device)]

    return metric


def _apply_metric(metric: Metric, logits: Tensor, inputs: VLMInputs) -> list[float]:
    out = torch.as_tensor(metric(logits, inputs))
    if out.dim() == 0:
        out = out.reshape(1)
    if out.dim() != 1:
        raise ValueError(f"metric must return one value per row ([batch]), got shape {tuple(out.shape)}")
    return [float(v) for v in out.detach().float().cpu()]


# -- results -------------------------------------------------------------------
def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def normalised(patched: np.ndarray, clean: float, corrupted: float) -> np.ndarray:
    """``(patched - corrupted) / (clean - corrupted)``: clean = 1, corrupted = 0; all NaN where the two runs agree
    (no difference to normalise by)."""
    gap = clean - corrupted
    if not np.isfinite(gap) or abs(gap) < 1e-12:
        return np.full_like(patched, np.nan, dtype=float)
    return (patched - corrupted) / gap


@dataclass
class PatchResult(JsonRecord):
    """Metric values of a patching experiment; ``effects`` are normalised to clean = 1, corrupted = 0.

    ``patched[name]`` is the batch-mean metric with ``name`` patched,
    ``clean`` / ``corrupted`` the batch means of the source and target runs
    (``clean`` is NaN when the source logits were not given), and ``rows``
    keeps the per-row values (keys: site names, ``"clean"``, ``"corrupted"``).
    """

    names: list[str]
    patched: dict[str, float]
    clean: float
    corrupted: float
    positions: str = "all"
    rows: dict[str, list[float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def effects(self) -> dict[str, float]:
        """``(patched - corrupted) / (clean - corrupted)`` per site; NaN when clean == corrupted."""
        denom = self.clean - self.corrupted
        if not math.isfinite(denom) or denom == 0:
            return {n: float("nan") for n in self.names}
        return {n: (self.patched[n] - self.corrupted) / denom for n in self.names}

    def grid(self, prefix: str = "blocks", value: str = "effects") -> Grid:
        """A site-kind x layer grid for a heatmap: rows ``hook_resid_pre, ..., attn.hook_z, ...`` (those present, in
        execution order), columns layers.

        ``prefix`` is ``"blocks"`` (language model) or ``"vision.blocks"``;
        ``value`` is ``"effects"`` or ``"patched"``.  Missing cells are NaN.
        """
        tower = {"blocks": "lm", "vision.blocks": "vision", "vision": "vision"}.get(prefix)
        if tower is None:
            raise ValueError(f"prefix must be 'blocks' or 'vision.blocks', got {prefix!r}")
        if value not in ("effects", "patched"):
            raise ValueError(f"value must be 'effects' or 'patched', got {value!r}")
        vals = self.effects if value == "effects" else self.patched
        cells = {}
        for n in self.names:
            parsed = parse_block_name(n)
            if parsed is not None and parsed[0] == tower:
                cells[(parsed[2], parsed[1])] = vals[n]
        if not cells:
            raise ValueError(f"no patched site under {prefix!r}; patched: {self.names[:6]}")
        rows = [s for s in SITE_ORDER if any(k[0] == s for k in cells)]
        cols = sorted({k[1] for k in cells})
        grid = np.full((len(rows), len(cols)), np.nan)
        for (site, layer), v in cells.items():
            grid[rows.index(site), cols.index(layer)] = v
        return Grid(row_key="site", col_key="layer", rows=rows, cols=cols, values=grid)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "interp.PatchResult", "names": list(self.names), "patched": dict(self.patched),
                "effects": self.effects, "clean": self.clean, "corrupted": self.corrupted,
                "positions": self.positions, "rows": dict(self.rows), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PatchResult":
        return cls(names=list(d["names"]), patched={k: json_number(v) for k, v in d["patched"].items()},
                   clean=json_number(d["clean"]), corrupted=json_number(d["corrupted"]),
                   positions=d.get("positions", "all"),
                   rows={k: [json_number(x) for x in v] for k, v in d.get("rows", {}).items()},
                   meta=dict(d.get("meta", {})))


# -- patching ------------------------------------------------------------------
def _position_label(positions: PositionSpec) -> str:
    return positions if isinstance(positions, str) else getattr(positions, "__name__", "custom")


def _patch_mask(positions: PositionSpec, name: str, inputs: VLMInputs) -> Optional[Bool[Tensor, "batch pos"]]:
    """Which positions of the target to overwrite at ``name``; None means the whole activation."""
    if isinstance(positions, str) and positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS} or a callable(inputs) -> bool [batch, pos], got {positions!r}")
    if positions == "all":
        return None
    if is_vision_side(name):
        if positions == "image":
            return None  # every vision-side position belongs to an image
        raise ValueError(f"positions={_position_label(positions)!r} is meaningless at vision-side site {name!r}: "
                         "it has no prompt positions; use 'all' or 'image'")
    if positions == "last":
        b, p = inputs.input_ids.shape
        mask = torch.zeros((b, p), dtype=torch.bool, device=inputs.input_ids.device)
        mask[torch.arange(b, device=mask.device), inputs.last_index.to(mask.device)] = True
        return mask
    if positions == "image":
        return inputs.image_mask
    if positions == "text":
        return inputs.text_mask
    mask = torch.as_tensor(positions(inputs)).bool()
    if tuple(mask.shape) != tuple(inputs.input_ids.shape):
        raise ValueError(f"positions callable returned shape {tuple(mask.shape)}, expected {tuple(inputs.input_ids.shape)}")
    return mask


def image_token(k: int) -> Callable[[VLMInputs], Bool[Tensor, "batch pos"]]:
    """A ``positions`` spec: the ``k``-th image token of each row (counting from 0 in sequence order, which is the
    patch grid's raster order for LLaVA and the merged grid's for Qwen2.5-VL); a row with ``k`` or fewer image
    tokens is an error.  For layer x image-token maps, one call per ``k``.

    >>> from interp.tiny import tiny_vlm
    >>> from PIL import Image
    >>> model = tiny_vlm("llava", n_layers=1)
    >>> inputs = model.encode(images=[Image.new("RGB", (32, 32))], prompts=["who is this"])
    >>> int(image_token(3)(inputs).nonzero()[0, 1]) == int(inputs.image_mask[0].nonzero()[3, 0])
    True
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"image_token needs an index >= 0, got {k!r}")

    def kth_image_token(inputs: VLMInputs) -> Tensor:
        counts = inputs.image_mask.sum(1)
        short = (counts <= k).nonzero().flatten().tolist()
        if short:
            raise ValueError(f"row(s) {short[:8]} have {counts[short[0]].item()} image tokens or fewer; no image token {k}")
        rank = inputs.image_mask.long().cumsum(1) - 1  # each image token's index among its row's image tokens
        return inputs.image_mask & (rank == k)

    kth_image_token.__name__ = f"image_token_{k}"
    return kth_image_token


def _patch_hook(source: Tensor, mask: Optional[Tensor], copy: int, n_copies: int) -> HookFn:
    """Overwrite copy ``copy`` of a ``n_copies``-times repeated batch with ``source`` (at ``mask``); other copies untouched."""

    def hook(x: Tensor, ctx: HookContext) -> Tensor:
        if x.shape[0] % n_copies:
            raise ValueError(f"{ctx.name!r}: leading dim {x.shape[0]} does not split into {n_copies} copies")
        n0 = x.shape[0] // n_copies
        seg = x[copy * n0:(copy + 1) * n0]
        if seg.shape != source.shape:
            raise ValueError(
                f"cannot patch {ctx.name!r}: source activation has shape {tuple(source.shape)}, the target's is "
                f"{tuple(seg.shape)}. Source and target runs must line up (same prompt token lengths, same image sizes)")
        src = source.to(device=x.device, dtype=x.dtype)
        if mask is None:
            new = src
        else:
            m = mask.to(x.device).reshape(*mask.shape, *([1] * (seg.dim() - mask.dim())))  # [batch, pos(, head)]
            new = torch.where(m, src, seg)
        return torch.cat([x[:copy * n0], new, x[(copy + 1) * n0:]])

    return hook


def check_max_rows(max_rows: Optional[int]) -> Optional[int]:
    """``max_rows`` as given, if it is None or an integer >= 1 (a batch smaller than it still runs one site per
    pass); anything else is a ValueError, not a silent single-site run."""
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be None (everything in one pass) or an integer >= 1, got {max_rows!r}")
    return max_rows


def patch_from_run(
    model: "HookedVLM",
    target_inputs: VLMInputs,
    source_cache: ActivationCache,
    names: NameFilter,
    metric: Metric,
    positions: PositionSpec = "all",
    source_logits: Optional[Float[Tensor, "batch pos vocab"]] = None,
    max_rows: Optional[int] = 32,
) -> PatchResult:
    """Patch each site of ``source_cache`` alone into a plain run of ``target_inputs`` and record ``metric``.

    ``source_cache`` is any cache whose activations line up with the target
    (e.g. ``model.run_with_cache(inputs, names, hooks=steering)`` for the
    same inputs); pass that run's ``source_logits`` to get ``clean`` and the
    normalised effects.  ``positions``: ``"all"``, ``"last"``, ``"image"``,
    ``"text"``, or ``callable(target_inputs) -> bool [batch, pos]``; at
    vision-side sites only ``"all"``/``"image"`` (both: the whole tensor).
    ``max_rows`` caps the rows of one forward pass (``k`` sites per pass
    with ``k * batch <= max_rows``, at least one); ``None`` patches all
    sites in one pass.

    >>> from interp.tiny import tiny_vlm
    >>> model = tiny_vlm("llava", n_layers=2)
    >>> inputs = model.encode(images=[None], prompts=["who is this"])
    >>> steer = [("blocks.0.hook_resid_post", lambda x, ctx: x * 2)]
    >>> logits, cache = model.run_with_cache(inputs, names="blocks.*.hook_resid_post", hooks=steer)
    >>> res = patch_from_run(model, inputs, cache, "blocks.*.hook_resid_post", answer_logprob(5), source_logits=logits)
    >>> [round(e, 4) for e in res.effects.values()]
    [1.0, 1.0]
    """
    check_max_rows(max_rows)
    resolved = patchable_names(model, names)
    check_source(source_cache, target_inputs, resolved)
    masks = {n: _patch_mask(positions, n, target_inputs) for n in resolved}  # validate before any forward pass

    target_logits = model.run_with_hooks(target_inputs, [])
    rows: dict[str, list[float]] = {"corrupted": _apply_metric(metric, target_logits, target_inputs)}
    del target_logits
    if source_logits is not None:
        rows["clean"] = _apply_metric(metric, source_logits, target_inputs)

    b = target_inputs.batch_size
    per = len(resolved) if max_rows is None else max(1, max_rows // b)
    for s in range(0, len(resolved), per):
        chunk = resolved[s:s + per]
        k = len(chunk)
        hooks: HookSpec = [(n, _patch_hook(source_cache[n], masks[n], c, k)) for c, n in enumerate(chunk)]
        logits = model.run_with_hooks(repeat_inputs(target_inputs, k), hooks)
        for c, n in enumerate(chunk):
            rows[n] = _apply_metric(metric, logits[c * b:(c + 1) * b], target_inputs)
        del logits
    return PatchResult(
        names=resolved,
        patched={n: _mean(rows[n]) for n in resolved},
        clean=_mean(rows["clean"]) if "clean" in rows else float("nan"),
        corrupted=_mean(rows["corrupted"]),
        positions=_position_label(positions),
        rows=rows,
    )


def check_source(source_cache: ActivationCache, target_inputs: VLMInputs, names: Sequence[str]) -> None:
    """Raise unless ``source_cache`` holds every one of ``names`` and lines up with ``target_inputs`` (the same
    ``[batch, pos]``, real and image positions, and image grids): what patching from a cached run needs."""
    missing = [n for n in names if n not in source_cache]
    if missing:
        raise ValueError(f"the source cache lacks {missing[:4]}{'...' if len(missing) > 4 else ''}; "
                         f"cache them in the source run (cached: {source_cache.names[:6]})")
    check_layout("source", source_cache.image_mask, source_cache.image_mask | source_cache.text_mask,
                 "target", target_inputs.image_mask, target_inputs.image_mask | target_inputs.text_mask)
    check_grids("source", source_cache.image_grid_thw, "target",
                target_inputs.image_kwargs.get("image_grid_thw"))


def check_aligned(clean_inputs: VLMInputs, corrupted_inputs: VLMInputs) -> None:
    """Clean and corrupted runs must line up position by position: the same ``[batch, pos]``, and in every
    row the same padding and the same image positions.

    Why more than the shape: with left padding, two prompts of different token lengths padded to one width
    have the same shape but their tokens sit at different positions, so a patch would write a pad token's
    activation where the other run has a real one, silently.  Likewise two Qwen2.5-VL images with the same
    token count but different patch grids (8 x 8 and 4 x 16): their image grids must be equal.
    """
    check_layout("clean", clean_inputs.image_mask, clean_inputs.attention_mask.bool(),
                 "corrupted", corrupted_inputs.image_mask, corrupted_inputs.attention_mask.bool())
    check_grids("clean", clean_inputs.image_kwargs.get("image_grid_thw"), "corrupted",
                corrupted_inputs.image_kwargs.get("image_grid_thw"))


def check_grids(a_name: str, a: Tensor | None, b_name: str, b: Tensor | None) -> None:
    """Raise if two runs' Qwen2.5-VL patch grids (``image_grid_thw``) differ; None (LLaVA, or unknown) passes."""
    if a is not None and b is not None and not torch.equal(a.cpu(), b.cpu()):
        bad = [i for i, (x, y) in enumerate(zip(a.tolist(), b.tolist())) if x != y] if a.shape == b.shape else []
        raise ValueError(
            f"{a_name} and {b_name} images have different patch grids (image_grid_thw {a.tolist()} vs {b.tolist()}"
            + (f", image(s) {bad}" if bad else "") + "): the same number of image tokens in another layout, so "
            "a patch would move vision activations between different places and rope positions; resize the "
            "images to the same size")


def check_layout(a: str, a_image: Tensor, a_real: Tensor, b: str, b_image: Tensor, b_real: Tensor) -> None:
    """Raise unless two runs have the same ``[batch, pos]``, real (non-padding) positions and image positions."""
    if tuple(a_image.shape) != tuple(b_image.shape):
        raise ValueError(
            f"{a} inputs have [batch, pos] = {tuple(a_image.shape)}, {b} {tuple(b_image.shape)}: patching needs runs "
            "that line up position by position; use prompts of the same token length (e.g. the same prompt with "
            "two different images)")
    for what, x, y in (("padding", a_real, b_real), ("image positions", a_image, b_image)):
        diff = (x.cpu() != y.cpu()).any(-1).nonzero().flatten().tolist()
        if diff:
            raise ValueError(
                f"{a} and {b} runs differ in {what} in row(s) {diff[:8]}: their tokens do not line up position by "
                "position, so a patch would move activations between different tokens; pair prompts of the same "
                "token length and the same images per row")


def patchable_names(model: "HookedVLM", names: NameFilter) -> list[str]:
    """``names`` resolved for patching: read-only sites (``attn.hook_pattern``) are left out of globs and
    predicates, and naming one outright is an error, since no hook can replace it.

    >>> from interp.tiny import tiny_vlm
    >>> patchable_names(tiny_vlm("llava", n_layers=1), "blocks.0.attn.*")
    ['blocks.0.attn.hook_q', 'blocks.0.attn.hook_k', 'blocks.0.attn.hook_v', 'blocks.0.attn.hook_z']
    """
    return resolve_names_except_read_only(
        names, model.hook_names(), "attention patterns cannot be patched: they are used inside the attention "
        "function, where no hook reaches; patch attn.hook_q / attn.hook_k / attn.hook_z instead")


def patch_sites(
    model: "HookedVLM",
    clean_inputs: VLMInputs,
    corrupted_inputs: VLMInputs,
    names: NameFilter,
    metric: Metric,
    positions: PositionSpec = "all",
    max_rows: Optional[int] = 32,
) -> PatchResult:
    """Clean -> corrupted activation patching at each site in ``names`` (list, glob or predicate).

    The clean run is cached once; then each site's clean activation replaces
    the corrupted one (at ``positions``, masks read from the corrupted
    inputs) in an otherwise plain corrupted run.  See :func:`patch_from_run`
    for ``positions`` and ``max_rows``, and the module docstring for an example.
    """
    check_aligned(clean_inputs, corrupted_inputs)
    resolved = patchable_names(model, names)
    clean_logits, cache = model.run_with_cache(clean_inputs, names=resolved)
    return patch_from_run(model, corrupted_inputs, cache, resolved, metric, positions, clean_logits, max_rows)


def patch_hooks(
    model: "HookedVLM",
    inputs: VLMInputs,
    hooks: HookSpec,
    names: NameFilter,
    metric: Metric,
    positions: PositionSpec = "all",
    max_rows: Optional[int] = 32,
) -> PatchResult:
    """Which site's *hooked* activations, patched alone into the vanilla run, reproduce the hooked behaviour?

    Runs ``inputs`` once with ``hooks`` (e.g. steering), caching ``names``,
    then patches each site into an unhooked run; ``clean`` is the hooked
    metric, ``corrupted`` the vanilla one.  Hooks attached persistently with
    ``model.hooks(...)`` would be active in both runs, so pass them here instead.
    """
    resolved = patchable_names(model, names)
    source_logits, cache = model.run_with_cache(inputs, names=resolved, hooks=hooks)
    return patch_from_run(model, inputs, cache, resolved, metric, positions, source_logits, max_rows)
