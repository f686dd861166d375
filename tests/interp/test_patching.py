"""interp.patching: clean -> corrupted patching, patching from a hooked run, metrics, results."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from interp import ActivationCache
from interp.patching import PatchResult, answer_logprob, logit_diff, patch_from_run, patch_hooks, patch_sites
from interp.steering import add_vector
from tests.conftest import random_image

PROMPTS = ["what is the name of the person in this image ?", "who is he"]


def _pair(model, size=32):
    clean = model.encode(images=[random_image(size, 1), random_image(size, 2)], prompts=PROMPTS)
    corrupt = model.encode(images=[random_image(size, 3), random_image(size, 4)], prompts=PROMPTS)
    return clean, corrupt


@pytest.fixture(scope="module")
def setup(tiny_llava):
    clean, corrupt = _pair(tiny_llava)
    clean_logits = tiny_llava.run_with_hooks(clean, [])
    corrupt_logits = tiny_llava.run_with_hooks(corrupt, [])
    # answer: the clean run's top next token; the metric is its log-prob, which the images move
    rows = torch.arange(2)
    answer = clean_logits[rows, clean.last_index].argmax(-1)
    metric = answer_logprob(answer)
    gap = (metric(clean_logits, clean) - metric(corrupt_logits, corrupt)).mean().item()
    assert abs(gap) > 1e-3  # a usable denominator for the normalised effect
    return clean, corrupt, clean_logits, metric


def _to_clean(clean_logits):
    """A metric whose value is the largest |logit - clean logit| of a row: 0 exactly when patching restores clean."""
    return lambda logits, inputs: (logits.float() - clean_logits.float()).abs().amax(dim=(1, 2))


def test_full_patch_of_a_whole_stream_restores_clean(tiny_llava, setup):
    clean, corrupt, clean_logits, metric = setup
    last = f"blocks.{tiny_llava.n_layers - 1}.hook_resid_post"
    names = ["hook_embed", "blocks.0.hook_resid_pre", last]
    res = patch_sites(tiny_llava, clean, corrupt, names, metric, positions="all")
    for n in names:
        assert res.effects[n] == pytest.approx(1.0, abs=1e-5), n
    dist = patch_sites(tiny_llava, clean, corrupt, names, _to_clean(clean_logits))
    assert dist.clean == 0.0 and dist.corrupted > 0.1
    for n in names:
        assert dist.patched[n] <= 1e-5, n  # the logits themselves are the clean logits
    assert res.names == names and res.positions == "all"
    assert len(res.rows["clean"]) == len(res.rows[last]) == 2


def test_patching_the_corrupted_runs_own_activation_has_no_effect(tiny_llava, setup):
    clean, corrupt, clean_logits, metric = setup
    names = ["hook_embed", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post"]
    _, own = tiny_llava.run_with_cache(corrupt, names=names)
    res = patch_from_run(tiny_llava, corrupt, own, names, metric, source_logits=clean_logits)
    for n in names:
        assert res.effects[n] == pytest.approx(0.0, abs=1e-5), n


def test_image_positions_of_the_projector_equal_the_clean_image(tiny_llava, setup):
    clean, corrupt, clean_logits, metric = setup
    res = patch_sites(tiny_llava, clean, corrupt, ["projector.hook_out", "hook_embed", "vision.hook_embed"], metric,
                      positions="image")
    # projector output and vision input are [n_images, tokens, d]: patched whole; the text embeddings already agree
    for n in res.names:
        assert res.effects[n] == pytest.approx(1.0, abs=1e-5), n
    text = patch_sites(tiny_llava, clean, corrupt, ["hook_embed"], metric, positions="text")
    assert text.effects["hook_embed"] == pytest.approx(0.0, abs=1e-5)  # the prompts are identical


def test_batched_sites_equal_one_site_per_pass(tiny_llava, setup):
    clean, corrupt, _, metric = setup
    names = [n for n in tiny_llava.hook_names() if n.startswith("blocks.") and "hook_pattern" not in n]
    assert "blocks.0.attn.hook_z" in names and "blocks.1.mlp.hook_post" in names
    many = patch_sites(tiny_llava, clean, corrupt, names, metric, positions="last", max_rows=None)
    one = patch_sites(tiny_llava, clean, corrupt, names, metric, positions="last", max_rows=2)
    assert many.names == one.names == names
    for n in names:
        assert many.patched[n] == pytest.approx(one.patched[n], abs=1e-5), n
    assert max(abs(e) for e in many.effects.values()) > 0.05  # not a vacuous comparison
    vis = ["vision.blocks.0.hook_attn_out", "vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post",
           "projector.hook_in"]
    a = patch_sites(tiny_llava, clean, corrupt, vis, metric, max_rows=None)
    b = patch_sites(tiny_llava, clean, corrupt, vis, metric, max_rows=1)
    for n in vis:
        assert a.patched[n] == pytest.approx(b.patched[n], abs=1e-5), n
    # LLaVA reads vision_feature_layer=-2: the output of block 0 of 2 restores clean, block 1 is never read
    assert a.effects["vision.blocks.0.hook_resid_post"] == pytest.approx(1.0, abs=1e-5)
    assert a.effects["vision.blocks.1.hook_resid_post"] == pytest.approx(0.0, abs=1e-5)


def test_qwen_flat_vision_sites_batch_like_single(tiny_qwen):
    clean, corrupt = _pair(tiny_qwen, size=64)
    logits = tiny_qwen.run_with_hooks(clean, [])
    metric = answer_logprob(logits[torch.arange(2), clean.last_index].argmax(-1))
    names = ["vision.blocks.0.hook_mlp_out", "vision.blocks.1.hook_resid_post", "projector.hook_out", "blocks.1.hook_attn_out"]
    a = patch_sites(tiny_qwen, clean, corrupt, names, metric, positions="image", max_rows=None)
    b = patch_sites(tiny_qwen, clean, corrupt, names, metric, positions="image", max_rows=1)
    for n in names:
        assert a.patched[n] == pytest.approx(b.patched[n], abs=1e-5), n
    assert a.effects["projector.hook_out"] == pytest.approx(1.0, abs=1e-5)
    assert a.effects["vision.blocks.1.hook_resid_post"] == pytest.approx(1.0, abs=1e-5)


def test_mismatched_runs_and_bad_positions_are_clear_errors(tiny_llava, setup):
    clean, corrupt, clean_logits, metric = setup
    other = tiny_llava.encode(images=[random_image(32, 5), random_image(32, 6)], prompts=["who", "who is he"])
    with pytest.raises(ValueError, match="same token length"):
        patch_sites(tiny_llava, clean, other, ["blocks.0.hook_resid_pre"], metric)
    _, cache = tiny_llava.run_with_cache(other, names=["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="line up position by position"):
        patch_from_run(tiny_llava, corrupt, cache, ["blocks.0.hook_resid_pre"], metric)
    with pytest.raises(ValueError, match="lacks"):
        patch_from_run(tiny_llava, other, cache, ["blocks.1.hook_resid_pre"], metric)
    with pytest.raises(ValueError, match="vision-side"):
        patch_sites(tiny_llava, clean, corrupt, ["projector.hook_out"], metric, positions="last")
    with pytest.raises(ValueError, match="positions must be"):
        patch_sites(tiny_llava, clean, corrupt, ["hook_embed"], metric, positions="middle")
    # the prompt masks agree but a vision-side activation does not (here: 3 images' worth for 2 images)
    _, good = tiny_llava.run_with_cache(clean, names=["vision.hook_embed"])
    bad = ActivationCache({"vision.hook_embed": good["vision.hook_embed"][[0, 1, 1]]}, good.image_mask,
                          good.text_mask, good.last_index)
    with pytest.raises(ValueError, match="cannot patch 'vision.hook_embed'.*must line up"):
        patch_from_run(tiny_llava, corrupt, bad, ["vision.hook_embed"], metric)


def test_callable_positions_equal_named_positions(tiny_llava, setup):
    clean, corrupt, _, metric = setup
    names = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    named = patch_sites(tiny_llava, clean, corrupt, names, metric, positions="image")
    fn = patch_sites(tiny_llava, clean, corrupt, names, metric, positions=lambda inp: inp.image_mask)
    for n in names:
        assert named.patched[n] == pytest.approx(fn.patched[n], abs=1e-6)


def test_patch_hooks_localises_a_steering_hook(tiny_llava):
    inputs = tiny_llava.encode(images=[random_image(32, 7), None], prompts=["who is he", "who is this person"])
    v = torch.randn(tiny_llava.d_model, generator=torch.Generator().manual_seed(0)) * 4
    steer = [("blocks.1.hook_resid_pre", add_vector(v, positions="last"))]
    base = tiny_llava.run_with_hooks(inputs, [])
    metric = answer_logprob(base[torch.arange(2), inputs.last_index].argmax(-1))
    res = patch_hooks(tiny_llava, inputs, steer, "blocks.*.hook_resid_pre", metric, positions="last")
    assert res.clean < res.corrupted - 1e-3  # steering moved the metric
    assert res.effects["blocks.0.hook_resid_pre"] == pytest.approx(0.0, abs=1e-5)  # upstream of the hook
    assert res.effects["blocks.1.hook_resid_pre"] == pytest.approx(1.0, abs=1e-5)  # the steered site itself


def test_metric_helpers(tiny_llava, setup):
    clean, _, clean_logits, _ = setup
    last = clean_logits[torch.arange(2), clean.last_index].float()
    ld = logit_diff([3, 4], 5)(clean_logits, clean)
    assert torch.allclose(ld, torch.stack([last[0, 3] - last[0, 5], last[1, 4] - last[1, 5]]))
    lp = answer_logprob(7)(clean_logits, clean)
    assert torch.allclose(lp, torch.log_softmax(last, -1)[:, 7])
    with pytest.raises(ValueError, match="one per row"):
        logit_diff([1, 2, 3], 0)(clean_logits, clean)


def test_result_grid_and_round_trip(tmp_path):
    names = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out",
             "vision.blocks.0.hook_resid_post"]
    res = PatchResult(names=names, patched={n: float(i) for i, n in enumerate(names)}, clean=4.0, corrupted=0.0,
                      positions="last", rows={"clean": [4.0], "corrupted": [0.0]}, meta={"note": "x"})
    assert res.effects == {n: i / 4 for i, n in enumerate(names)}
    g = res.grid("blocks")
    assert g.rows == ["hook_resid_pre", "hook_mlp_out"] and g.cols == [0, 1]
    np.testing.assert_allclose(g.values, [[0.25, 0.5], [np.nan, 0.75]])
    gv = res.grid("vision.blocks", value="patched")
    assert gv.rows == ["hook_resid_post"] and gv.values.tolist() == [[4.0]]
    res.save(tmp_path / "r.json")
    back = PatchResult.load(tmp_path / "r.json")
    assert back == res and back.effects == res.effects
    flat = PatchResult(names=["hook_embed"], patched={"hook_embed": 1.0}, clean=2.0, corrupted=2.0)
    assert math.isnan(flat.effects["hook_embed"])
    flat.save(tmp_path / "f.json")
    assert math.isnan(PatchResult.load(tmp_path / "f.json").effects["hook_embed"])
    # patch_from_run without source logits has no clean value: NaN, written as null, read back as NaN
    no_clean = PatchResult(names=["hook_embed"], patched={"hook_embed": 1.0}, clean=float("nan"), corrupted=0.5,
                           rows={"corrupted": [0.5], "hook_embed": [1.0]})
    no_clean.save(tmp_path / "n.json")
    assert '"clean": null' in (tmp_path / "n.json").read_text()
    back = PatchResult.load(tmp_path / "n.json")
    assert math.isnan(back.clean) and back.corrupted == 0.5 and back.rows == no_clean.rows
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        PatchResult.load(tmp_path / "bad.json")


def test_head_outputs_patch_like_the_attention_output_they_sum_to(tiny_llava, setup):
    """``attn_out = o_proj(z)``: patching all of ``attn.hook_z`` has exactly the effect of patching ``hook_attn_out``;
    the heads' own rows (``blocks.1.attn.hook_z`` at one head) are patched through a position mask like any site."""
    clean, corrupt, _, metric = setup
    res = patch_sites(tiny_llava, clean, corrupt, "blocks.1.attn.*", metric, positions="last")
    assert res.names == ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v",
                         "blocks.1.attn.hook_z"]  # the read-only pattern is left out of the glob
    both = patch_sites(tiny_llava, clean, corrupt, ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"], metric,
                       positions="all")
    assert both.effects["blocks.1.attn.hook_z"] == pytest.approx(both.effects["blocks.1.hook_attn_out"], abs=1e-4)
    assert abs(both.effects["blocks.1.hook_attn_out"]) > 1e-3  # not vacuous
    grid = res.grid()
    assert grid.rows == ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z"]
    with pytest.raises(ValueError, match="cannot be patched"):
        patch_sites(tiny_llava, clean, corrupt, ["blocks.1.attn.hook_pattern"], metric)


def test_rows_padded_differently_are_refused_not_patched_out_of_line(tiny_llava):
    """Same [batch, pos] but row 0 of the clean batch is one token shorter (left-padded by one): the tokens do not
    line up, and patching hook_embed at every position would mix a pad embedding into a real position."""
    clean = tiny_llava.encode(images=[None, None], prompts=["who is this", "who is this person"])
    corrupt = tiny_llava.encode(images=[None, None], prompts=["who is this person", "who is this person"])
    assert clean.input_ids.shape == corrupt.input_ids.shape
    metric = logit_diff(5, 9)
    with pytest.raises(ValueError, match=r"differ in padding in row\(s\) \[0\]"):
        patch_sites(tiny_llava, clean, corrupt, ["hook_embed"], metric)
    _, cache = tiny_llava.run_with_cache(clean, names=["hook_embed"])
    with pytest.raises(ValueError, match=r"source and target runs differ in padding in row\(s\) \[0\]"):
        patch_from_run(tiny_llava, corrupt, cache, ["hook_embed"], metric)
    # same padding, an image in one row only: the image positions differ
    with_img = tiny_llava.encode(images=[random_image(32, 1), None], prompts=["who", "who is this person"])
    text_only = tiny_llava.encode(images=[None, None], prompts=["who", "who is this person"])
    if with_img.input_ids.shape == text_only.input_ids.shape:  # pragma: no cover - depends on the image's token count
        with pytest.raises(ValueError, match="image positions"):
            patch_sites(tiny_llava, with_img, text_only, ["hook_embed"], metric)
    # aligned rows still patch exactly: the whole embedding stream restores the clean run
    clean2 = tiny_llava.encode(images=[None, None], prompts=["who is this person", "who is this"])
    corrupt2 = tiny_llava.encode(images=[None, None], prompts=["who was this person", "who is that"])
    res = patch_sites(tiny_llava, clean2, corrupt2, ["hook_embed"], metric)
    assert res.patched["hook_embed"] == pytest.approx(res.rows["hook_embed"][0] * 0.5 + res.rows["hook_embed"][1] * 0.5)
    clean_logits = tiny_llava.run_with_hooks(clean2, [])
    assert res.patched["hook_embed"] == pytest.approx(float(metric(clean_logits, clean2).mean()), abs=1e-5)


def test_qwen_images_with_other_patch_grids_are_refused(tiny_qwen):
    """Two Qwen2.5-VL images with the same token count in different grids (8 x 8 vs 4 x 16 patches) line up
    token by token, but a patch would move vision activations between different places (measured before the
    check: effect 0.92 at vision.hook_embed); same-size images still patch."""
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 255, (16, 64, 3), dtype=np.uint8))
    clean = tiny_qwen.encode(images=[square], prompts=["who is this"])
    corrupt = tiny_qwen.encode(images=[wide], prompts=["who is this"])
    g_clean, g_corrupt = clean.image_kwargs["image_grid_thw"], corrupt.image_kwargs["image_grid_thw"]
    assert int(clean.image_mask.sum()) == int(corrupt.image_mask.sum()) and not torch.equal(g_clean, g_corrupt)
    with pytest.raises(ValueError, match="different patch grids"):
        patch_sites(tiny_qwen, clean, corrupt, ["vision.hook_embed"], logit_diff(5, 9))
    _, cache = tiny_qwen.run_with_cache(clean, names=["vision.hook_embed"])  # the cache keeps its grids,
    assert torch.equal(cache.image_grid_thw, g_clean)
    import tempfile, pathlib

    with tempfile.TemporaryDirectory() as d:  # also through save and load
        cache.save(pathlib.Path(d) / "c.safetensors")
        back = ActivationCache.load(pathlib.Path(d) / "c.safetensors")
    assert torch.equal(back.image_grid_thw, g_clean) and torch.equal(back.to("cpu").image_grid_thw, g_clean)
    for source in (cache, back):
        with pytest.raises(ValueError, match="source and target images have different patch grids"):
            patch_from_run(tiny_qwen, corrupt, source, ["vision.hook_embed"], logit_diff(5, 9))
    other = tiny_qwen.encode(images=[Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))],
                             prompts=["who is this"])
    res = patch_sites(tiny_qwen, clean, other, ["vision.hook_embed"], logit_diff(5, 9))
    assert math.isfinite(res.patched["vision.hook_embed"])


def test_image_token_positions_pick_one_image_token_per_row(tiny_model):
    from interp.patching import image_token

    size = 32 if tiny_model.arch == "llava" else 64
    inputs = tiny_model.encode(images=[random_image(size, 1), random_image(size, 2)], prompts=PROMPTS)
    n = int(inputs.image_mask[0].sum())
    masks = [image_token(k)(inputs) for k in range(n)]
    for k, m in enumerate(masks):
        assert m.sum(1).tolist() == [1, 1] and not (m & ~inputs.image_mask).any()
        for row in range(2):
            assert int(m[row].nonzero()) == int(inputs.image_mask[row].nonzero()[k])
    assert torch.equal(torch.stack(masks).any(0), inputs.image_mask)  # together: every image token, once
    with pytest.raises(ValueError, match=f"no image token {n}"):
        image_token(n)(inputs)
    with pytest.raises(ValueError, match="index >= 0"):
        image_token(-1)


def test_per_row_ids_work_with_batched_patching(tiny_llava):
    """A metric with one id per row still works when a patching function runs several copies of the batch in
    one pass (the ids tile per copy): the same numbers as one site per pass."""
    from interp.patching import logit_diff, patch_sites

    clean = tiny_llava.encode(images=[random_image(32, 1), random_image(32, 2)], prompts=["who is he", "who is she"])
    corrupt = tiny_llava.encode(images=[random_image(32, 3), random_image(32, 4)], prompts=["who is he", "who is she"])
    metric = logit_diff([5, 6], [7, 8])
    names = [f"blocks.{l}.hook_resid_pre" for l in range(3)]
    batched = patch_sites(tiny_llava, clean, corrupt, names, metric, max_rows=None)
    alone = patch_sites(tiny_llava, clean, corrupt, names, metric, max_rows=2)
    assert all(batched.rows[n] == pytest.approx(alone.rows[n], abs=1e-5) for n in names)
    logits = tiny_llava.run_with_hooks(corrupt, [])
    with pytest.raises(ValueError, match="3 token ids for a batch of 2"):
        logit_diff([5, 6, 7], 8)(logits, corrupt)
