"""What an architecture adapter declares, and the machinery every adapter shares.

An adapter is data, not code paths: where the decoder blocks, the vision blocks
and the projector live, which submodule of a block produces each site, and how
to turn prompts and images into model inputs.  Adding an architecture means
adding one file under ``interp/adapters/`` that builds one :class:`ArchAdapter`
and registers it for its transformers class name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

Getter = Callable[[Any], torch.Tensor]
Setter = Callable[[Any, torch.Tensor], Any]


def _identity_get(value: Any) -> torch.Tensor:
    return value


def _identity_set(value: Any, new: torch.Tensor) -> Any:
    return new


def tuple_get(index: int) -> Getter:
    """Read element ``index`` of a tuple output (attention modules return ``(out, weights)``)."""

    def get(value: Any) -> torch.Tensor:
        return value[index] if isinstance(value, (tuple, list)) else value

    return get


def tuple_set(index: int) -> Setter:
    def set_(value: Any, new: torch.Tensor) -> Any:
        if isinstance(value, (tuple, list)):
            items = list(value)
            items[index] = new
            return type(value)(items) if isinstance(value, tuple) else items
        return new

    return set_


def part_get(index: int, parts: int = 3) -> Getter:
    """Read part ``index`` of ``parts`` equal slices of the last axis (a fused ``qkv`` projection's q, k or v)."""

    def get(value: Any) -> torch.Tensor:
        n = value.shape[-1] // parts
        return value[..., index * n:(index + 1) * n]

    return get


def part_set(index: int, parts: int = 3) -> Setter:
    def set_(value: Any, new: torch.Tensor) -> Any:
        n = value.shape[-1] // parts
        return torch.cat([value[..., :index * n], new.to(value.dtype), value[..., (index + 1) * n:]], dim=-1)

    return set_


def attr_get(attr: str) -> Getter:
    """Read a field of a ModelOutput (Qwen's vision tower returns the merged features as ``pooler_output``)."""
    return lambda value: getattr(value, attr)


def attr_set(attr: str) -> Setter:
    def set_(value: Any, new: torch.Tensor) -> Any:
        setattr(value, attr, new)
        if hasattr(value, "__setitem__"):
            value[attr] = new  # ModelOutput keeps a dict view in sync with its attributes
        return value

    return set_


def weights_get(value: Any) -> torch.Tensor:
    """The attention weights an attention module returns next to its output (``(out, weights)``).

    They are None unless the attention ran in eager mode; :class:`~interp.HookedVLM` switches the tower
    to eager for any call that reads ``attn.hook_pattern``, so None here means something else ran it.
    """
    weights = value[1] if isinstance(value, (tuple, list)) and len(value) > 1 else None
    if weights is None:
        raise RuntimeError("the attention module returned no attention weights: attn.hook_pattern needs the eager "
                           "attention implementation (HookedVLM switches to it for calls that read the pattern; "
                           "a raw hf_model call does not)")
    return weights


@dataclass(frozen=True)
class Site:
    """Where one hook name lives: a module (path relative to a root), its input or output, and how to read/write the tensor.

    ``kind == "input"`` means the first positional argument of the module's
    forward (every block of every supported model takes ``hidden_states``
    positionally).  ``heads`` ("q" or "kv") marks a site whose last axis
    holds the query heads (or key/value heads) side by side; hooks and caches
    see it split, ``[..., head, d_head]``, as TransformerLens shows
    ``attn.hook_z``.  A ``read_only`` site can be read and cached, but a hook
    that returns a replacement is an error.
    """

    module: str
    kind: str = "output"  # "input" | "output"
    get: Getter = _identity_get
    set: Setter = _identity_set
    heads: str | None = None  # None | "q" | "kv"
    read_only: bool = False


@dataclass(frozen=True)
class BlockSites:
    """The per-block sites, as paths relative to one block.

    ``attn``, ``resid_mid`` and ``mlp`` give the three residual-level sites that are not the block's own
    input and output (``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``); every architecture has
    them.  ``inner`` holds the finer sites the architecture also has, as ``(site name, Site)`` pairs
    (names from :data:`interp.names.SITE_ORDER`: ``"ln1.hook_normalized"``, ``"attn.hook_z"``, ...).
    """

    attn: Site
    resid_mid: Site
    mlp: Site
    inner: tuple[tuple[str, Site], ...] = ()

    def site_names(self) -> list[str]:
        """The per-block site names this block has (residual-level ones first; order them with SITE_ORDER)."""
        from ..names import BLOCK_SITES

        return list(BLOCK_SITES) + [name for name, _ in self.inner]

    def inner_site(self, name: str) -> Site:
        for n, site in self.inner:
            if n == name:
                return site
        raise KeyError(name)


#: The finer sites of a Llama-style decoder block (Llama, Qwen2, ...: HF's own submodule names), by site name.
LLAMA_BLOCK_INNER: tuple[tuple[str, Site], ...] = (
    ("ln1.hook_normalized", Site("input_layernorm", "output")),
    ("attn.hook_q", Site("self_attn.q_proj", "output", heads="q")),
    ("attn.hook_k", Site("self_attn.k_proj", "output", heads="kv")),
    ("attn.hook_v", Site("self_attn.v_proj", "output", heads="kv")),
    ("attn.hook_z", Site("self_attn.o_proj", "input", heads="q")),
    ("attn.hook_pattern", Site("self_attn", "output", weights_get, read_only=True)),
    ("ln2.hook_normalized", Site("post_attention_layernorm", "output")),
    ("mlp.hook_pre", Site("mlp.gate_proj", "output")),
    ("mlp.hook_pre_linear", Site("mlp.up_proj", "output")),
    ("mlp.hook_post", Site("mlp.down_proj", "input")),
)


@dataclass(frozen=True)
class ArchAdapter:
    """Declarative description of one VLM architecture.

    Paths are dotted attribute paths from the transformers model (the
    ``*ForConditionalGeneration``).  ``vision_batched`` is False for towers
    that flatten all images' patches into one ``(num_patches, d)`` sequence
    (Qwen2.5-VL), so their caches have no batch dimension.
    ``continues_from_cache`` says whether a forward over a prompt's last
    position can continue from the KV cache of an unhooked pass over the rest
    with the same numbers (plain 1-D positions); Qwen2.5-VL's 3-D rope positions
    are rebuilt from the whole prompt, so it declares False
    (:func:`interp.steering.run_coefficients` with ``shared_prefix``).
    ``token_types`` says whether the model reads image positions from
    ``mm_token_type_ids`` (Qwen2.5-VL's M-RoPE), which
    :meth:`~interp.inputs.VLMInputs.model_kwargs` then derives from the image mask.
    """

    name: str
    hf_class: str
    lm_layers: str
    final_norm: str
    lm_head: str
    vision_layers: str
    vision_block: BlockSites
    lm_block: BlockSites
    projector_in: Site
    projector_out: Site
    image_token_id: Callable[[Any], int]
    vision_batched: bool = True
    continues_from_cache: bool = True
    # whether the model needs ``mm_token_type_ids`` (1 at image tokens) to give image tokens their 3-D rope
    # positions: without it Qwen2.5-VL silently falls back to 1-D positions for every token
    token_types: bool = False
    # prompt formatting and image handling, see interp.inputs
    chat_template: Callable[[str, int], str] = field(default=lambda p, n: p)
    image_placeholder: str = "<image>"
    preprocess_images: Callable[..., dict[str, torch.Tensor]] | None = None
    tokens_per_image: Callable[..., list[int]] | None = None
    # (query heads, key/value heads) of the language model's and the vision tower's attention, from the config
    lm_heads: Callable[[Any], tuple[int, int]] | None = None
    vision_heads: Callable[[Any], tuple[int, int]] | None = None
    # (config, number of vision blocks) -> the vision blocks whose outputs the projector reads (default: the last)
    feature_blocks: Callable[[Any, int], tuple[int, ...]] = field(default=lambda config, n: (n - 1,))

    def n_layers(self, model: nn.Module) -> int:
        return len(get_module(model, self.lm_layers))

    def n_vision_layers(self, model: nn.Module) -> int:
        return len(get_module(model, self.vision_layers))


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted path (``"model.language_model.layers.3"``) from ``root``."""
    mod: Any = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


_REGISTRY: dict[str, ArchAdapter] = {}


def register(adapter: ArchAdapter) -> ArchAdapter:
    _REGISTRY[adapter.hf_class] = adapter
    return adapter


def adapter_for(model: nn.Module) -> ArchAdapter:
    """The adapter registered for ``type(model).__name__``; a clear error for anything else."""
    cls = type(model).__name__
    if cls not in _REGISTRY:
        raise NotImplementedError(
            f"unsupported architecture {cls!r}; supported: {sorted(_REGISTRY)}. "
            "Add one adapter file under interp/adapters/ to support it."
        )
    return _REGISTRY[cls]


def registered() -> dict[str, ArchAdapter]:
    return dict(_REGISTRY)
