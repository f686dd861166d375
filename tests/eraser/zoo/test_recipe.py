"""Recipes: the cache key must change exactly when the trained weights would."""
from __future__ import annotations

import pytest

from eraser.zoo import Recipe


def test_hash_is_stable_and_sensitive():
    r = Recipe.quick("llava")
    assert r.hash() == Recipe.quick("llava").hash()
    assert Recipe.from_json(r.to_json()) == r
    assert r.replace(lr=r.lr * 2).hash() != r.hash()
    assert r.replace(seed=1).hash() != r.hash()
    assert r.replace(threads=1).hash() != r.hash()  # the thread count changes the trained weights
    assert Recipe.quick("qwen2_5_vl").hash() != r.hash()
    assert Recipe.default("llava").hash() != r.hash()


def test_oracle_depends_on_forget_ratio_and_vanilla_does_not():
    r = Recipe.quick()
    assert r.oracle_for(5).hash() != r.oracle_for(10).hash() != r.hash()
    assert r.replace(forget_ratio=10).hash() == r.hash()  # irrelevant for a vanilla model
    assert r.oracle_for(5).vanilla() == r


def test_bad_recipes_are_rejected():
    with pytest.raises(ValueError, match="arch"):
        Recipe(arch="gpt2")
    with pytest.raises(ValueError, match="forget_ratio"):
        Recipe(oracle=True, forget_ratio=7)
    with pytest.raises(ValueError):
        Recipe(batch_size=0)
    with pytest.raises(ValueError, match="threads"):
        Recipe(threads=0)
    with pytest.raises(ValueError, match="unknown recipe field"):
        Recipe.from_dict({"arch": "llava", "learning_rate": 1.0})


def test_curriculum_fields_keep_old_hashes_and_round_trip():
    quick = Recipe.quick("llava")
    assert not quick.curriculum and "recognition_epochs" not in quick.to_dict()  # hashes of older checkpoints hold
    cur = quick.replace(recognition_epochs=3, fact_epochs=2)
    assert cur.curriculum and cur.to_dict()["recognition_epochs"] == 3
    assert cur.hash() != quick.hash() and Recipe.from_json(cur.to_json()) == cur
    assert cur.replace(recognition_lr=1e-3).hash() != cur.hash()
    assert "curriculum 3 recognition + 2 fact epochs" in cur.describe()
    assert "mixture_hold" not in cur.to_dict() and cur.replace(mixture_hold=0.5).hash() != cur.hash()
    assert "mixture held 50% of its epochs" in cur.replace(mixture_hold=0.5).describe()
    for bad in (dict(recognition_epochs=-1), dict(fact_epochs=-1), dict(recognition_lr=0.0), dict(recognition_batch=0),
                dict(mixture_hold=1.0), dict(mixture_hold=-0.1), dict(mixture_restart=-1)):
        with pytest.raises(ValueError):
            Recipe.quick("llava", **bad)
    for late in (dict(mixture_hold=0.5), dict(mixture_restart=3)):
        with pytest.raises(ValueError, match="without one"):
            quick.replace(**late)
    assert "mixture_restart" not in cur.to_dict() and cur.replace(mixture_restart=3).hash() != cur.hash()


def test_match_warmup_field_keeps_old_hashes_and_is_validated():
    quick = Recipe.quick("llava")
    assert "match_epochs" not in quick.to_dict()  # off: the cached quick and default checkpoints keep their hashes
    warm = quick.replace(match_epochs=5)
    assert warm.to_dict()["match_epochs"] == 5 and warm.hash() != quick.hash()
    assert Recipe.from_json(warm.to_json()) == warm
    assert "5 option-matching warm-up epochs" in warm.describe()
    with pytest.raises(ValueError, match="match_epochs"):
        quick.replace(match_epochs=-1)


def test_gen_repeat_and_prompt_weight_keep_old_hashes_and_change_new_ones():
    quick = Recipe.quick("llava")
    assert quick.gen_repeat == 1 and quick.prompt_weight == 0.0
    assert "gen_repeat" not in quick.to_dict() and "prompt_weight" not in quick.to_dict()  # older checkpoints hold
    fast = quick.replace(gen_repeat=3, prompt_weight=0.5)
    assert fast.to_dict()["gen_repeat"] == 3 and fast.to_dict()["prompt_weight"] == 0.5
    assert Recipe.from_json(fast.to_json()) == fast
    assert len({quick.hash(), fast.hash(), quick.replace(gen_repeat=3).hash(), quick.replace(prompt_weight=0.5).hash()}) == 4
    for bad in (dict(gen_repeat=0), dict(prompt_weight=-0.1), dict(prompt_weight=float("nan")),
                dict(prompt_weight=float("inf"))):
        with pytest.raises(ValueError):
            Recipe.quick("llava", **bad)
