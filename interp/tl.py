"""Hand a :class:`~interp.HookedVLM` to TransformerLens 4.x (``TransformerBridge``), on the same weights.

Why: TransformerLens has tooling this package does not re-implement (its
``ActivationCache`` helpers, ``utils.test_prompt``, logit-lens and
attribution utilities, SAE libraries built on it, ...).  Bridging lets an
analysis use that tooling on *exactly* the weights our caches and
interventions were computed on, and :func:`compare_with_bridge` checks that
both toolkits see the same activations (measured on the tiny float32 models:
residual stream ~1e-7, ``ln_final.hook_normalized`` ~1.5e-6, logits ~5e-7).

Booting a bridge naively is dangerous on these machines, so
:func:`to_transformer_lens` does it the safe way:

* TransformerLens rewrites the HF model's modules in place, so it gets a
  ``copy.deepcopy`` of ``model.hf_model``; the original is untouched (its
  parameters, config, module tree and outputs).  The copy costs one more
  model's worth of memory on ``model``'s device before it is moved.
* When it cannot build a multimodal processor (Qwen2.5-VL's needs
  torchvision) TransformerLens 4.3 runs ``pip install torchvision`` by
  itself, which pulls a CUDA torch and breaks the environment.
  :func:`no_torchvision_install` replaces
  ``transformer_lens.model_bridge.sources.transformers.helpers._ensure_torchvision``
  with a refusal and lifts the Qwen2.5-VL adapter's
  ``required_libraries = ["torchvision"]`` check, for the duration of the
  call only.  (Qwen2.5-VL bridges fine without it; ``bridge.processor`` is
  then ``None``: encode with :meth:`HookedVLM.encode` and use
  :func:`bridge_run_with_cache`.)
* ``name`` points at a temporary local directory holding the saved tokenizer,
  image processor and config, so nothing is looked up on the Hub, and the
  copy's ``config.architectures`` is set so TransformerLens picks the adapter.

Both architectures bridge: LLaVA and Qwen2.5-VL.

Hook names mostly coincide (``blocks.{l}.hook_resid_post`` is the same name in
both), but a few differ; :func:`bridge_hook_name` maps ours to the bridge's:

=========================  ==========================================================
ours                       bridge
=========================  ==========================================================
``hook_embed``             ``blocks.0.hook_resid_pre`` (the bridge's ``hook_embed`` is
                           the token embedding *before* image features are scattered in)
``vision.hook_embed``      ``vision_encoder.<layers>.0.hook_resid_pre``
``vision.blocks.{l}.X``    ``vision_encoder.encoder_layers.{l}.X`` (LLaVA) /
                           ``vision_encoder.blocks.{l}.X`` (Qwen2.5-VL);
                           ``hook_resid_mid`` -> ``...ln2.hook_in`` / ``...norm2.hook_in``
``projector.hook_in/out``  ``vision_projector.hook_in/out`` (Qwen2.5-VL: the bridge's
                           ``hook_out`` is in window-permuted row order;
                           :func:`bridge_run_with_cache` undoes it)
``hook_logits``            ``unembed.hook_out``
=========================  ==========================================================

The sites inside the language model's blocks (``ln1.hook_normalized``, ``attn.hook_q/k/v/z``,
``attn.hook_pattern``, ``mlp.hook_pre/pre_linear/post``, ...) have the same names on both sides, as have
CLIP's inside ``vision_encoder.encoder_layers.{l}``; Qwen2.5-VL's vision blocks keep HF's names on the
bridge (``norm1.hook_out``, ``attn.proj.hook_in``, ...).  Where the bridge keeps a per-head site flat
(``[..., heads * d_head]``), :func:`bridge_run_with_cache` splits it as ours are.

>>> from interp.tiny import tiny_vlm
>>> from interp.tl import to_transformer_lens, compare_with_bridge
>>> model = tiny_vlm("llava", n_layers=2)
>>> bridge = to_transformer_lens(model)                       # a TransformerBridge on a copy
>>> inputs = model.encode(images=[None], prompts=["who is this person"])
>>> kw = inputs.model_kwargs()
>>> logits, tl_cache = bridge.run_with_cache(kw.pop("input_ids"), **kw)   # TransformerLens' own cache
>>> tl_cache["blocks.1.hook_resid_post"].shape[-1]
128
>>> max(compare_with_bridge(model, bridge, inputs).values()) < 1e-4
True
"""
from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from typing import TYPE_CHECKING, Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from .inputs import VLMInputs
from .names import NameFilter, is_vision_side, parse_block_name, resolve_names

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens.model_bridge import TransformerBridge

    from .model import HookedVLM

log = logging.getLogger(__name__)

_HELPERS = "transformer_lens.model_bridge.sources.transformers.helpers"
_QWEN_ADAPTER = "transformer_lens.model_bridge.supported_architectures.qwen2_5_vl"

# Per architecture: the bridge's vision layer list and the name of the norm whose input is resid_mid.
_VISION_LAYOUT = {
    "llava": ("vision_encoder.encoder_layers", "ln2"),
    "qwen2_5_vl": ("vision_encoder.blocks", "norm2"),
}
SUPPORTED = tuple(_VISION_LAYOUT)

# Qwen2.5-VL's vision blocks keep HF's own submodule names on the bridge (no TransformerLens aliases)
_QWEN_VISION_SITES = {
    "ln1.hook_normalized": "norm1.hook_out",
    "ln2.hook_normalized": "norm2.hook_out",
    "attn.hook_z": "attn.proj.hook_in",  # [patches, heads * d_head] there; split into heads here
    # the fused projection's whole output there; our accessor takes its third and splits it into heads
    "attn.hook_q": "attn.qkv.hook_out",
    "attn.hook_k": "attn.qkv.hook_out",
    "attn.hook_v": "attn.qkv.hook_out",
}


def _import_tl():
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as e:  # transformer-lens missing, or too old to have the bridge
        raise ImportError(
            "interp.tl needs transformer-lens>=4 (TransformerBridge): pip install 'transformer-lens>=4,<5'. "
            "Install torch first and never torchvision (see ENVIRONMENT.md)."
        ) from e
    return TransformerBridge


def _refuse_torchvision_install() -> bool:
    """Stand-in for TransformerLens' ``_ensure_torchvision``: never installs, reports 'not available'."""
    log.info("TransformerLens asked to pip install torchvision; refused (interp.tl.no_torchvision_install)")
    return False


@contextlib.contextmanager
def no_torchvision_install() -> Iterator[None]:
    """Within the block TransformerLens can neither ``pip install torchvision`` nor refuse Qwen2.5-VL for lacking it.

    Everything patched is restored on exit, even on error.

    >>> from interp.tl import no_torchvision_install
    >>> with no_torchvision_install():
    ...     pass
    """
    import importlib

    helpers = importlib.import_module(_HELPERS)
    saved_ensure = getattr(helpers, "_ensure_torchvision", None)
    qwen_cls, saved_required = None, None
    try:
        qwen_cls = importlib.import_module(_QWEN_ADAPTER).Qwen2_5_VLArchitectureAdapter
        saved_required = qwen_cls.__dict__.get("required_libraries")
    except (ImportError, AttributeError):
        qwen_cls = None
    if saved_ensure is not None:
        helpers._ensure_torchvision = _refuse_torchvision_install
    if qwen_cls is not None:
        qwen_cls.required_libraries = [lib for lib in (saved_required or []) if lib != "torchvision"]
    try:
        yield
    finally:
        if saved_ensure is not None:
            helpers._ensure_torchvision = saved_ensure
        if qwen_cls is not None:
            if saved_required is None:
                with contextlib.suppress(AttributeError):
                    del qwen_cls.required_libraries
            else:
                qwen_cls.required_libraries = saved_required


def _check_supported(model: "HookedVLM") -> None:
    if model.arch not in SUPPORTED:
        raise NotImplementedError(
            f"interp.tl has no TransformerLens mapping for architecture {model.arch!r} "
            f"({model.adapter.hf_class}); supported: {SUPPORTED}"
        )


def to_transformer_lens(model: "HookedVLM", device: str | torch.device = "cpu") -> "TransformerBridge":
    """A TransformerLens ``TransformerBridge`` over a deep copy of ``model.hf_model`` (same weights, own modules).

    ``model`` is left exactly as it was.  No network access, no package
    installs.  The bridge runs raw HF numerics (no LayerNorm folding); call
    ``bridge.enable_compatibility_mode()`` yourself for HookedTransformer-style
    processed weights (that changes activations, not logits).
    """
    _check_supported(model)
    TransformerBridge = _import_tl()
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    hf_class = model.adapter.hf_class
    if hf_class not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(
            f"this transformer-lens has no TransformerBridge adapter for {hf_class}; "
            f"interp.tl supports {SUPPORTED} with transformer-lens 4.x"
        )
    hf = copy.deepcopy(model.hf_model).to(device).eval()
    hf.config.architectures = [hf_class]
    with tempfile.TemporaryDirectory(prefix="interp_tl_") as tmp, no_torchvision_install():
        model.tokenizer.save_pretrained(tmp)
        if model.image_processor is not None:
            model.image_processor.save_pretrained(tmp)
        hf.config.save_pretrained(tmp)
        try:
            bridge = TransformerBridge.boot_transformers(tmp, hf_model=hf, device=str(device), dtype=model.dtype)
        except ValueError as e:
            if "Unsupported architecture" in str(e):
                raise NotImplementedError(f"TransformerLens cannot bridge {hf_class}: {e}") from e
            raise
    bridge.eval()
    return bridge


to_tl = to_transformer_lens


def bridge_hook_name(name: str, arch: str) -> str:
    """The ``TransformerBridge`` hook name holding the same activation as our hook ``name`` on ``arch``.

    >>> bridge_hook_name("blocks.3.hook_resid_post", "llava")
    'blocks.3.hook_resid_post'
    >>> bridge_hook_name("hook_embed", "llava")
    'blocks.0.hook_resid_pre'
    >>> bridge_hook_name("vision.blocks.0.hook_resid_mid", "qwen2_5_vl")
    'vision_encoder.blocks.0.norm2.hook_in'
    """
    if arch not in _VISION_LAYOUT:
        raise NotImplementedError(f"no TransformerLens mapping for architecture {arch!r}; supported: {SUPPORTED}")
    layers, norm2 = _VISION_LAYOUT[arch]
    fixed = {
        "hook_embed": "blocks.0.hook_resid_pre",
        "vision.hook_embed": f"{layers}.0.hook_resid_pre",
        "projector.hook_in": "vision_projector.hook_in",
        "projector.hook_out": "vision_projector.hook_out",
        "ln_final.hook_normalized": "ln_final.hook_normalized",
        "hook_logits": "unembed.hook_out",
    }
    if name in fixed:
        return fixed[name]
    parsed = parse_block_name(name)
    if parsed is None:
        raise KeyError(f"{name!r} is not one of our hook names (see HookedVLM.hook_names())")
    side, layer, site = parsed
    if side == "lm":
        return name
    if site == "hook_resid_mid":
        return f"{layers}.{layer}.{norm2}.hook_in"
    if arch == "qwen2_5_vl":
        site = _QWEN_VISION_SITES.get(site, site)
    return f"{layers}.{layer}.{site}"


def bridge_hook_names(model: "HookedVLM", names: NameFilter = None) -> dict[str, str]:
    """``{our name: bridge name}`` for ``names`` (a list, glob or callable; every hook name if None)."""
    _check_supported(model)
    ours = model.hook_names() if names is None else resolve_names(names, model.hook_names())
    return {n: bridge_hook_name(n, model.arch) for n in ours}


def _qwen_unwindow(bridge: "TransformerBridge", merged: Tensor, grid_thw: Tensor) -> Tensor:
    """Undo Qwen2.5-VL's window permutation of merged vision tokens (what the HF tower does after the merger)."""
    from .vision import qwen_unwindow

    visual = bridge.original_model.model.visual
    return qwen_unwindow(merged, grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)


def bridge_run_with_cache(bridge: "TransformerBridge", model: "HookedVLM", inputs: VLMInputs,
                          names: NameFilter = None) -> tuple[Float[Tensor, "batch pos vocab"], dict[str, Tensor]]:
    """Run the bridge on our encoded ``inputs``; return its logits and its activations keyed by *our* names.

    Shapes follow our conventions, so each entry is directly comparable with
    ``model.run_with_cache(inputs, names)[1][name]``.  Vision-side names are
    skipped when the batch has no images.
    """
    mapping = bridge_hook_names(model, names)
    if not inputs.has_images:
        mapping = {k: v for k, v in mapping.items() if not is_vision_side(k)}
    kw = {k: v.to(bridge.cfg.device) for k, v in inputs.model_kwargs().items()}
    input_ids = kw.pop("input_ids")
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(input_ids, names_filter=sorted(set(mapping.values())), **kw)
    acts = {ours: cache[theirs] for ours, theirs in mapping.items()}
    for ours, t in acts.items():  # per-head sites the bridge keeps flat ([..., heads * d_head]): split them as ours are
        site = model.site(ours)
        if site.heads is not None:
            tower = parse_block_name(ours)[0]
            if t.dim() == (3 if tower == "lm" or model.adapter.vision_batched else 2):
                acts[ours] = site.get(t)  # a tensor site's accessor is the split itself
    if model.arch == "qwen2_5_vl" and "projector.hook_out" in acts:
        acts["projector.hook_out"] = _qwen_unwindow(bridge, acts["projector.hook_out"], kw["image_grid_thw"])
    return logits, acts


def compare_with_bridge(model: "HookedVLM", bridge: "TransformerBridge", inputs: VLMInputs,
                        names: NameFilter = None) -> dict[str, float]:
    """Max absolute difference between our cache and the bridge's, per hook name (plus ``"logits"``).

    A quick proof that an analysis done in TransformerLens is about the same
    activations as one done here; expect 1e-7 to 2e-6 in float32.  Left-padding
    positions are excluded: they hold meaningless values that the two runs
    compute differently (the bridge handles fully masked rows its own way).
    """
    theirs_logits, theirs = bridge_run_with_cache(bridge, model, inputs, names)
    ours_logits, cache = model.run_with_cache(inputs, names=list(theirs))
    real = inputs.attention_mask.bool()

    def diff(a: Tensor, b: Tensor) -> float:
        d = (a.float() - b.to(a.device).float()).abs()
        if d.dim() >= 2 and d.shape[:2] == real.shape:  # prompt positions: padding is garbage in both, skip it
            d = d[real.to(d.device)]
        return d.max().item()

    out = {n: diff(cache[n], theirs[n]) for n in theirs}
    out["logits"] = diff(ours_logits, theirs_logits)
    return out


__all__ = [
    "SUPPORTED", "bridge_hook_name", "bridge_hook_names", "bridge_run_with_cache", "compare_with_bridge",
    "no_torchvision_install", "to_tl", "to_transformer_lens",
]
