"""Targeted L-infinity PGD in pixel space: the adversarial images of MLLMEraser's knowledge-recall pairs.

Why: Stage 1 of MLLMEraser contrasts activations of inputs the model
*recalls* on with inputs it *refuses*.  The recall side uses images nudged
(within an imperceptible L-inf ball) so that the model gives the target,
compliant answer.  We minimise the target answer's mean token cross-entropy
given ``(image', prompt)``::

    x_{k+1} = clip_{|x' - x|_inf <= eps, [0, 1]}(x_k - alpha * sign(grad_x CE))

in ``[0, 1]`` pixels at the model's input resolution, *before* the
processor's normalisation (:mod:`interp.pixels` makes that part differentiable).

>>> from PIL import Image
>>> from interp.tiny import tiny_vlm
>>> model = tiny_vlm("llava", n_layers=2)
>>> res = pgd_attack(model, [Image.new("RGB", (40, 30), "gray")], ["who is this"], ["a person"],
...                  PGDConfig(steps=3))
>>> bool(res.final_loss[0] < res.clean_loss[0])
True

The returned PIL images (``res.images``) are the float pixels rounded to
uint8, so each value moves by <= 0.5/255 (``res.pil_max_diff`` reports it).
For an exact reproduction of the attacked input, encode ``res.pixels`` with
:func:`interp.pixels.encode_with_pixels`.  The PIL images are at the
processor's resolution; re-encoding them with ``model.encode`` reproduces the
attack (to uint8 rounding) only when the processor's resize is idempotent there:
always for LLaVA's resize+crop; for Qwen2.5-VL when the resized area is inside
the pixel budget (``smart_resize`` can upscale past ``max_pixels`` and then
shrinks on a second pass); ``res.pil_max_diff`` is ``inf`` for such rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from interp.gradients import frozen_weights
from interp.model import sequence_nll
from interp.pixels import encode_with_pixels, pixels_to_image_kwargs, pixels_to_pil, to_pixels


@dataclass(frozen=True)
class PGDConfig:
    """PGD budget.  Defaults are the MLLMEraser release's: eps 8/255, alpha 2/255, 10 steps.

    ``seed`` seeds the uniform random start (used only with ``random_start``);
    ``batch_size`` splits the rows into chunks attacked one after another
    (each row's attack is independent, so chunking changes memory, not results).
    """

    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    random_start: bool = False
    seed: int = 0
    batch_size: Optional[int] = None

    def __post_init__(self) -> None:
        # ``not x >= 0`` also catches NaN, which passes ``x < 0``: a NaN eps made every attacked pixel NaN, saved
        # as an all-black recall image
        if not (isinstance(self.eps, (int, float)) and isinstance(self.alpha, (int, float))
                and 0 <= self.eps < math.inf and 0 <= self.alpha < math.inf):
            raise ValueError(f"eps and alpha must be finite numbers >= 0, got eps={self.eps!r}, alpha={self.alpha!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1 or None, got {self.batch_size!r}")


@dataclass
class PGDResult:
    """What :func:`pgd_attack` found, per row.

    ``pixels`` are the exact perturbed float pixels (``[3, h, w]`` each, in
    ``[0, 1]``, at the processor's resolution), ``clean_pixels`` the starting
    images; ``images`` are ``pixels`` quantised to uint8 PIL (None when
    ``as_pil=False``).  ``losses[k]`` is the target loss at iterate ``k``
    (``k = 0`` is the start point, ``k = steps`` the result), so
    ``final_loss == losses[-1]``; ``clean_loss`` is the loss on the clean image.
    ``pil_max_diff[i]`` is ``max |to_pixels(images[i]) - pixels[i]|`` (<= 0.5/255:
    uint8 rounding), or ``inf`` where re-processing the PIL image changes its size.
    """

    pixels: list[Float[Tensor, "3 h w"]]
    clean_pixels: list[Float[Tensor, "3 h w"]]
    images: Optional[list[Image.Image]]
    losses: Float[Tensor, "iterates batch"]
    clean_loss: Float[Tensor, " batch"]
    final_loss: Float[Tensor, " batch"]
    pil_max_diff: Optional[Float[Tensor, " batch"]]
    config: PGDConfig

    @property
    def linf(self) -> Float[Tensor, " batch"]:
        """Per-row ``max |x' - x|``, the L-inf size of the perturbation actually used."""
        return torch.stack([(a - b).abs().max() for a, b in zip(self.pixels, self.clean_pixels)])

    def stacked(self) -> Float[Tensor, "batch 3 h w"]:
        """``pixels`` as one tensor (all images must have the same size, as LLaVA's always do)."""
        return torch.stack(self.pixels)


def _loss(model: Any, base: Any, xs: list[Tensor]) -> Float[Tensor, " batch"]:
    """Mean target-token NLL per row, with the image kwargs rebuilt (differentiably) from ``xs``."""
    kwargs = {k: (v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device))
              for k, v in pixels_to_image_kwargs(model, xs).items()}
    inputs = replace(base, image_kwargs=kwargs)
    logits = model.hf_model(**inputs.model_kwargs()).logits
    return sequence_nll(logits, inputs.labels)


def _attack_chunk(model: Any, clean: list[Tensor], prompts: list[str], targets: list[str], cfg: PGDConfig,
                  gen: torch.Generator, chat: bool) -> tuple[list[Tensor], Tensor, Tensor]:
    # Token ids, masks and labels depend only on the image sizes, so encode once.
    base = encode_with_pixels(model, [c.detach() for c in clean], prompts, answers=targets, chat=chat)
    with torch.no_grad():
        clean_loss = _loss(model, base, clean).float().cpu()
    lo = [(c - cfg.eps).clamp(0, 1) for c in clean]
    hi = [(c + cfg.eps).clamp(0, 1) for c in clean]
    xs = [c.clone() for c in clean]
    if cfg.random_start and cfg.eps > 0:
        xs = [torch.max(torch.min(c + (torch.rand(c.shape, generator=gen) * 2 - 1).to(c) * cfg.eps, h), l)
              for c, l, h in zip(clean, lo, hi)]
    history = []
    for _ in range(cfg.steps):
        leaves = [x.detach().requires_grad_(True) for x in xs]
        with torch.enable_grad():
            loss = _loss(model, base, leaves)
            grads = torch.autograd.grad(loss.sum(), leaves)  # rows are independent: each row gets its own gradient
        history.append(loss.detach().float().cpu())
        xs = [torch.max(torch.min(x.detach() - cfg.alpha * g.sign(), h), l) for x, g, l, h in zip(leaves, grads, lo, hi)]
    with torch.no_grad():
        history.append(_loss(model, base, xs).float().cpu())
    return xs, torch.stack(history), clean_loss


def pgd_attack(
    model: Any,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    targets: Union[Sequence[str], str],
    config: PGDConfig | None = None,
    as_pil: bool = True,
    chat: bool = True,
) -> PGDResult:
    """Targeted L-inf PGD: perturb each image so the model's answer to its prompt moves towards its target.

    ``images``, ``prompts`` and ``targets`` have one entry per row (a single
    target string is used for every row).  Rows are attacked together in one
    batch (or in chunks of ``config.batch_size``).  No weight is changed and
    no parameter is left with ``.grad``; ``requires_grad`` flags and the
    train/eval mode are restored afterwards.

    >>> from interp.tiny import tiny_vlm
    >>> m = tiny_vlm("qwen2_5_vl", n_layers=2)
    >>> r = pgd_attack(m, [Image.new("RGB", (64, 64), "white")], ["name"], "a b", PGDConfig(steps=2))
    >>> float(r.linf[0]) <= 8 / 255 + 1e-6
    True
    """
    cfg = config or PGDConfig()
    images, prompts = list(images), list(prompts)
    targets = [targets] * len(prompts) if isinstance(targets, str) else list(targets)
    if not (len(images) == len(prompts) == len(targets)) or not images:
        raise ValueError(f"need one image, prompt and target per row; got {len(images)}, {len(prompts)}, {len(targets)}")
    clean = [c.float() for c in to_pixels(model, images, stack=False)]
    gen = torch.Generator().manual_seed(cfg.seed)
    step = cfg.batch_size or len(images)
    adv, hist, clean_loss = [], [], []
    with frozen_weights(model.hf_model):
        for s in range(0, len(images), step):
            xs, h, c = _attack_chunk(model, clean[s:s + step], prompts[s:s + step], targets[s:s + step], cfg, gen, chat)
            adv += [x.detach() for x in xs]
            hist.append(h)
            clean_loss.append(c)
    losses = torch.cat(hist, dim=1)
    pil, pil_diff = None, None
    if as_pil:
        pil = pixels_to_pil(adv)
        back = to_pixels(model, pil, stack=False)
        pil_diff = torch.tensor([float((a - b.to(a)).abs().max()) if a.shape == b.shape else float("inf")
                                 for a, b in zip(adv, back)])
    return PGDResult(pixels=adv, clean_pixels=[c.detach() for c in clean], images=pil, losses=losses,
                     clean_loss=torch.cat(clean_loss), final_loss=losses[-1], pil_max_diff=pil_diff, config=cfg)


__all__ = ["PGDConfig", "PGDResult", "pgd_attack"]
