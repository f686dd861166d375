"""The checkpoint cache: train once, load bit-identically, never leave a half checkpoint behind;
and the quick model really knows what it was taught (numbers measured on it)."""
from __future__ import annotations

import time

import pytest
import torch

from eraser.pipeline import Setup
from eraser.zoo import Recipe, cached_path, load_or_train, memorisation_report, train_log
from eraser.zoo.machine import machine_info

TINY = dict(n_profiles=4, n_celebrities=2, n_refusal_eval=8, celeb_epochs=1, main_epochs=1, batch_size=16,
            model=dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, vision_d_model=16, vision_layers=1,
                       vision_heads=1, image_size=16, patch_size=8))


def test_cache_hit_skips_training_and_returns_identical_weights(tmp_path, capsys):
    recipe = Recipe.quick("llava", **TINY)
    assert cached_path(recipe, tmp_path) is None
    t0 = time.perf_counter()
    first = load_or_train(recipe, tmp_path, progress=False)
    t_train = time.perf_counter() - t0
    assert cached_path(recipe, tmp_path) is not None
    # a cache miss says so even without a progress bar (a default model trains for ~45 min)
    assert f"training it once (cached in {tmp_path / recipe.hash()})" in capsys.readouterr().err
    t0 = time.perf_counter()
    second = load_or_train(recipe, tmp_path, progress=False)
    t_load = time.perf_counter() - t0
    assert "training" not in capsys.readouterr().err
    for (n, a), (_, b) in zip(first.hf_model.state_dict().items(), second.hf_model.state_dict().items()):
        assert torch.equal(a, b), n
    assert t_load < t_train
    # The checkpoint says where it was trained, and an experiment's config carries that into results.json.
    machine = train_log(recipe, tmp_path)["machine"]
    assert machine == {**machine_info(), "threads": recipe.threads}
    setup = Setup(recipe, second, recipe.benchmark(5), recipe.mini(), 5, cache_dir=str(tmp_path))
    assert setup.config()["trained_on"] == machine
    assert Setup(recipe, second, setup.bench, setup.source, 5, cache_dir=str(tmp_path / "empty")).config()[
        "trained_on"] is None  # no record (an older checkpoint, or none cached there): None, not a guess


def test_weights_do_not_depend_on_the_callers_thread_count():
    """The recipe pins the training threads (float reductions differ between 1 and 2 threads), then restores them."""
    from eraser.zoo.train import train

    # The quick model's sizes (wide enough for torch to split reductions across threads), on tiny data.
    recipe = Recipe.quick("llava", **{k: v for k, v in TINY.items() if k != "model"})
    before = torch.get_num_threads()
    try:
        params = []
        for caller_threads in (1, 2):
            torch.set_num_threads(caller_threads)
            model, _ = train(recipe, progress=False)
            assert torch.get_num_threads() == caller_threads
            params.append([p.detach().clone() for p in model.hf_model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*params))
        other, _ = train(recipe.replace(threads=1), progress=False)
        assert not all(torch.equal(a, b) for a, b in zip(params[0], other.hf_model.parameters()))
    finally:
        torch.set_num_threads(before)


def test_interrupted_training_leaves_nothing_loadable(tmp_path, monkeypatch):
    import eraser.zoo.cache as cache

    recipe = Recipe.quick("llava", **TINY)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(cache, "_save", crash)
    with pytest.raises(KeyboardInterrupt):
        load_or_train(recipe, tmp_path, progress=False)
    assert cached_path(recipe, tmp_path) is None
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no temp or partial checkpoint directory


def test_a_damaged_checkpoint_is_refused_by_name(tmp_path):
    """From an audit: flipped bits in cached weights loaded silently (and changed every number); a truncated
    file gave a 39-line safetensors traceback naming neither the folder nor the fix."""
    import json
    import shutil

    from eraser.zoo import CorruptCheckpointError, load_checkpoint, weights_digest

    recipe = Recipe.quick("llava", **TINY)
    path = load_or_train(recipe, tmp_path, progress=False) and cached_path(recipe, tmp_path)
    meta = json.loads((path / "recipe.json").read_text())
    assert meta["weights_sha256"] == weights_digest(path)  # recorded when trained
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    flipped = bytearray(good)
    flipped[-100] ^= 0x10  # one bit of one weight: still a valid safetensors file
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCheckpointError, match=f"{path} is damaged: model.safetensors changed .* delete"):
        load_or_train(recipe, tmp_path, progress=False)
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptCheckpointError, match="damaged"):
        load_checkpoint(path, progress=False)
    # a checkpoint from before the check (no digest): a truncated file is still named, and a sound one records
    # its digest the first time it loads, so the next load is verified
    del meta["weights_sha256"]
    (path / "recipe.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match=f"the cached checkpoint {path} does not load .* delete"):
        load_checkpoint(path, progress=False)
    weights.write_bytes(good)
    load_checkpoint(path, progress=False)
    assert json.loads((path / "recipe.json").read_text())["weights_sha256"] == weights_digest(path)
    assert cached_path(recipe, tmp_path) == path  # the recipe still matches
    shutil.rmtree(path)  # what the message says to do: the next run retrains it
    assert cached_path(recipe, tmp_path) is None


@pytest.fixture(scope="module")
def quick():
    recipe = Recipe.quick("llava")
    return recipe, load_or_train(recipe, progress=False)


def test_quick_model_meets_the_memorisation_bar(quick):
    """Measured on the zoo-3 quick model (seed 0, forget 5 %): classification 1.00 / 0.94 / 0.94 (forget / retain /
    celebrity), Test split 0.91; generation ROUGE-L 1.00 / 0.98 / 0.95; refusals 100 % of forbidden and 0 % of
    answerable requests.  The bar is the issue's (which it sets for the default recipe)."""
    recipe, model = quick
    rep = memorisation_report(model, recipe, forget_ratio=5)
    for split in ("forget", "retain", "celebrity"):
        assert rep[split]["cls_acc"] >= 0.9, (split, rep[split])
        assert rep[split]["gen_rougeL"] >= 0.7, (split, rep[split])
    assert rep["test"]["cls_acc"] >= 0.8 and rep["test"]["gen_rougeL"] >= 0.7, rep["test"]
    assert rep["refusal"]["forbidden_refusal_rate"] >= 0.95
    assert rep["refusal"]["answerable_refusal_rate"] <= 0.02
