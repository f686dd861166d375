"""Shared fixtures: tiny models are built once per session (they are deterministic for a seed)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def random_image(size: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8))


def nudged_pair(model, step: float, prompts=("what is the name of the person in this image ?", "who is he")):
    """(clean, corrupted) for the gradient-estimate tests: the clean pixels are the corrupted ones moved ``step``
    of the way to other images (small ``step``: runs close enough for first order to hold)."""
    import dataclasses

    size = 32 if model.arch == "llava" else 64
    corrupt = model.encode(images=[random_image(size, 1), random_image(size, 2)], prompts=list(prompts))
    other = model.encode(images=[random_image(size, 3), random_image(size, 4)], prompts=list(prompts))
    a, b = corrupt.image_kwargs["pixel_values"], other.image_kwargs["pixel_values"]
    clean = dataclasses.replace(corrupt, image_kwargs={**corrupt.image_kwargs, "pixel_values": a + step * (b - a)})
    return clean, corrupt


def save_local_copy(root):
    """The quick zoo model saved as a Hugging Face folder (``root/model``) and its benchmark as MLLMU-Bench parquet
    files (``root/mllmu``, forget 5 %): a local checkpoint on a local MLLMU-Bench, as a real 7B run has.
    Returns the zoo setup it was saved from."""
    from eraser.data.mllmu import save_mllmu
    from eraser.pipeline import load_setup

    zoo = load_setup(quick=True, forget_ratio=5, progress=False)
    zoo.model.save_pretrained(root / "model")
    save_mllmu(zoo.source, root / "mllmu", ratios=[5])
    return zoo


@pytest.fixture(scope="session")
def tiny_llava():
    from interp.tiny import tiny_vlm

    return tiny_vlm("llava", seed=0, n_layers=3, vision_layers=2)


@pytest.fixture(scope="session")
def tiny_qwen():
    from interp.tiny import tiny_vlm

    return tiny_vlm("qwen2_5_vl", seed=0, n_layers=3, vision_layers=2)


@pytest.fixture(scope="session", params=["llava", "qwen2_5_vl"])
def tiny_model(request, tiny_llava, tiny_qwen):
    return tiny_llava if request.param == "llava" else tiny_qwen


@pytest.fixture
def two_prompts(tiny_model):
    """A batch of two prompts of different lengths, each with an image."""
    size = 32 if tiny_model.arch == "llava" else 64
    images = [random_image(size, 1), random_image(size, 2)]
    prompts = ["what is the name of the person in this image ?", "who is he"]
    return images, prompts


@pytest.fixture
def nnsight_handoffs(monkeypatch):
    """A counter of nnsight's per-module handoffs (``Interleaver.handle`` calls): reset ``["n"]``, run, read it."""
    from nnsight.intervention.interleaver import Interleaver

    calls = {"n": 0}
    handle = Interleaver.handle

    def counting(self, provider, value):
        calls["n"] += 1
        return handle(self, provider, value)

    monkeypatch.setattr(Interleaver, "handle", counting)
    return calls
