"""LLaVA-1.5 (``LlavaForConditionalGeneration``): Llama decoder, CLIP vision tower, two-layer MLP projector."""
from __future__ import annotations

import torch

from .base import LLAMA_BLOCK_INNER, ArchAdapter, BlockSites, Site, register, tuple_get, tuple_set, weights_get


def _chat(prompt: str, n_images: int) -> str:
    # The LLaVA-1.5 conversation format: the model answers after "ASSISTANT:".
    return "USER: " + "<image>\n" * n_images + prompt + " ASSISTANT:"


def _preprocess(image_processor, images) -> dict[str, torch.Tensor]:
    return {"pixel_values": image_processor(images, return_tensors="pt")["pixel_values"]}


def _tokens_per_image(config, processed: dict[str, torch.Tensor]) -> list[int]:
    # One token per patch; the "default" strategy drops CLS, "full" keeps it.
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        n += 1
    return [n] * processed["pixel_values"].shape[0]


def _feature_blocks(config, n_blocks: int) -> tuple[int, ...]:
    # The projector reads ``hidden_states[i]`` (a list of them on some checkpoints): index 0 is the embeddings,
    # index i the output of block i - 1; LLaVA-1.5 reads -2, the second-to-last block's output.
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    return tuple((i if i >= 0 else n_blocks + 1 + i) - 1 for i in layers)


LLAVA = register(
    ArchAdapter(
        name="llava",
        hf_class="LlavaForConditionalGeneration",
        lm_layers="model.language_model.layers",
        final_norm="model.language_model.norm",
        lm_head="lm_head",
        vision_layers="model.vision_tower.encoder.layers",
        lm_block=BlockSites(
            attn=Site("self_attn", "output", tuple_get(0), tuple_set(0)),
            resid_mid=Site("post_attention_layernorm", "input"),
            mlp=Site("mlp", "output"),
            inner=LLAMA_BLOCK_INNER,
        ),
        vision_block=BlockSites(
            attn=Site("self_attn", "output", tuple_get(0), tuple_set(0)),
            resid_mid=Site("layer_norm2", "input"),
            mlp=Site("mlp", "output"),
            inner=(
                ("ln1.hook_normalized", Site("layer_norm1", "output")),
                ("attn.hook_q", Site("self_attn.q_proj", "output", heads="q")),
                ("attn.hook_k", Site("self_attn.k_proj", "output", heads="kv")),
                ("attn.hook_v", Site("self_attn.v_proj", "output", heads="kv")),
                ("attn.hook_z", Site("self_attn.out_proj", "input", heads="q")),
                ("attn.hook_pattern", Site("self_attn", "output", weights_get, read_only=True)),
                ("ln2.hook_normalized", Site("layer_norm2", "output")),
                ("mlp.hook_pre", Site("mlp.fc1", "output")),
                ("mlp.hook_post", Site("mlp.fc2", "input")),
            ),
        ),
        projector_in=Site("model.multi_modal_projector", "input"),
        projector_out=Site("model.multi_modal_projector", "output"),
        image_token_id=lambda config: config.image_token_id,
        feature_blocks=_feature_blocks,
        chat_template=_chat,
        image_placeholder="<image>",
        preprocess_images=_preprocess,
        tokens_per_image=_tokens_per_image,
        lm_heads=lambda c: (c.text_config.num_attention_heads, c.text_config.num_key_value_heads),
        vision_heads=lambda c: (c.vision_config.num_attention_heads,) * 2,
    )
)
