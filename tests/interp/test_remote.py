"""Traces survive nnsight's remote serialisation: ``remote="local"`` ships the block exactly as an NDIF run would."""
from __future__ import annotations

import torch


def test_hooked_forward_survives_remote_round_trip(tiny_llava):
    inputs = tiny_llava.encode(prompts=["who is he", "what is the name of the person"])
    vec = torch.linspace(-1, 1, tiny_llava.d_model)

    def steer(x, ctx):
        return x + vec * ctx.last_token_mask(x).unsqueeze(-1)

    local = tiny_llava.run_with_hooks(inputs, [("blocks.1.hook_resid_pre", steer)])
    remote = tiny_llava.run_with_hooks(inputs, [("blocks.1.hook_resid_pre", steer)], remote="local")
    # The remote path calls the model through nnsight.TransformersModel; measured differences are ~3e-7 (float noise)
    assert (local - remote).abs().max() <= 1e-5
    _, cache = tiny_llava.run_with_cache(inputs, names="blocks.*.hook_resid_post", remote="local")
    _, ref = tiny_llava.run_with_cache(inputs, names="blocks.*.hook_resid_post")
    for n in ref.names:
        assert (cache[n] - ref[n]).abs().max() <= 1e-5
