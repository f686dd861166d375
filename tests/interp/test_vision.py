"""interp.vision: vision-side activations laid out on each image's patch grid, in raster order."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from interp.vision import vision_maps

# (image height, width) each processor keeps as it is, and the patch size: grids 4 x 4 (LLaVA), 4 x 16 (Qwen, whose
# tiny processor resizes every image to 4096 pixels; a non-square grid, so a transposed layout would show)
SIZES = {"llava": (32, 32, 8), "qwen2_5_vl": (32, 128, 8)}


def _pair(arch, r, c):
    h, w, p = SIZES[arch]
    base = np.full((h, w, 3), 128, np.uint8)
    marked = base.copy()
    marked[r * p:(r + 1) * p, c * p:(c + 1) * p] = 250
    return Image.fromarray(base), Image.fromarray(marked)


@pytest.mark.parametrize("arch, r, c", [("llava", 2, 3), ("qwen2_5_vl", 2, 6), ("qwen2_5_vl", 3, 13)])
def test_a_changed_patch_shows_at_its_place_in_the_map(arch, r, c):
    """Two images that differ in one patch: at the tower's input only that patch's embedding differs, and the map
    puts it at (row, col).  On Qwen the cache rows are in window order, so reading them row by row does not."""
    from interp.tiny import tiny_vlm

    model = tiny_vlm(arch, seed=0, n_layers=1, vision_layers=2, patch_size=8)
    a, b = _pair(arch, r, c)
    inputs = model.encode(images=[a, b], prompts=["who", "who"])
    _, cache = model.run_with_cache(inputs, names=["vision.hook_embed", "vision.blocks.0.attn.hook_z"])
    ma, mb = vision_maps(model, inputs, "vision.hook_embed", cache)
    h, w, p = SIZES[arch]
    assert ma.shape == (h // p, w // p, model.hf_model.config.vision_config.hidden_size)
    changed = ((ma - mb).abs().amax(-1) > 1e-6).nonzero().tolist()
    assert changed == [[r, c]]
    z = vision_maps(model, inputs, "vision.blocks.0.attn.hook_z", cache)[0]
    assert z.shape[:2] == (h // p, w // p) and z.dim() == 4  # trailing [head, d_head] kept
    if arch == "qwen2_5_vl":
        n = (h // p) * (w // p)  # the cache's own row order read as raster puts the patch elsewhere
        rows = cache["vision.hook_embed"]
        naive = (rows[:n] - rows[n:]).abs().amax(-1).reshape(h // p, w // p)
        assert (naive > 1e-6).nonzero().tolist() != [[r, c]]


def test_qwen_merged_map_is_the_merger_of_each_2x2_block():
    """projector.hook_out (merged, put back in order by the tower) at (i, j) is the merger applied to the 2 x 2
    patches (2i..2i+1, 2j..2j+1) of the projector.hook_in map (window order undone): the two layouts agree."""
    from interp.tiny import tiny_vlm

    model = tiny_vlm("qwen2_5_vl", seed=0, n_layers=1, vision_layers=2, patch_size=8)
    a, b = _pair("qwen2_5_vl", 2, 5)
    inputs = model.encode(images=[[a, b]], prompts=["who"])  # two images in one row
    _, cache = model.run_with_cache(inputs, names=["projector.hook_in", "projector.hook_out"])
    merger = model.hf_model.model.visual.merger
    for pin, pout in zip(vision_maps(model, inputs, "projector.hook_in", cache),
                         vision_maps(model, inputs, "projector.hook_out", cache)):
        assert pout.shape[:2] == (2, 8)
        block = pin.reshape(2, 2, 8, 2, -1).permute(0, 2, 1, 3, 4).reshape(16 * 4, -1)  # (i, j, hi, wi)
        with torch.no_grad():
            expected = merger(block).reshape(2, 8, -1)
        torch.testing.assert_close(pout, expected, atol=1e-5, rtol=1e-5)


def test_bad_requests_are_named(tiny_llava):
    inputs = tiny_llava.encode(images=[Image.new("RGB", (32, 32))], prompts=["who"])
    _, cache = tiny_llava.run_with_cache(inputs, names=["vision.hook_embed", "blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="not a vision-side site"):
        vision_maps(tiny_llava, inputs, "blocks.0.hook_resid_pre", cache)
    with pytest.raises(ValueError, match="n_images=1"):
        vision_maps(tiny_llava, inputs, "vision.hook_embed", torch.zeros(2, 17, 64))
    text = tiny_llava.encode(prompts=["who"])
    with pytest.raises(ValueError, match="no images"):
        vision_maps(tiny_llava, text, "vision.hook_embed", cache)


def test_vision_maps_names_a_missing_block_as_a_bad_name_with_vision_suggestions(tiny_llava):
    from interp.names import HookNameError
    from interp.vision import vision_maps
    from tests.conftest import random_image

    inputs = tiny_llava.encode(images=[random_image(32, 1)], prompts=["who is this"])
    with pytest.raises(HookNameError, match="vision.blocks.1.hook_resid_post"):  # 2 blocks: block 3 does not exist
        vision_maps(tiny_llava, inputs, "vision.blocks.3.hook_resid_post", {})
