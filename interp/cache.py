"""ActivationCache: activations by hook name, sliceable by modality.

Why modality slicing lives here: in a VLM the same residual stream mixes image
tokens, text tokens and padding, and nearly every analysis wants one of them
(probing image positions, steering the last prompt token).  Doing that
slicing once, with the batch's masks, removes a whole class of off-by-one and
padding bugs from user code.
"""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Iterator

import torch
from jaxtyping import Bool, Float, Int
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .names import HookNameError, closest_names, is_vision_side, layer_of, parse_block_name

_MASKS = ("__image_mask__", "__text_mask__", "__last_index__")
_GRID = "__image_grid_thw__"
_ANSWER = "__answer_mask__"


class ActivationCache:
    """Activations of one forward pass, keyed by hook name; only requested names are stored.

    >>> logits, cache = model.run_with_cache(inputs, names="blocks.*.hook_resid_pre")  # doctest: +SKIP
    >>> cache.last("blocks.2.hook_resid_pre").shape                                       # doctest: +SKIP
    torch.Size([2, 128])
    """

    def __init__(
        self,
        acts: dict[str, Tensor],
        image_mask: Bool[Tensor, "batch pos"],
        text_mask: Bool[Tensor, "batch pos"],
        last_index: Int[Tensor, " batch"],
        image_grid_thw: Int[Tensor, "n_images 3"] | None = None,
        answer_mask: Bool[Tensor, "batch pos"] | None = None,
    ) -> None:
        self._acts = dict(acts)
        self.image_mask = image_mask
        self.text_mask = text_mask
        self.last_index = last_index
        #: Qwen2.5-VL's patch grid per image (None for LLaVA or text-only runs): patching from this cache
        #: checks a target's images have the same grids, not only the same token counts
        self.image_grid_thw = image_grid_thw
        #: the generated answer's positions in a cache from ``generate_with_cache`` (None for one forward pass)
        self.answer_mask = answer_mask

    # -- dict-like access -------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._acts)

    def keys(self) -> list[str]:
        return self.names

    def __contains__(self, name: object) -> bool:
        return name in self._acts

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._acts:
            if not self._acts:
                raise HookNameError(f"{name!r} is not cached: the cache is empty")
            close = closest_names(name, self.names)
            shown = close or self.names[:8]
            raise HookNameError(
                f"{name!r} is not in this cache, which holds {len(self)} names "
                f"({'closest' if close else 'e.g.'}: {', '.join(shown)}); a cache keeps only the names asked for: "
                "pass it in run_with_cache(names=...)")
        return self._acts[name]

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} names, batch={self.image_mask.shape[0]}, pos={self.image_mask.shape[1]})"

    # -- modality slicing -------------------------------------------------
    def _positional(self, name: str) -> Tensor:
        t = self[name]
        parsed = parse_block_name(name)
        if is_vision_side(name) or (parsed is not None and parsed[0] == "vision"):
            raise ValueError(f"{name!r} is a vision-side site: it has no prompt positions to slice by modality")
        if t.dim() < 2 or t.shape[:2] != self.image_mask.shape:
            raise ValueError(f"{name!r} has shape {tuple(t.shape)}, not [batch, pos, ...] matching the prompt masks")
        return t

    def _select(self, name: str, mask: Tensor, padded: bool):
        t = self._positional(name)
        rows = [t[b][mask[b]] for b in range(t.shape[0])]
        if not padded:
            return rows
        width = max((r.shape[0] for r in rows), default=0)
        out = t.new_zeros((t.shape[0], width) + tuple(t.shape[2:]))
        valid = torch.zeros((t.shape[0], width), dtype=torch.bool, device=t.device)
        for b, r in enumerate(rows):
            out[b, : r.shape[0]] = r
            valid[b, : r.shape[0]] = True
        return out, valid

    def image(self, name: str, padded: bool = False):
        """Image-token positions: a list of ``[n_image_tokens_b, ...]`` per row, or ``(padded, valid_mask)``."""
        return self._select(name, self.image_mask, padded)

    def text(self, name: str, padded: bool = False):
        """Real text-token positions (no padding, no image tokens), like :meth:`image`."""
        return self._select(name, self.text_mask, padded)

    def answer(self, name: str, padded: bool = False):
        """The generated answer's positions (a cache from ``generate_with_cache``), like :meth:`image`."""
        if self.answer_mask is None:
            raise ValueError("this cache holds one forward pass, not a generation: there is no answer to slice "
                             "(HookedVLM.generate_with_cache records one)")
        return self._select(name, self.answer_mask, padded)

    def last(self, name: str) -> Float[Tensor, "batch ..."]:
        """The last prompt token of each row: ``[batch, d]``."""
        t = self._positional(name)
        idx = self.last_index.to(t.device)
        return t[torch.arange(t.shape[0], device=t.device), idx]

    def attention_to(self, name: str, keys: str = "image", query: str = "last"):
        """How much attention each head pays to one modality: the pattern's mass on ``keys`` positions.

        ``name`` is a language-model ``blocks.{l}.attn.hook_pattern``; ``keys`` is ``"image"`` or ``"text"``
        (real text tokens: no padding, no image tokens); ``query="last"`` reads it at the last prompt token,
        ``[batch, head]``, and ``query="all"`` at every position, ``[batch, head, pos]`` (padding rows 0).
        Each value lies in [0, 1]: the image's and the text's shares of a real query add up to 1.
        """
        parsed = parse_block_name(name)
        if parsed is None or parsed[2] != "attn.hook_pattern" or parsed[0] != "lm":
            raise ValueError(f"{name!r} is not a language-model attention pattern (blocks.{{l}}.attn.hook_pattern)")
        masks = {"image": self.image_mask, "text": self.text_mask}
        if keys not in masks:
            raise ValueError(f"keys must be 'image' or 'text', got {keys!r}")
        if query not in ("last", "all"):
            raise ValueError(f"query must be 'last' or 'all', got {query!r}")
        p = self[name]
        b, n_pos = self.image_mask.shape
        if p.dim() != 4 or p.shape[0] != b or p.shape[2:] != (n_pos, n_pos):
            raise ValueError(f"{name!r} has shape {tuple(p.shape)}, not [batch, head, pos, pos] for pos {n_pos}")
        mass = (p.float() * masks[keys].to(p.device)[:, None, None, :].float()).sum(-1)  # [batch, head, query]
        if query == "all":
            real = (self.image_mask | self.text_mask).to(p.device)
            return mass * real[:, None, :]
        return mass[torch.arange(b, device=p.device), :, self.last_index.to(p.device)]

    def stack(self, pattern: str) -> Float[Tensor, "layer ..."]:
        """Stack every cached name matching a glob (``"blocks.*.hook_resid_post"``) along a new leading layer axis.

        The glob must pick one site per layer of one tower: ``"blocks.*"`` over a cache holding both
        ``hook_resid_pre`` and ``hook_attn_out`` is an error, since the leading axis would no longer be layers.
        """
        hits = [n for n in self.names if fnmatch.fnmatch(n, pattern)]
        if not hits:
            raise HookNameError(f"no cached name matches {pattern!r}; cached: {self.names[:8]}{'...' if len(self) > 8 else ''}")
        kinds = sorted({(p[0], p[2]) if (p := parse_block_name(n)) is not None else ("", n) for n in hits})
        if len(kinds) > 1 or kinds[0][0] == "":
            shown = [f"{'vision.' if t == 'vision' else ''}blocks.*.{s}" if t else s for t, s in kinds]
            raise ValueError(f"{pattern!r} matches {len(kinds)} kinds of site ({', '.join(shown[:6])}); stack() "
                             "stacks one block site over layers: narrow the glob to one of them")
        hits.sort(key=lambda n: layer_of(n) or 0)
        return torch.stack([self._acts[n] for n in hits])

    # -- movement and persistence ----------------------------------------
    def to(self, device: torch.device | str) -> "ActivationCache":
        return ActivationCache(
            {k: v.to(device) for k, v in self._acts.items()},
            self.image_mask.to(device),
            self.text_mask.to(device),
            self.last_index.to(device),
            self.image_grid_thw,
            None if self.answer_mask is None else self.answer_mask.to(device),
        )

    def save(self, path: str | Path) -> None:
        """Write to one safetensors file (activations + masks); no pickle.

        Names that hold the same tensor (``blocks.{l}.hook_resid_post`` is ``blocks.{l+1}.hook_resid_pre``) are
        written as separate copies, since safetensors refuses shared storage; :meth:`load` keeps the order.
        """
        from .io import atomic_path

        tensors, seen = {}, set()
        for k, v in self._acts.items():
            v = v.detach().contiguous().cpu()
            key = (v.untyped_storage().data_ptr(), v.storage_offset())
            tensors[k] = v.clone() if key in seen or v.untyped_storage().nbytes() != v.nbytes else v
            seen.add(key)
        tensors.update(dict(zip(_MASKS, (self.image_mask.cpu(), self.text_mask.cpu(), self.last_index.cpu()))))
        if self.image_grid_thw is not None:
            tensors[_GRID] = self.image_grid_thw.detach().cpu().contiguous()
        if self.answer_mask is not None:
            tensors[_ANSWER] = self.answer_mask.cpu().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "interp.ActivationCache", "names": json.dumps(self.names)})

    @classmethod
    def load(cls, path: str | Path) -> "ActivationCache":
        """Read a file :meth:`save` wrote (safetensors: no code runs); anything else is a ValueError naming the file.

        Names come back in the order they were saved (execution order for a cache from ``run_with_cache``).
        """
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            t = load_file(str(path))
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable ActivationCache file ({type(e).__name__}: {e})") from None
        missing = [k for k in _MASKS if k not in t]
        if missing:
            raise ValueError(f"{path} is a safetensors file but not an ActivationCache (no {', '.join(missing)})")
        masks = [t.pop(k) for k in _MASKS]
        grid = t.pop(_GRID, None)
        answer = t.pop(_ANSWER, None)
        try:
            order = json.loads(meta.get("names", "null"))
        except ValueError:
            order = None
        if isinstance(order, list) and sorted(order) == sorted(t):
            t = {n: t[n] for n in order}
        return cls(t, *masks, image_grid_thw=grid, answer_mask=answer)
