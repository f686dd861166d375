"""interp.probe: feature collection per position, the logistic-regression probe, splits and accuracies."""
from __future__ import annotations

import pytest
import torch

from interp.probe import (
    LinearProbe, collect_features, features_from_cache, probe_accuracy, probe_layers, stratified_split,
)
from tests.conftest import random_image

PROMPTS = ["who is he", "what is the name of this person", "who is this", "tell me who this is",
           "name the person", "who", "what is this", "is this a person"]


@pytest.fixture(scope="module")
def llava2():
    from interp.tiny import tiny_vlm

    return tiny_vlm("llava", seed=0, n_layers=2)


def _clusters(n_per: int, n_classes: int, d: int, sep: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=g) * sep
    y = torch.arange(n_classes).repeat_interleave(n_per)
    return centres[y] + torch.randn(len(y), d, generator=g), y


# -- the probe on synthetic data -------------------------------------------------
def test_separable_data_reaches_perfect_test_accuracy():
    X, y = _clusters(75, 4, 16, sep=6.0, seed=0)
    res = probe_accuracy(X, y, train_frac=0.7, seed=0)
    assert res["test_acc"] == 1.0 and res["train_acc"] == 1.0
    assert res["n_classes"] == 4 and res["n_train"] + res["n_test"] == 300
    assert res["chance"] == pytest.approx(0.25, abs=0.01)


def test_independent_labels_stay_near_chance():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(400, 16, generator=g)
    y = torch.randint(0, 4, (400,), generator=g)
    res = probe_accuracy(X, y, seed=0)
    assert abs(res["test_acc"] - res["chance"]) <= 0.15
    assert abs(res["test_acc"] - 0.25) <= 0.15


def test_test_accuracy_is_scored_on_the_held_out_rows():
    """From a mutation audit: ``test_acc`` computed on the training rows went unnoticed.  Noise features wider than
    the training set: the probe memorises its 28 rows and is near chance on the 12 it never saw."""
    X = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40) % 2
    res = probe_accuracy(X, y, seed=0)
    tr, te = stratified_split(y, 0.7, 0)
    assert (res["n_train"], res["n_test"]) == (tr.numel(), te.numel()) == (28, 12)
    assert res["train_acc"] == 1.0 and res["test_acc"] <= 0.6
    probe = LinearProbe.fit(X[tr], y[tr])
    assert res["test_acc"] == probe.accuracy(X[te], y[te])
    assert res["train_acc"] == probe.accuracy(X[tr], y[tr])


def test_chance_is_the_held_out_majority_share():
    """From a mutation audit: chance as 1 / n_classes instead of the test set's majority share went unnoticed
    (balanced classes give the same number).  32 + 8 rows: 12 held out, 10 of class 0."""
    X = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0] * 32 + [1] * 8)
    res = probe_accuracy(X, y, seed=0)
    _, te = stratified_split(y, 0.7, 0)
    assert res["n_test"] == 12 and int((y[te] == 0).sum()) == 10
    assert res["chance"] == pytest.approx(10 / 12)
    assert res["n_classes"] == 2


def test_probe_layers_ranks_signal_above_noise():
    X, y = _clusters(30, 3, 8, sep=5.0, seed=2)
    res = probe_layers({"signal": X, "noise": torch.randn(90, 8)}, y)
    assert res["signal"]["test_acc"] == 1.0
    assert res["noise"]["test_acc"] < 0.75
    assert res["signal"]["n_test"] == res["noise"]["n_test"]  # same split for every site


def test_arbitrary_label_values_and_standardisation():
    X, y01 = _clusters(40, 2, 4, sep=4.0, seed=3)
    y = torch.where(y01 == 0, torch.tensor(7), torch.tensor(-2))
    probe = LinearProbe.fit(X * 1000 + 5e4, y)  # huge scale and offset: standardisation makes it irrelevant
    assert probe.classes.tolist() == [-2, 7]
    assert probe.accuracy(X * 1000 + 5e4, y) == 1.0
    assert set(probe.predict(X * 1000 + 5e4).tolist()) == {-2, 7}
    assert torch.allclose(probe.predict_proba(X).sum(-1), torch.ones(80))


def test_save_load_round_trip(tmp_path):
    X, y = _clusters(30, 3, 6, sep=2.0, seed=4)
    probe = LinearProbe.fit(X, y + 10, weight_decay=0.01, meta={"site": "blocks.1.hook_resid_post"})
    probe.save(tmp_path / "p.safetensors")
    back = LinearProbe.load(tmp_path / "p.safetensors")
    Xt = torch.randn(50, 6)
    assert torch.equal(back.predict(Xt), probe.predict(Xt))
    assert torch.equal(back.logits(Xt), probe.logits(Xt))
    assert back.weight_decay == 0.01 and back.meta == {"site": "blocks.1.hook_resid_post"}
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a saved LinearProbe"):
        LinearProbe.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"junk.bin is not a readable LinearProbe file"):
        LinearProbe.load(tmp_path / "junk.bin")


def test_stratified_split_is_seeded_and_covers_every_class():
    y = torch.tensor([0] * 10 + [1] * 3 + [2] * 2 + [3])
    tr, te = stratified_split(y, 0.7, seed=5)
    assert set(y[tr].tolist()) == {0, 1, 2, 3}
    assert set(y[te].tolist()) == {0, 1, 2}  # the singleton class can only be trained on
    assert sorted(tr.tolist() + te.tolist()) == list(range(16))
    tr2, te2 = stratified_split(y, 0.7, seed=5)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert not torch.equal(stratified_split(y, 0.7, seed=6)[0], tr)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="at least 2 classes"):
        LinearProbe.fit(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="feature rows"):
        probe_accuracy(torch.randn(5, 3), torch.tensor([0, 1, 0, 1]))
    probe = LinearProbe.fit(torch.randn(6, 3), torch.tensor([0, 1] * 3))
    with pytest.raises(ValueError, match="expects 3 features"):
        probe.predict(torch.randn(2, 4))
    X = torch.randn(6, 3)
    X[4, 1], X[5, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"NaN or inf in 2 of 6 rows \(first: \[4, 5\]\)"):
        probe_accuracy(X, torch.tensor([0, 1] * 3))
    with pytest.raises(ValueError, match="no labels"):
        probe_accuracy(torch.randn(0, 3), torch.zeros(0, dtype=torch.long))
    import numpy as np

    for labels in (["red", "blue"] * 3, np.array(["red", "blue"] * 3), "rbrbrb"):
        with pytest.raises(ValueError, match=r"integer class ids, not strings: map them first"):
            LinearProbe.fit(torch.randn(6, 3), labels)
    with pytest.raises(ValueError, match="1-D sequence of integer class ids"):
        LinearProbe.fit(torch.randn(6, 3), [object()] * 6)
    # from an audit: a negative decay gave NaN weights that still "predicted" (accuracy 0.55); inf became a class
    for decay in (-1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
            LinearProbe.fit(torch.randn(60, 4), torch.tensor([0, 1] * 30), weight_decay=decay)
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1"):
        LinearProbe.fit(torch.randn(6, 3), torch.tensor([0, 1] * 3), max_iter=0)
    with pytest.raises(ValueError, match="labels must be integers"):
        LinearProbe.fit(torch.randn(4, 3), [0, float("inf"), 0, 1])
    with pytest.raises(ValueError, match="no held-out examples: every class has a single example"):
        probe_accuracy(torch.randn(3, 3), torch.tensor([0, 1, 2]))


# -- features from a tiny model -------------------------------------------------
def test_image_identity_is_readable_at_image_positions(llava2):
    imgs = [random_image(32, s) for s in (10, 11, 12)]
    images = [imgs[i] for i in range(3) for _ in PROMPTS]
    prompts = PROMPTS * 3
    y = torch.arange(3).repeat_interleave(len(PROMPTS))
    feats = collect_features(llava2, images, prompts, "blocks.1.hook_resid_post", position="image_mean", batch_size=8)
    X = feats["blocks.1.hook_resid_post"]
    assert X.shape == (24, llava2.d_model)
    res = probe_accuracy(X, y, seed=0)
    assert res["test_acc"] >= 0.9 and res["n_test"] == 6


def test_collect_feature_shapes_and_values(llava2):
    images = [random_image(32, 1), random_image(32, 2), random_image(32, 3)]
    prompts = ["who is he", "what is the name of the person in this image ?", "who"]
    names = ["blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post", "projector.hook_out"]
    inputs = llava2.encode(images=images, prompts=prompts)
    _, cache = llava2.run_with_cache(inputs, names=names + ["hook_embed"])
    d, dv = llava2.d_model, llava2.hf_model.config.vision_config.hidden_size
    for pos in ("last", "image_mean", "text_mean"):
        feats = collect_features(llava2, images, prompts, names, position=pos, batch_size=2)  # batches of 2 + 1
        assert feats["blocks.0.hook_resid_post"].shape == (3, d)
        assert feats["vision.blocks.1.hook_resid_post"].shape == (3, dv)
        assert feats["projector.hook_out"].shape == (3, d)
        site = cache["blocks.0.hook_resid_post"]
        if pos == "last":
            ref = cache.last("blocks.0.hook_resid_post")
        else:
            rows = cache.image("blocks.0.hook_resid_post") if pos == "image_mean" else cache.text("blocks.0.hook_resid_post")
            ref = torch.stack([r.mean(0) for r in rows])
        assert torch.allclose(feats["blocks.0.hook_resid_post"], ref, atol=1e-4), pos
        assert site.shape[0] == 3
    # vision sites: mean over each image's patches, the same whatever `position`
    assert torch.allclose(feats["vision.blocks.1.hook_resid_post"], cache["vision.blocks.1.hook_resid_post"].mean(1), atol=1e-5)
    # the projector output is what is scattered into the image positions
    embed_img = torch.stack([r.mean(0) for r in cache.image("hook_embed")])
    assert torch.allclose(feats["projector.hook_out"], embed_img, atol=1e-5)


def test_qwen_vision_sites_split_per_image(tiny_qwen):
    images = [random_image(64, 1), random_image(64, 2)]
    prompts = ["who is he", "what is this"]
    names = ["vision.blocks.0.hook_resid_post", "projector.hook_in", "projector.hook_out"]
    both = collect_features(tiny_qwen, images, prompts, names, batch_size=2)
    single = collect_features(tiny_qwen, images, prompts, names, batch_size=1)
    dv = tiny_qwen.hf_model.config.vision_config.hidden_size
    assert both["vision.blocks.0.hook_resid_post"].shape == (2, dv)
    assert both["projector.hook_out"].shape == (2, tiny_qwen.d_model)
    for n in names:  # vision attention never crosses images, so batching must not change a row's features
        assert torch.allclose(both[n], single[n], atol=1e-4), n
    assert not torch.allclose(both[names[0]][0], both[names[0]][1], atol=1e-3)
    inputs = tiny_qwen.encode(images=images, prompts=prompts)
    _, cache = tiny_qwen.run_with_cache(inputs, names=["projector.hook_out", "hook_embed"])
    embed_img = torch.stack([r.mean(0) for r in cache.image("hook_embed")])
    assert torch.allclose(features_from_cache(tiny_qwen, cache, inputs)["projector.hook_out"], embed_img, atol=1e-5)


def test_rows_without_the_modality_are_errors(llava2):
    with pytest.raises(ValueError, match="no image tokens"):
        collect_features(llava2, [random_image(32, 1), None], ["who", "who is he"], "blocks.0.hook_resid_post",
                         position="image_mean")
    with pytest.raises(ValueError, match="row 1 .*has no image"):
        collect_features(llava2, [random_image(32, 1), None], ["who", "who is he"], "vision.blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="position must be"):
        collect_features(llava2, [None], ["who"], "blocks.0.hook_resid_post", position="mean")


def test_per_head_sites_give_the_heads_side_by_side(llava2):
    images = [random_image(32, s) for s in range(3)]
    prompts = PROMPTS[:3]
    feats = collect_features(llava2, images, prompts, "blocks.1.attn.*", position="last")
    assert sorted(feats) == ["blocks.1.attn.hook_k", "blocks.1.attn.hook_q", "blocks.1.attn.hook_v",
                             "blocks.1.attn.hook_z"]  # the pattern is not a per-position vector: left out
    inputs = llava2.encode(images=images, prompts=prompts)
    _, cache = llava2.run_with_cache(inputs, names=["blocks.1.attn.hook_z", "vision.blocks.0.attn.hook_z"])
    z = cache.last("blocks.1.attn.hook_z")  # [n, heads, d_head]
    assert feats["blocks.1.attn.hook_z"].shape == (3, llava2.d_model)
    assert torch.allclose(feats["blocks.1.attn.hook_z"], z.flatten(1), atol=1e-6)
    vis = features_from_cache(llava2, cache, inputs)["vision.blocks.0.attn.hook_z"]  # mean over patches
    assert torch.allclose(vis, cache["vision.blocks.0.attn.hook_z"].flatten(-2).mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="probe attn.hook_z"):
        collect_features(llava2, images, prompts, ["blocks.1.attn.hook_pattern"])


def test_group_split_keeps_groups_whole_and_stratifies():
    from interp.probe import group_split

    groups = torch.arange(10).repeat_interleave(3)  # 10 people, 3 queries each
    strata = (groups < 4).long()  # people 0-3 are "forget"
    tr, te = group_split(groups, strata, train_frac=0.5, seed=1)
    assert sorted(torch.cat([tr, te]).tolist()) == list(range(30))  # disjoint and covering
    assert not set(groups[tr].tolist()) & set(groups[te].tolist())  # no person on both sides
    assert len(set(groups[te].tolist()) & {0, 1, 2, 3}) == 2 and len(set(groups[te].tolist()) - {0, 1, 2, 3}) == 3
    again = group_split(groups, strata, train_frac=0.5, seed=1)
    assert torch.equal(again[0], tr) and torch.equal(again[1], te)  # seeded
    lone = group_split(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([1, 1, 0, 0, 0]), seed=0)
    assert 0 in lone[0].tolist() and 1 in lone[0].tolist()  # a stratum's single group trains
    with pytest.raises(ValueError, match="group 0 spans strata"):
        group_split(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="train_frac"):
        group_split(groups, train_frac=1.0)
