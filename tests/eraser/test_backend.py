"""The HookedVLM -> evaluator bridge: batched closures must equal unbatched calls, in input order."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eraser.backend import generate_fn, nll_fn
from interp.tiny import tiny_vlm

torch.set_num_threads(2)

PROMPTS = [
    "who is this person",
    "what is the name of the person in the image please give one letter",
    "where was he born",
    "what is the job of the person in the picture",
    "tell me about his hobby",
]
ANSWERS = ["a b c", "red", "the city of blue yellow green", "no", "he likes colour"]


def _image(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(32, 32, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def model(request):
    return tiny_vlm(request.param, seed=0, n_layers=2)


@pytest.fixture(scope="module")
def images():
    return [_image(0), None, _image(1), None, _image(2)]  # mixed image / text-only rows, unequal lengths


def test_generate_batched_equals_unbatched(model, images):
    batched = generate_fn(model, batch_size=2)(images, PROMPTS, 6)
    single = [generate_fn(model, batch_size=1)([im], [p], 6)[0] for im, p in zip(images, PROMPTS)]
    assert batched == single
    assert len(batched) == len(PROMPTS) and all(isinstance(t, str) for t in batched)


def test_nll_batched_equals_unbatched(model, images):
    batched = nll_fn(model, batch_size=3)(images, PROMPTS, ANSWERS)
    single = [nll_fn(model, batch_size=1)([im], [p], [a])[0] for im, p, a in zip(images, PROMPTS, ANSWERS)]
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)
    direct = model.answer_nll(model.encode([images[1]], [PROMPTS[1]], answers=[ANSWERS[1]]))
    assert batched[1] == pytest.approx(float(direct[0]), rel=1e-4)


def test_nll_prefers_trained_like_answers_is_order_sensitive(model, images):
    # Row order must be preserved even though image rows are batched first internally.
    fwd = nll_fn(model, batch_size=4)(images, PROMPTS, ANSWERS)
    rev = nll_fn(model, batch_size=4)(images[::-1], PROMPTS[::-1], ANSWERS[::-1])
    np.testing.assert_allclose(fwd, rev[::-1], rtol=1e-4, atol=1e-5)


def test_hooks_are_applied(model, images):
    def zero_resid(x, ctx):
        return torch.zeros_like(x)

    hooks = [("blocks.0.hook_resid_pre", zero_resid)]
    plain = nll_fn(model)(images, PROMPTS, ANSWERS)
    hooked = nll_fn(model, hooks=hooks)(images, PROMPTS, ANSWERS)
    assert not np.allclose(plain, hooked)
    gen_hooked = generate_fn(model, hooks=hooks)(images[:2], PROMPTS[:2], 4)
    # the generation half asserted only a length (a mutation audit): the hooks must reach generate too
    assert gen_hooked != generate_fn(model)(images[:2], PROMPTS[:2], 4)
    enc = model.encode(images=images[:2], prompts=PROMPTS[:2])
    assert gen_hooked == [t.strip() for t in model.generate(enc, max_new_tokens=4, hooks=hooks).texts]


def test_input_errors(model):
    with pytest.raises(ValueError):
        generate_fn(model, batch_size=0)
    with pytest.raises(ValueError):
        generate_fn(model)([None], ["a", "b"], 3)
    with pytest.raises(ValueError):
        nll_fn(model)([None, None], ["a", "b"], ["x"])
