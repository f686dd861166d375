"""The model zoo: recipes, training and a checkpoint cache for the tiny vanilla models and their oracles.

>>> from eraser.zoo import Recipe, load_or_train
>>> recipe = Recipe.quick("llava")
>>> # model = load_or_train(recipe)   # trains once (quick: ~6-8 min on 2 cores), then loads from the cache
"""
from .cache import (CorruptCheckpointError, cache_root, cached_path, checkpoint_dir, default_model, load_checkpoint,
                    load_or_train, train_log, weights_digest)
from .check import TARGETS, memorisation_report
from .recipe import CODE_VERSION, Recipe
from .train import TrainLog, train

__all__ = [
    "CODE_VERSION", "CorruptCheckpointError", "Recipe", "TARGETS", "TrainLog", "cache_root", "cached_path",
    "checkpoint_dir", "default_model",
    "load_checkpoint", "load_or_train", "memorisation_report", "train", "train_log",
    "weights_digest",
]
