"""The bridge from a :class:`~interp.HookedVLM` to the model-agnostic evaluator.

Why closures: :mod:`eraser.evaluate` reaches a model only through
``generate(images, prompts, max_new_tokens) -> answers`` and
``nll(images, prompts, answers) -> mean token NLLs``, so the same evaluator
scores the vanilla model, the eraser (``hooks``), fine-tuned baselines and
real checkpoints.  Both closures batch internally (``batch_size`` rows per
forward pass, left-padded by :meth:`HookedVLM.encode`), so callers may hand
over any number of rows; results come back in input order and equal the
unbatched calls (left padding plus the attention mask keep rows independent).

>>> from interp.tiny import tiny_vlm
>>> model = tiny_vlm("llava", n_layers=1)
>>> gen = generate_fn(model)
>>> len(gen([None, None], ["who is this person", "what is the name"], 3))
2
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image

from interp.hooks import HookSpec
from interp.model import HookedVLM

__all__ = ["generate_fn", "nll_fn", "GenerateFn", "NllFn"]

GenerateFn = Callable[[Sequence[Image.Image | None], Sequence[str], int], list[str]]
NllFn = Callable[[Sequence[Image.Image | None], Sequence[str], Sequence[str]], list[float]]


def _check(images: Sequence[Any] | None, prompts: Sequence[str], what: str) -> list[Any]:
    prompts = list(prompts)
    images = [None] * len(prompts) if images is None else list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{what}: got {len(images)} images for {len(prompts)} prompts")
    return images


def _order(images: Sequence[Any]) -> list[int]:
    """Image rows first, then text-only rows: homogeneous batches pad less and never mix processors' inputs."""
    return [i for i, im in enumerate(images) if im is not None] + [i for i, im in enumerate(images) if im is None]


def generate_fn(model: HookedVLM, batch_size: int = 32, hooks: HookSpec | None = None, every_step: bool = False,
                **generate_kwargs: Any) -> GenerateFn:
    """``(images, prompts, max_new_tokens) -> answers``: batched greedy generation (EOS-cut, prompt excluded).

    ``hooks`` (e.g. the eraser's steering hooks) run on the prefill pass, or
    on every step with ``every_step=True``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def generate(images: Sequence[Image.Image | None] | None, prompts: Sequence[str], max_new_tokens: int = 50,
                 ) -> list[str]:
        ims = _check(images, prompts, "generate")
        prompts_l = list(prompts)
        out: list[str | None] = [None] * len(prompts_l)
        order = _order(ims)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = model.encode([ims[i] for i in idx], [prompts_l[i] for i in idx])
            texts = model.generate(enc, max_new_tokens=max_new_tokens, hooks=hooks, every_step=every_step,
                                   **generate_kwargs).texts
            for i, t in zip(idx, texts):
                out[i] = t
        return out  # type: ignore[return-value]

    return generate


def nll_fn(model: HookedVLM, batch_size: int = 32, hooks: HookSpec | None = None) -> NllFn:
    """``(images, prompts, answers) -> mean token NLL`` of each answer (answer tokens + EOS), batched."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def nll(images: Sequence[Image.Image | None] | None, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        ims = _check(images, prompts, "nll")
        prompts_l, answers_l = list(prompts), list(answers)
        if len(answers_l) != len(prompts_l):
            raise ValueError(f"nll: got {len(answers_l)} answers for {len(prompts_l)} prompts")
        out: list[float] = [0.0] * len(prompts_l)
        order = _order(ims)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = model.encode([ims[i] for i in idx], [prompts_l[i] for i in idx],
                                   answers=[answers_l[i] for i in idx])
                vals = model.answer_nll(enc, hooks=hooks)
                for i, v in zip(idx, vals.tolist()):
                    out[i] = float(v)
        return out

    return nll
