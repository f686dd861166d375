"""Caching activations while generating: every step's values, joined along the positions of the sequence fed.

Why not ``run_with_cache`` on the prompt plus the generated answer (teacher forcing): hooks act per generation
step.  An eraser steers the prefill (and its first answer steps), so a teacher-forced pass with the same hooks
would steer the answer's positions as if they were prompt positions, and a pass without them would not be the
run that produced the answer.  Recording during ``generate`` gives the values the deployed model computed on its
own answer, after every hook, step by step.

>>> from interp.tiny import tiny_vlm
>>> model = tiny_vlm("llava", n_layers=2)
>>> inputs = model.encode(images=[None], prompts=["who is this"])
>>> gen, cache = model.generate_with_cache(inputs, "blocks.1.hook_resid_post", max_new_tokens=4)
>>> cache["blocks.1.hook_resid_post"].shape[1] == inputs.input_ids.shape[1] + gen.new_tokens.shape[1] - 1
True
>>> int(cache.answer_mask.sum()) == gen.new_tokens.shape[1] - 1   # the answer tokens fed back, up to EOS
True

The last generated token is never fed back to the model, so it has no activations: the cache covers the prompt
and ``new_tokens[:, :-1]``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .cache import ActivationCache
from .hooks import HookContext, HookFn, HookSpec, last_step, prefill_only
from .names import NameFilter, is_vision_side, resolve_names_except_read_only

if TYPE_CHECKING:
    from .model import Generation, HookedVLM
    from .inputs import VLMInputs

#: Sites with no per-position value over the prompt while generating: transformers computes the prefill's
#: logits at the last position only, and attention patterns grow in both query and key positions.
NOT_RECORDED_WHY = ("not recorded while generating: an attention pattern grows in both query and key positions "
                    "step by step, and the prefill computes logits at the last position only; cache them with "
                    "run_with_cache on the generated sequence")


def recorded_names(model: "HookedVLM", names: NameFilter, inputs: "VLMInputs") -> list[str]:
    """``names`` resolved for recording: attention patterns and ``hook_logits`` are refused when named and left
    out of globs; vision-side sites need images (they run on the prefill only, and are kept as it gave them)."""
    resolved = resolve_names_except_read_only(names, model.hook_names(), NOT_RECORDED_WHY)
    if not inputs.has_images:  # as run_with_cache: all names skips the vision side, naming it is an error
        vision = [n for n in resolved if is_vision_side(n)]
        if vision and names is not None:
            raise ValueError(f"{vision[:3]} are vision-side sites, but this batch has no images")
        resolved = [n for n in resolved if not is_vision_side(n)]
    given = [] if names is None or callable(names) else [names] if isinstance(names, str) else list(names)
    if "hook_logits" in given:
        raise ValueError(f"['hook_logits']: {NOT_RECORDED_WHY}")
    kept = [n for n in resolved if n != "hook_logits"]
    if not kept:
        raise ValueError(f"['hook_logits']: {NOT_RECORDED_WHY}")
    return kept


def step_semantics(hooks: HookSpec | None, every_step: bool) -> list[tuple[Any, HookFn]]:
    """``hooks`` as module hooks that act on the steps ``generate`` would apply them to.

    ``generate`` applies an unmarked function passed to it on the prefill only (on every step with
    ``every_step``), and a function marked :func:`~interp.hooks.first_steps` on its own steps; attached module
    hooks act on every step.  So an unmarked function is wrapped to act on the prefill alone, unless
    ``every_step``.
    """
    out = []
    for name, fn in hooks or ():
        if every_step or last_step(fn) is not None:
            out.append((name, fn))
        else:
            out.append((name, _prefill_wrapper(fn)))
    return out


def _prefill_wrapper(fn: HookFn) -> HookFn:
    def on_prefill(x: Tensor, ctx: HookContext) -> Optional[Tensor]:
        return fn(x, ctx) if ctx.step == 0 else None

    return prefill_only(on_prefill)


def answer_positions(new_tokens: Int[Tensor, "batch new"], n_prompt: int, eos_token_id: Any
                     ) -> Bool[Tensor, "batch pos"]:
    """Which of the ``n_prompt + new - 1`` fed positions hold a row's own answer tokens: ``new_tokens[:, :-1]``
    up to and including the row's first EOS (later positions hold the padding of a finished row)."""
    b, n = new_tokens.shape
    fed = new_tokens[:, : max(n - 1, 0)]
    valid = torch.ones_like(fed, dtype=torch.bool)
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if eos and fed.numel():
        is_eos = torch.isin(fed, torch.tensor(eos, device=fed.device))
        before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS tokens strictly before each position
        valid = before == 0
    head = torch.zeros((b, n_prompt), dtype=torch.bool, device=new_tokens.device)
    return torch.cat([head, valid], dim=1)


class _Recorder:
    """One read-only hook per name, keeping each step's value in step order."""

    def __init__(self, names: list[str]) -> None:
        self.steps: dict[str, list[tuple[int, Tensor]]] = {n: [] for n in names}

    def hooks(self) -> list[tuple[str, HookFn]]:
        def record(x: Tensor, ctx: HookContext) -> None:
            self.steps[ctx.name].append((ctx.step, x.detach().clone()))  # a clone: later modules may reuse storage
            return None

        return [(n, record) for n in self.steps]

    def joined(self, name: str, n_prompt: int, n_fed: int) -> Tensor:
        steps = self.steps[name]
        if not steps or steps[0][0] != 0:
            raise RuntimeError(f"{name!r} was not reached on the prefill pass")
        if is_vision_side(name):
            return steps[0][1]  # the vision tower and projector run on the prefill only
        values = [v for _, v in steps]
        if values[0].shape[1] != n_prompt or any(v.shape[1] != 1 for v in values[1:]):
            shapes = [tuple(v.shape) for v in values[:3]]
            raise RuntimeError(f"{name!r} recorded shapes {shapes}..., not [batch, {n_prompt}, ...] at the prefill "
                               "and one position per later step")
        return torch.cat(values[: n_fed - n_prompt + 1], dim=1)


def generate_with_cache(model: "HookedVLM", inputs: "VLMInputs", names: NameFilter = None, max_new_tokens: int = 32,
                        hooks: HookSpec | None = None, every_step: bool = False, **generate_kwargs: Any
                        ) -> tuple["Generation", ActivationCache]:
    """:meth:`HookedVLM.generate` that also returns an :class:`ActivationCache` over the prompt and the answer
    tokens fed back; see the module docstring.  The cache's ``answer_mask`` marks the answer positions
    (:meth:`ActivationCache.answer`); ``image_mask``, ``text_mask`` and ``last_index`` describe the prompt.

    Values are recorded after every hook at the site: those given here (on the steps ``generate`` would apply
    them to) and those attached with ``model.hooks(...)`` (an ``eraser.attached`` block) on the plain-PyTorch
    backend.  Hooks attached on the nnsight backend would run after the recording, so they are refused.
    """
    if model._persistent:
        raise ValueError("generate_with_cache records with plain module hooks, which would run before the hooks "
                         "attached with model.hooks(..., backend='nnsight'); attach them with backend='torch' "
                         "(the default) or pass them as hooks=")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    chosen = recorded_names(model, names, inputs)
    recorder = _Recorder(chosen)
    with model.hooks(step_semantics(hooks, every_step) + recorder.hooks(), backend="torch"):
        gen = model.generate(inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    n_prompt = inputs.input_ids.shape[1]
    n_fed = n_prompt + gen.new_tokens.shape[1] - 1
    acts = {n: recorder.joined(n, n_prompt, n_fed) for n in chosen}
    pad = torch.zeros((inputs.batch_size, n_fed - n_prompt), dtype=torch.bool, device=inputs.image_mask.device)
    eos = generate_kwargs.get("eos_token_id", model.tokenizer.eos_token_id)
    cache = ActivationCache(acts, torch.cat([inputs.image_mask, pad], 1), torch.cat([inputs.text_mask, pad], 1),
                            inputs.last_index, inputs.image_kwargs.get("image_grid_thw"),
                            answer_mask=answer_positions(gen.new_tokens, n_prompt, eos).to(inputs.image_mask.device))
    return gen, cache
