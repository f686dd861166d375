"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2 decoder with M-RoPE, windowed ViT, patch merger.

The vision blocks see all images' patches as one ``(num_patches, d)``
sequence in window-permuted order, so vision caches have no batch dimension.
``projector.hook_out`` is read from the vision tower's ``pooler_output`` (the
merged features after the window permutation is undone), which is exactly
what the model scatters into the image-token positions.

Image tokens take 3-D (temporal, height, width) rope positions, which the
model only computes when it is given ``mm_token_type_ids`` (its processor's
default); without them every token gets 1-D positions, silently.  The adapter
declares ``token_types`` so every encoded batch carries them.
"""
from __future__ import annotations

import torch

from .base import (
    LLAMA_BLOCK_INNER, ArchAdapter, BlockSites, Site, attr_get, attr_set, part_get, part_set, register, tuple_get,
    tuple_set,
)

_VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def _chat(prompt: str, n_images: int) -> str:
    return "<|im_start|>user\n" + _VISION * n_images + prompt + "<|im_end|>\n<|im_start|>assistant\n"


def _preprocess(image_processor, images) -> dict[str, torch.Tensor]:
    out = image_processor(images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def _tokens_per_image(config, processed: dict[str, torch.Tensor]) -> list[int]:
    merge = config.vision_config.spatial_merge_size
    return (processed["image_grid_thw"].prod(-1) // merge**2).tolist()


QWEN2_5_VL = register(
    ArchAdapter(
        name="qwen2_5_vl",
        hf_class="Qwen2_5_VLForConditionalGeneration",
        lm_layers="model.language_model.layers",
        final_norm="model.language_model.norm",
        lm_head="lm_head",
        vision_layers="model.visual.blocks",
        lm_block=BlockSites(
            attn=Site("self_attn", "output", tuple_get(0), tuple_set(0)),
            resid_mid=Site("post_attention_layernorm", "input"),
            mlp=Site("mlp", "output"),
            inner=LLAMA_BLOCK_INNER,
        ),
        vision_block=BlockSites(
            attn=Site("attn", "output", tuple_get(0), tuple_set(0)),
            resid_mid=Site("norm2", "input"),
            mlp=Site("mlp", "output"),
            # q, k and v come out of one fused projection (``attn.qkv``, its output laid out [q | k | v], each
            # head after head): each is a third of it, before the rotary embedding as in the language model.
            # The windowed attention returns no weights: the vision tower has no attn.hook_pattern
            inner=(
                ("ln1.hook_normalized", Site("norm1", "output")),
                ("attn.hook_q", Site("attn.qkv", "output", part_get(0), part_set(0), heads="q")),
                ("attn.hook_k", Site("attn.qkv", "output", part_get(1), part_set(1), heads="kv")),
                ("attn.hook_v", Site("attn.qkv", "output", part_get(2), part_set(2), heads="kv")),
                ("attn.hook_z", Site("attn.proj", "input", heads="q")),
                ("ln2.hook_normalized", Site("norm2", "output")),
                ("mlp.hook_pre", Site("mlp.gate_proj", "output")),
                ("mlp.hook_pre_linear", Site("mlp.up_proj", "output")),
                ("mlp.hook_post", Site("mlp.down_proj", "input")),
            ),
        ),
        projector_in=Site("model.visual.merger", "input"),
        projector_out=Site("model.visual", "output", attr_get("pooler_output"), attr_set("pooler_output")),
        image_token_id=lambda config: config.image_token_id,
        vision_batched=False,
        continues_from_cache=False,
        token_types=True,
        chat_template=_chat,
        image_placeholder="<|image_pad|>",
        preprocess_images=_preprocess,
        tokens_per_image=_tokens_per_image,
        lm_heads=lambda c: (c.text_config.num_attention_heads, c.text_config.num_key_value_heads),
        vision_heads=lambda c: (c.vision_config.num_heads,) * 2,
    )
)
