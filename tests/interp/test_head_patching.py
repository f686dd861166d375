"""interp.head_patching: one head at a time, batched like one pass per head, equal to a hand-written patch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.head_patching import HeadPatchResult, patch_heads
from interp.patching import answer_logprob
from tests.conftest import random_image

PROMPTS = ["what is the name of the person in this image ?", "who is he"]


@pytest.fixture(scope="module")
def pair(tiny_llava):
    clean = tiny_llava.encode(images=[random_image(32, 1), random_image(32, 2)], prompts=PROMPTS)
    corrupt = tiny_llava.encode(images=[random_image(32, 3), random_image(32, 4)], prompts=PROMPTS)
    logits = tiny_llava.run_with_hooks(clean, [])
    answer = logits[torch.arange(2), clean.last_index].argmax(-1)
    return clean, corrupt, answer_logprob(answer)


def test_each_cell_is_the_one_head_patch(tiny_llava, pair):
    clean, corrupt, metric = pair
    res = patch_heads(tiny_llava, clean, corrupt, metric, max_rows=None)
    n_heads = tiny_llava.head_counts["lm"][0]
    assert res.patched.shape == (tiny_llava.n_layers, n_heads) and res.layers == [0, 1, 2]
    # by hand: layer 1, head 2, every position, from the clean cache
    _, cache = tiny_llava.run_with_cache(clean, names=["blocks.1.attn.hook_z"])
    src = cache["blocks.1.attn.hook_z"]

    def patch(z, ctx):
        z = z.clone()
        z[:, :, 2] = src[:, :, 2]
        return z

    by_hand = metric(tiny_llava.run_with_hooks(corrupt, [("blocks.1.attn.hook_z", patch)]), corrupt).mean().item()
    assert res.patched[1, 2] == pytest.approx(by_hand, abs=1e-5)
    assert res.clean == pytest.approx(metric(tiny_llava.run_with_hooks(clean, []), clean).mean().item(), abs=1e-5)
    # batched several cells per pass == one cell per pass (max_rows = batch)
    one = patch_heads(tiny_llava, clean, corrupt, metric, max_rows=2)
    assert np.allclose(res.patched, one.patched, atol=1e-5)
    assert np.nanmax(np.abs(res.effects)) > 0.05  # not vacuous: some head carries the images' difference
    assert res.top(1)[0][2] == pytest.approx(res.effects[np.unravel_index(np.nanargmax(np.abs(res.effects)),
                                                                            res.effects.shape)])


def test_positions_and_layers(tiny_llava, pair):
    clean, corrupt, metric = pair
    last = patch_heads(tiny_llava, clean, corrupt, metric, layers=[2], positions="last")
    assert last.layers == [2] and last.positions == "last" and last.patched.shape == (1, last.n_heads)
    # the last position of the last layer: its heads' outputs go straight to the logits through o_proj and the
    # MLP, so each head patched there moves the metric (nothing else in the pass changes)
    assert (np.abs(last.patched - last.corrupted) > 1e-6).all()
    # layer 0 at the text positions before the image: the prompts are the same, so nothing to patch there
    first = tiny_llava.encode(images=[random_image(32, 1)], prompts=[PROMPTS[0]])
    other = tiny_llava.encode(images=[random_image(32, 3)], prompts=[PROMPTS[0]])
    img = first.image_mask[0].nonzero()[0, 0].item()

    def before_image(inputs):
        m = torch.zeros_like(inputs.image_mask)
        m[:, :img] = True
        return m

    logits = tiny_llava.run_with_hooks(first, [])
    m = answer_logprob(logits[0, first.last_index].argmax(-1))
    none = patch_heads(tiny_llava, first, other, m, layers=[0], positions=before_image)
    assert np.allclose(none.patched, none.corrupted, atol=1e-6)


def test_round_trip_grid_and_errors(tiny_llava, pair, tmp_path):
    clean, corrupt, metric = pair
    res = patch_heads(tiny_llava, clean, corrupt, metric, layers=[0, 2])
    res.save(tmp_path / "heads.json")
    back = HeadPatchResult.load(tmp_path / "heads.json")
    assert back.layers == [0, 2] and np.allclose(back.patched, res.patched) and back.rows == res.rows
    grid = res.grid()
    assert grid.rows == [0, 2] and grid.cols == list(range(res.n_heads)) and grid.values.shape == (2, res.n_heads)
    with pytest.raises(ValueError, match="layers"):
        patch_heads(tiny_llava, clean, corrupt, metric, layers=[3])
    with pytest.raises(ValueError, match="layers"):
        patch_heads(tiny_llava, clean, corrupt, metric, layers=[])
    with pytest.raises(ValueError, match=r"\(2, 32\), corrupted \(1, 6\).*line up position by position"):
        patch_heads(tiny_llava, clean, tiny_llava.encode(images=[None], prompts=["who"]), metric)
    shorter = tiny_llava.encode(images=[None, None], prompts=["who is this", "who is this person"])
    longer = tiny_llava.encode(images=[None, None], prompts=["who is this person", "who is this person"])
    with pytest.raises(ValueError, match=r"differ in padding in row\(s\) \[0\]"):
        patch_heads(tiny_llava, shorter, longer, metric)
    with pytest.raises(ValueError, match="positions"):
        patch_heads(tiny_llava, clean, corrupt, metric, positions="middle")
    with pytest.raises(ValueError, match="HeadPatchResult"):
        HeadPatchResult.from_dict({"format": "interp.PatchResult"})
    for bad in (0, -4, 2.5):  # 0 ran silently as one head per pass (an audit)
        with pytest.raises(ValueError, match="max_rows must be None .* or an integer >= 1"):
            patch_heads(tiny_llava, clean, corrupt, metric, max_rows=bad)


@pytest.mark.parametrize("component, n", [("q", 4), ("k", 2), ("v", 2)])
def test_query_key_value_heads_are_the_hand_patch(tiny_qwen, component, n):
    """Qwen2.5-VL's 4 query heads share 2 key/value heads: the k and v grids have 2 columns, and each cell is
    the clean run's slice of that projection put in by hand."""
    clean = tiny_qwen.encode(images=[random_image(64, 1), random_image(64, 2)], prompts=PROMPTS)
    corrupt = tiny_qwen.encode(images=[random_image(64, 3), random_image(64, 4)], prompts=PROMPTS)
    metric = answer_logprob([5, 6])
    res = patch_heads(tiny_qwen, clean, corrupt, metric, component=component)
    assert res.patched.shape == (tiny_qwen.n_layers, n) and res.meta == {"component": component}
    site = f"blocks.2.attn.hook_{component}"
    _, cache = tiny_qwen.run_with_cache(clean, names=[site])

    def patch(x, ctx):
        x = x.clone()
        x[:, :, n - 1] = cache[site][:, :, n - 1]
        return x

    by_hand = metric(tiny_qwen.run_with_hooks(corrupt, [(site, patch)]), corrupt).mean().item()
    assert res.patched[2, n - 1] == pytest.approx(by_hand, abs=1e-5)
    assert np.nanmax(np.abs(res.effects)) > 1e-3  # some query, key or value carries the images' difference


def test_bad_component_is_named(tiny_llava, pair):
    clean, corrupt, metric = pair
    with pytest.raises(ValueError, match="component must be one of"):
        patch_heads(tiny_llava, clean, corrupt, metric, component="pattern")


def test_vision_heads_are_the_hand_patch(tiny_model):
    """The vision tower's heads, patched one at a time over every patch of every image, equal the clean run's head
    put in by hand; LLaVA's projector reads the second-to-last vision block, so the last block's heads do
    nothing."""
    size = 32 if tiny_model.arch == "llava" else 64
    clean = tiny_model.encode(images=[random_image(size, 1), random_image(size, 2)], prompts=PROMPTS)
    corrupt = tiny_model.encode(images=[random_image(size, 3), random_image(size, 4)], prompts=PROMPTS)
    metric = answer_logprob([5, 6])
    res = patch_heads(tiny_model, clean, corrupt, metric, tower="vision", positions="image")
    n_v = tiny_model.head_counts["vision"][0]
    assert res.patched.shape == (tiny_model.n_vision_layers, n_v) and res.meta == {"component": "z", "tower": "vision"}
    site = "vision.blocks.0.attn.hook_z"
    _, cache = tiny_model.run_with_cache(clean, names=[site])

    def patch(z, ctx):
        z = z.clone()
        z[..., 1, :] = cache[site][..., 1, :]
        return z

    by_hand = metric(tiny_model.run_with_hooks(corrupt, [(site, patch)]), corrupt).mean().item()
    assert res.patched[0, 1] == pytest.approx(by_hand, abs=1e-5)
    assert res.patched[0, 1] != pytest.approx(res.corrupted, abs=1e-4)  # the head matters
    if tiny_model.arch == "llava":
        assert np.allclose(res.patched[-1], res.corrupted, atol=1e-6)  # never read by the projector
    # what a vision head reads: its value, by hand (Qwen2.5-VL's is a third of the fused qkv projection)
    values = patch_heads(tiny_model, clean, corrupt, metric, tower="vision", component="v", layers=[0])
    assert values.patched.shape == (1, n_v) and values.meta["component"] == "v"
    v_site = "vision.blocks.0.attn.hook_v"
    _, v_cache = tiny_model.run_with_cache(clean, names=[v_site])

    def patch_v(v, ctx):
        v = v.clone()
        v[..., 1, :] = v_cache[v_site][..., 1, :]
        return v

    by_hand = metric(tiny_model.run_with_hooks(corrupt, [(v_site, patch_v)]), corrupt).mean().item()
    assert values.patched[0, 1] == pytest.approx(by_hand, abs=1e-5)
    assert values.patched[0, 1] != pytest.approx(values.corrupted, abs=1e-4)


def test_bad_vision_head_requests_are_named(tiny_qwen, tiny_llava, pair):
    clean, corrupt, metric = pair
    with pytest.raises(ValueError, match="distinct vision layers"):
        patch_heads(tiny_llava, clean, corrupt, metric, tower="vision", layers=[5])
    with pytest.raises(ValueError, match="no prompt positions"):
        patch_heads(tiny_llava, clean, corrupt, metric, tower="vision", positions="last")
    with pytest.raises(ValueError, match="tower must be"):
        patch_heads(tiny_llava, clean, corrupt, metric, tower="audio")
    text = tiny_llava.encode(images=[None], prompts=["who is he"])
    with pytest.raises(ValueError, match="no images"):
        patch_heads(tiny_llava, text, text, metric, tower="vision")
    with pytest.raises(ValueError, match="component must be"):
        patch_heads(tiny_qwen, clean, corrupt, metric, tower="vision", component="o")
