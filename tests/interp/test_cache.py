"""ActivationCache: modality slicing, stacking, persistence."""
from __future__ import annotations

import pytest
import torch

from interp import ActivationCache
from interp.names import HookNameError
from tests.conftest import random_image


@pytest.fixture
def mixed_cache(tiny_llava):
    inputs = tiny_llava.encode(images=[random_image(32, 0), None], prompts=["what is the name of the person", "who is he"])
    _, cache = tiny_llava.run_with_cache(inputs, names=["blocks.*.hook_resid_pre", "vision.blocks.0.hook_resid_post"])
    return inputs, cache


def test_only_requested_names_are_stored(mixed_cache, tiny_llava):
    _, cache = mixed_cache
    expected = ["vision.blocks.0.hook_resid_post"] + [f"blocks.{l}.hook_resid_pre" for l in range(tiny_llava.n_layers)]
    assert cache.names == expected  # execution order, nothing else
    assert len(cache) == tiny_llava.n_layers + 1
    assert "blocks.0.hook_resid_post" not in cache
    with pytest.raises(HookNameError, match=r"'blocks.0.hook_resid_post' is not in this cache, which holds 4 names "
                                           r"\(closest: blocks.0.hook_resid_pre.*run_with_cache\(names=...\)"):
        cache["blocks.0.hook_resid_post"]


def test_image_text_last_slices(mixed_cache):
    inputs, cache = mixed_cache
    name = "blocks.1.hook_resid_pre"
    full = cache[name]
    img = cache.image(name)
    assert [r.shape[0] for r in img] == [16, 0]
    assert torch.equal(img[0], full[0][inputs.image_mask[0]])
    txt = cache.text(name)
    assert [r.shape[0] for r in txt] == inputs.text_mask.sum(1).tolist()
    padded, valid = cache.text(name, padded=True)
    assert padded.shape == (2, int(inputs.text_mask.sum(1).max()), full.shape[-1])
    assert valid.sum().item() == inputs.text_mask.sum().item()
    # rows left-aligned with their valid mask, zeros elsewhere (from a mutation audit: right-aligned rows with a
    # left-aligned mask went unnoticed)
    assert len(set(inputs.text_mask.sum(1).tolist())) == 2  # rows of different lengths
    for b in range(2):
        assert valid[b].tolist() == [i < txt[b].shape[0] for i in range(padded.shape[1])]
        assert torch.equal(padded[b][valid[b]], txt[b])
    assert padded[~valid].abs().max() == 0
    padded_img, valid_img = cache.image(name, padded=True)
    assert padded_img.shape == (2, 16, full.shape[-1]) and valid_img.sum(1).tolist() == [16, 0]
    assert torch.equal(padded_img[0], img[0]) and padded_img[1].abs().max() == 0
    last = cache.last(name)
    assert last.shape == (2, full.shape[-1])
    assert torch.equal(last[1], full[1, inputs.last_index[1]])
    with pytest.raises(ValueError, match="vision-side"):
        cache.image("vision.blocks.0.hook_resid_post")


def test_stack_orders_by_layer(mixed_cache, tiny_llava):
    _, cache = mixed_cache
    stacked = cache.stack("blocks.*.hook_resid_pre")
    assert stacked.shape[0] == tiny_llava.n_layers
    for l in range(tiny_llava.n_layers):
        assert torch.equal(stacked[l], cache[f"blocks.{l}.hook_resid_pre"])
    with pytest.raises(HookNameError):
        cache.stack("blocks.*.hook_mlp_out")


def test_stack_orders_layers_numerically_past_ten():
    """From a mutation audit: a lexicographic sort (0, 1, 10, 11, 2, ...) went unnoticed on 3-layer models."""
    order = [5, 11, 0, 10, 2, 1, 9, 3, 8, 4, 7, 6]  # neither numeric nor lexicographic
    mask = torch.zeros(1, 2, dtype=torch.bool)
    cache = ActivationCache({f"blocks.{l}.hook_resid_pre": torch.full((1, 2, 4), float(l)) for l in order},
                            mask, ~mask, torch.tensor([1]))
    stacked = cache.stack("blocks.*.hook_resid_pre")
    assert stacked.shape == (12, 1, 2, 4)
    assert stacked[:, 0, 0, 0].tolist() == list(range(12))
    in_order = ActivationCache({f"blocks.{l}.hook_resid_pre": torch.full((1, 2, 4), float(l)) for l in range(12)},
                               mask, ~mask, torch.tensor([1]))
    assert in_order.stack("blocks.*.hook_resid_pre")[:, 0, 0, 0].tolist() == list(range(12))


def test_stack_refuses_a_glob_over_several_kinds_of_site(tiny_llava):
    inputs = tiny_llava.encode(images=[random_image(32, 0)], prompts=["who is he"])
    _, cache = tiny_llava.run_with_cache(inputs, names=["blocks.*.hook_resid_pre", "blocks.*.hook_attn_out",
                                                        "vision.blocks.*.hook_resid_pre"])
    with pytest.raises(ValueError, match=r"'blocks.\*' matches 2 kinds of site \(blocks.\*.hook_attn_out, "
                                         r"blocks.\*.hook_resid_pre\)"):
        cache.stack("blocks.*")
    with pytest.raises(ValueError, match="3 kinds of site"):
        cache.stack("*blocks.*")
    assert cache.stack("vision.blocks.*").shape[0] == tiny_llava.n_vision_layers
    assert cache.stack("blocks.*.hook_attn_out").shape[0] == tiny_llava.n_layers


def test_names_that_share_a_tensor_save_and_load(tiny_model):
    """resid_post of block l is resid_pre of block l + 1 and hook_embed is block 0's resid_pre: one tensor under
    two names, which safetensors refuses as is; a cache of every name must still save."""
    inputs = tiny_model.encode(images=[None], prompts=["who is this person"])
    _, cache = tiny_model.run_with_cache(inputs)  # every name the text-only batch runs
    assert not any(n.startswith(("vision.", "projector.")) for n in cache.names)
    assert cache["blocks.0.hook_resid_post"].data_ptr() == cache["blocks.1.hook_resid_pre"].data_ptr()
    import tempfile, pathlib

    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "all.safetensors"
        cache.save(path)
        back = ActivationCache.load(path)
    assert back.names == cache.names
    for n in cache.names:
        assert torch.equal(back[n], cache[n]), n


def test_save_load_round_trip_and_to(mixed_cache, tmp_path):
    _, cache = mixed_cache
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    loaded = ActivationCache.load(path)
    assert loaded.names == cache.names  # the saved (execution) order, not alphabetical
    for n in cache.names:
        assert torch.equal(loaded[n], cache[n])
    assert torch.equal(loaded.last_index, cache.last_index)
    assert cache.image_grid_thw is None and loaded.image_grid_thw is None  # LLaVA has no patch grids to keep
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(ValueError, match="junk.safetensors is not a readable ActivationCache file"):
        ActivationCache.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an ActivationCache \\(no __image_mask__"):
        ActivationCache.load(tmp_path / "other.safetensors")
    moved = cache.to("cpu")
    assert torch.equal(moved.image_mask, cache.image_mask)


def test_attention_to_a_modality(tiny_llava):
    inputs = tiny_llava.encode(images=[random_image(32, 0), None], prompts=["what is the name of the person", "who"])
    _, cache = tiny_llava.run_with_cache(inputs, names=["blocks.1.attn.hook_pattern", "blocks.1.hook_resid_pre"])
    name = "blocks.1.attn.hook_pattern"
    p = cache[name]
    img, txt = cache.attention_to(name, "image"), cache.attention_to(name, "text")
    heads = tiny_llava.head_counts["lm"][0]
    assert img.shape == txt.shape == (2, heads)
    torch.testing.assert_close(img + txt, torch.ones(2, heads))  # a real query's attention is on image or text
    assert img[1].abs().max().item() == 0.0 and img[0].min().item() > 0.0  # the text-only row has no image
    last = inputs.last_index[0].item()
    by_hand = p[0, :, last][:, inputs.image_mask[0]].sum(-1)
    torch.testing.assert_close(img[0], by_hand)
    every = cache.attention_to(name, "image", query="all")
    assert every.shape == (2, heads, inputs.input_ids.shape[1])
    torch.testing.assert_close(every[0, :, last], img[0])
    pad = ~(inputs.image_mask | inputs.text_mask)
    assert pad.any() and every[pad[:, None, :].expand_as(every)].abs().max().item() == 0.0
    with pytest.raises(ValueError, match="attention pattern"):
        cache.attention_to("blocks.1.hook_resid_pre")
    with pytest.raises(ValueError, match="keys"):
        cache.attention_to(name, "audio")
    with pytest.raises(ValueError, match="query"):
        cache.attention_to(name, query="first")
