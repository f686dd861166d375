"""Targeted PGD: stays in the budget, lowers the target loss, leaves the model untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eraser.pgd import PGDConfig, pgd_attack
from interp.pixels import encode_with_pixels, to_pixels

PROMPTS = ["what is the name of the person in this image ?", "who is he"]
TARGET = "the person is a red cat"


def images_for(model) -> list[Image.Image]:
    """Two non-square images of odd sizes, whose processed size is a fixed point of the processor's resize."""
    rng = np.random.RandomState(3)
    sizes = [(53, 37), (41, 45)] if model.arch == "llava" else [(64, 64), (128, 32)]  # Qwen budget: 64*64 pixels
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.hf_model.state_dict().items()}


def test_attack_is_in_budget_lowers_the_loss_and_keeps_the_model(tiny_model):
    before = snapshot(tiny_model)
    flags = [p.requires_grad for p in tiny_model.hf_model.parameters()]
    cfg = PGDConfig(eps=8 / 255, alpha=2 / 255, steps=10)
    res = pgd_attack(tiny_model, images_for(tiny_model), PROMPTS, TARGET, cfg)

    print(f"{tiny_model.arch}: clean {res.clean_loss.tolist()} -> final {res.final_loss.tolist()}, "
          f"linf*255 {(res.linf * 255).tolist()}, pil diff*255 {(res.pil_max_diff * 255).tolist()}")
    assert res.losses.shape == (cfg.steps + 1, 2)
    assert torch.equal(res.losses[0], res.clean_loss)  # no random start: iterate 0 is the clean image
    assert (res.final_loss < res.clean_loss).all()
    assert (res.clean_loss - res.final_loss).min().item() > 1e-3
    for x, c in zip(res.pixels, res.clean_pixels):
        assert (x - c).abs().max().item() <= cfg.eps + 1e-6
        assert x.min().item() >= 0 and x.max().item() <= 1
    assert (res.linf > 0).all()

    after = snapshot(tiny_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_model.hf_model.parameters())
    assert [p.requires_grad for p in tiny_model.hf_model.parameters()] == flags
    assert not tiny_model.hf_model.training

    # the exact float pixels reproduce the final loss ...
    inputs = encode_with_pixels(tiny_model, res.pixels, PROMPTS, answers=[TARGET] * 2)
    with torch.no_grad():
        loss = tiny_model.answer_nll(inputs, logits=tiny_model.hf_model(**inputs.model_kwargs()).logits)
    assert torch.allclose(loss.cpu(), res.final_loss, atol=1e-5)
    # ... and the PIL images are those pixels rounded to uint8 (the processor's resize is a no-op on them)
    assert len(res.images) == 2 and all(isinstance(im, Image.Image) for im in res.images)
    assert (res.pil_max_diff <= 0.5 / 255 + 1e-6).all()


def test_eps_zero_returns_the_clean_image(tiny_model):
    imgs = images_for(tiny_model)
    res = pgd_attack(tiny_model, imgs, PROMPTS, TARGET, PGDConfig(eps=0.0, steps=3, random_start=True))
    clean = to_pixels(tiny_model, imgs, stack=False)
    assert all(torch.equal(x, c) for x, c in zip(res.pixels, clean))
    assert torch.allclose(res.final_loss, res.clean_loss, atol=1e-6)


def test_random_start_is_seeded(tiny_llava):
    imgs = images_for(tiny_llava)
    run = lambda seed: pgd_attack(tiny_llava, imgs, PROMPTS, TARGET, PGDConfig(steps=1, random_start=True, seed=seed),
                                  as_pil=False)
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a.pixels, b.pixels))
    assert not all(torch.equal(x, y) for x, y in zip(a.pixels, c.pixels))
    assert a.images is None and a.pil_max_diff is None
    assert (a.linf <= 8 / 255 + 1e-6).all()


def test_mixed_sizes_and_chunks_on_qwen(tiny_qwen):
    """Qwen images of different aspect ratios are attacked in one batch, or in chunks."""
    rng = np.random.RandomState(5)
    imgs = [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(53, 37), (64, 64), (29, 71)]]
    res = pgd_attack(tiny_qwen, imgs, PROMPTS + ["name"], TARGET, PGDConfig(steps=4, batch_size=2))
    assert [tuple(x.shape) for x in res.pixels] == [tuple(c.shape) for c in res.clean_pixels]
    assert len({tuple(x.shape) for x in res.pixels}) == 3
    assert (res.final_loss < res.clean_loss).all()
    # 53x37 is upscaled past the pixel budget, so re-processing its PIL image changes the size: reported as inf
    assert torch.isinf(res.pil_max_diff[0]) and res.pil_max_diff[1] <= 0.5 / 255 + 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        PGDConfig(eps=-1)
    with pytest.raises(ValueError, match="steps"):
        PGDConfig(steps=-1)


def test_config_and_inputs_are_checked(tiny_llava):
    """A NaN eps made every attacked pixel NaN, saved as an all-black recall image; a text-only or multi-image row
    crashed with "'NoneType' object has no attribute 'mode'"."""
    from interp.inputs import InputError

    for bad in ({"eps": float("nan")}, {"alpha": float("inf")}, {"eps": -1.0}, {"steps": 2.5}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            PGDConfig(**bad)
    img = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    for row in (None, [img, img], np.zeros((32, 32, 3), np.uint8)):
        with pytest.raises(InputError, match="row 1: to_pixels"):
            to_pixels(tiny_llava, [img, row])


def test_each_step_moves_every_pixel_by_alpha_times_the_gradient_sign(tiny_llava):
    """From a mutation audit: a raw-gradient step (no sign) or a step of eps instead of alpha still lowered the loss
    within budget.  One step moves the image by exactly alpha in L-inf, two by 2 alpha (eps 8/255 is not reached),
    and every pixel moves by a whole number of alpha steps (measured: after one step 99.9 % by alpha; after two,
    89 % by 2 alpha and 11 % back to 0, where the gradient's sign flipped)."""
    imgs = images_for(tiny_llava)
    alpha = 2 / 255
    one = pgd_attack(tiny_llava, imgs, PROMPTS, TARGET, PGDConfig(steps=1), as_pil=False)
    two = pgd_attack(tiny_llava, imgs, PROMPTS, TARGET, PGDConfig(steps=2), as_pil=False)
    torch.testing.assert_close(one.linf, torch.full((2,), alpha), rtol=0, atol=1e-6)
    torch.testing.assert_close(two.linf, torch.full((2,), 2 * alpha), rtol=0, atol=1e-6)
    for res, steps in ((one, 1), (two, 2)):
        delta = torch.cat([(x - c).abs().flatten() for x, c in zip(res.pixels, res.clean_pixels)])
        share = [((delta - k * alpha).abs() < 1e-6).float().mean().item() for k in range(steps + 1)]
        assert sum(share) >= 0.99 and share[steps] >= 0.85
