"""Tiny random-weight VLMs of the real Hugging Face classes, built offline from config.

Why the real classes: every code path (adapters, hooks, caches, the eraser)
then runs unchanged on LLaVA-1.5-7B or Qwen2.5-VL-7B; only the sizes differ.

>>> from interp.tiny import tiny_vlm
>>> model = tiny_vlm("llava", seed=0, n_layers=2)
>>> model.hook_names()[-1]
'hook_logits'
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from .tokenizer import BASIC_WORDS, LLAVA_SPECIALS, QWEN_SPECIALS, build_tokenizer

ARCHS = ("llava", "qwen2_5_vl")

DEFAULTS: dict[str, dict[str, Any]] = {
    "llava": dict(
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_mlp=None, vision_d_model=64, vision_layers=2,
        vision_heads=2, image_size=32, patch_size=8, vision_feature_layer=-2, max_positions=512, vision_d_mlp=None,
    ),
    "qwen2_5_vl": dict(
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=None, vision_d_model=64, vision_layers=2,
        vision_heads=2, image_size=64, patch_size=8, vision_feature_layer=None, max_positions=512, vision_d_mlp=None,
        vision_window=None, vision_full_attention=None,
    ),
}


def _check_overrides(arch: str, overrides: dict[str, Any]) -> dict[str, Any]:
    if arch not in ARCHS:
        raise NotImplementedError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")
    unknown = set(overrides) - set(DEFAULTS[arch])
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)} for tiny_vlm({arch!r}); valid: {sorted(DEFAULTS[arch])}")
    if arch == "qwen2_5_vl" and overrides.get("vision_feature_layer") is not None:
        raise ValueError("vision_feature_layer is LLaVA's (which vision block its projector reads); Qwen2.5-VL's "
                         "merger always reads the last vision block: leave it None, or set vision_layers")
    cfg = {**DEFAULTS[arch], **overrides}
    if cfg["d_model"] % cfg["n_heads"] or cfg["n_heads"] % cfg["n_kv_heads"]:
        raise ValueError("d_model must divide by n_heads, and n_heads by n_kv_heads")
    if cfg["image_size"] % cfg["patch_size"]:
        raise ValueError("image_size must be a multiple of patch_size")
    full = cfg.get("vision_full_attention")
    if full is not None and (not full or any(not 0 <= i < cfg["vision_layers"] for i in full)):
        raise ValueError(f"vision_full_attention must name vision layers in [0, {cfg['vision_layers']}), got {full!r}")
    return cfg


def _llava(cfg: dict[str, Any], tok) -> tuple[torch.nn.Module, Any]:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg["d_model"], intermediate_size=cfg["d_mlp"] or 4 * cfg["d_model"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"], num_key_value_heads=cfg["n_kv_heads"],
        max_position_embeddings=cfg["max_positions"], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg["vision_d_model"], intermediate_size=cfg["vision_d_mlp"] or 4 * cfg["vision_d_model"],
        num_hidden_layers=cfg["vision_layers"], num_attention_heads=cfg["vision_heads"],
        image_size=cfg["image_size"], patch_size=cfg["patch_size"],
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_layer=cfg["vision_feature_layer"],
        vision_feature_select_strategy="default", image_seq_length=(cfg["image_size"] // cfg["patch_size"]) ** 2,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(config)
    s = cfg["image_size"]
    proc = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    return model, proc


def _qwen(cfg: dict[str, Any], tok) -> tuple[torch.nn.Module, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    head_dim = cfg["d_model"] // cfg["n_heads"]
    half = head_dim // 2  # M-RoPE sections (temporal, height, width) must sum to head_dim / 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    merge = 2
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS["extra"]}
    text = dict(
        vocab_size=len(tok), hidden_size=cfg["d_model"], intermediate_size=cfg["d_mlp"] or 4 * cfg["d_model"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"], num_key_value_heads=cfg["n_kv_heads"],
        max_position_embeddings=cfg["max_positions"], rope_scaling={"type": "mrope", "mrope_section": section},
        pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=cfg["vision_layers"], hidden_size=cfg["vision_d_model"],
        intermediate_size=cfg["vision_d_mlp"] or 4 * cfg["vision_d_model"],
        num_heads=cfg["vision_heads"], out_hidden_size=cfg["d_model"], patch_size=cfg["patch_size"],
        spatial_merge_size=merge, temporal_patch_size=2,
        window_size=cfg["vision_window"] or cfg["patch_size"] * merge * 2,
        fullatt_block_indexes=list(cfg["vision_full_attention"] or [cfg["vision_layers"] - 1]),
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    model = Qwen2_5_VLForConditionalGeneration(config)
    s = cfg["image_size"]
    proc = Qwen2VLImageProcessorPil(
        min_pixels=s * s, max_pixels=s * s, patch_size=cfg["patch_size"], merge_size=merge, temporal_patch_size=2,
    )
    return model, proc


def tiny_vlm(arch: str = "llava", seed: int = 0, corpus: Iterable[str] | None = None, **overrides: Any):
    """A random-weight tiny model of ``arch`` ("llava" or "qwen2_5_vl"), wrapped as a :class:`~interp.HookedVLM`.

    ``corpus`` (optional) trains the word-level tokenizer; by default a small
    general vocabulary is used.  Overrides: ``d_model, n_layers, n_heads,
    n_kv_heads, d_mlp, vision_d_model, vision_layers, vision_heads,
    image_size, patch_size, vision_feature_layer, max_positions, vision_d_mlp`` (default 4 x
    ``vision_d_model``), and for Qwen2.5-VL ``vision_window`` (pixels per attention window side, default
    ``4 x patch_size``) and ``vision_full_attention`` (the vision layers with full attention, default the last).
    LLaVA images are resized to ``image_size`` x ``image_size``; Qwen2.5-VL keeps the aspect ratio (its
    processor rounds each side to whole merged patches), so images of other shapes give other patch grids.
    """
    from .model import HookedVLM

    cfg = _check_overrides(arch, overrides)
    specials = LLAVA_SPECIALS if arch == "llava" else QWEN_SPECIALS
    tok = build_tokenizer(corpus if corpus is not None else [" ".join(BASIC_WORDS)], specials)
    torch.manual_seed(seed)
    model, proc = (_llava if arch == "llava" else _qwen)(cfg, tok)
    model.eval()
    return HookedVLM.from_hf(model, tokenizer=tok, image_processor=proc)
