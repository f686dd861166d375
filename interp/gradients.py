"""Gradients of a metric with respect to activations: one forward and one backward pass, weights untouched.

Why: a patching experiment costs a forward pass per site (and per head, per position), which at 7B sizes
is the budget of a whole study.  The gradient of the metric with respect to every site's activation comes
from one backward pass, and it is what attribution patching (:mod:`interp.attribution_patching`), saliency
maps over image tokens and gradient-based probes are made of.

How: each requested site gets a plain module hook that adds a zero tensor with ``requires_grad`` to the
activation (``x + d``, the same value), and the gradient with respect to ``d`` is the gradient with respect to
the activation at that site, through every later path.  The weights are frozen for the call (no weight
gradients are built, so the backward pass costs what the activations' gradients cost) and restored after,
with the module's train/eval mode; nothing is left in any ``.grad``.

>>> from interp.tiny import tiny_vlm
>>> from interp.patching import answer_logprob
>>> model = tiny_vlm("llava", n_layers=2)
>>> inputs = model.encode(images=[None], prompts=["who is this"])
>>> run = run_with_grads(model, inputs, "blocks.*.hook_resid_post", answer_logprob(5))
>>> run.grads["blocks.1.hook_resid_post"].shape == run.acts["blocks.1.hook_resid_post"].shape
True
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .cache import ActivationCache
from .hooks import HookContext, HookSpec
from .inputs import VLMInputs
from .names import NameFilter, is_vision_side, resolve_names_except_read_only
from .patching import Metric
from .torch_hooks import active_inputs

if TYPE_CHECKING:
    from .model import HookedVLM

NO_GRAD_WHY = ("attention patterns have no gradient here: they are used inside the attention function, where "
               "no hook reaches; take gradients at attn.hook_q / attn.hook_k / attn.hook_z instead")


@contextlib.contextmanager
def frozen_weights(module: torch.nn.Module) -> Iterator[None]:
    """Parameters without ``requires_grad`` and the module in eval mode, both restored on exit.

    Why: gradients with respect to inputs or activations need no weight gradients (their memory is a copy of
    the model), and eval mode makes the differentiated forward the deployed, deterministic one.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    training = module.training
    for p in params:
        p.requires_grad_(False)
    module.eval()
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        module.train(training)


@dataclass
class GradRun:
    """One differentiated forward pass: the metric per row, and each site's activation and gradient.

    ``grads[name]`` is ``d sum(values) / d acts[name]``; rows of a batch do not interact, so each row's slice
    is the gradient of that row's own metric.  Both caches slice by modality like any
    :class:`~interp.ActivationCache` (``run.grads.image(name)``).
    """

    values: Float[Tensor, " batch"]
    logits: Float[Tensor, "batch pos vocab"]
    acts: ActivationCache
    grads: ActivationCache


def gradient_names(model: "HookedVLM", names: NameFilter, inputs: VLMInputs) -> list[str]:
    """``names`` resolved for gradients: attention patterns refused when named and left out of globs; vision-side
    sites need images (named ones are an error without, ``None`` means every site the batch runs)."""
    resolved = resolve_names_except_read_only(names, model.hook_names(), NO_GRAD_WHY)
    if not inputs.has_images:
        vision = [n for n in resolved if is_vision_side(n)]
        if vision and names is not None:
            raise ValueError(f"{vision[:3]} are vision-side sites, but this batch has no images")
        resolved = [n for n in resolved if not is_vision_side(n)]
    if not resolved:
        raise ValueError(f"no site to differentiate at in {names!r}")
    return resolved


def run_with_grads(model: "HookedVLM", inputs: VLMInputs, names: NameFilter, metric: Metric,
                   hooks: HookSpec | None = None, reads: Sequence[str] = ()) -> GradRun:
    """Run ``inputs`` once with gradients and return ``metric``'s per-row values, the activations at ``names``
    and the gradient of the summed metric with respect to each of them.

    ``reads`` are more sites whose activations are wanted without a gradient (in ``acts``, not ``grads``): a
    7B model's gradient at every site it reads would double the memory for nothing.

    ``hooks`` (e.g. steering) act in the same pass, before the site's gradient is taken, so activations and
    gradients are those of the hooked run; hooks attached with ``model.hooks(...)`` on the plain-PyTorch
    backend act too.  Hooks attached on the nnsight backend are refused (this pass runs without a trace).
    ``metric(logits, inputs)`` must be differentiable (:func:`interp.patching.logit_diff` and
    :func:`~interp.patching.answer_logprob` are).
    """
    if model._persistent:
        raise ValueError("run_with_grads runs plain module hooks, not a trace, so hooks attached with "
                         "model.hooks(..., backend='nnsight') would not act; attach them with backend='torch' "
                         "(the default) or pass them as hooks=")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("run_with_grads cannot run inside torch.inference_mode(): no tensor made there can carry "
                           "a gradient; call it outside the block (torch.no_grad() is fine: it is lifted here)")
    chosen = gradient_names(model, names, inputs)
    read_only = [n for n in (gradient_names(model, list(reads), inputs) if reads else []) if n not in chosen]
    acts: dict[str, Tensor] = {}
    leaves: dict[str, Tensor] = {}

    def record(x: Tensor, ctx: HookContext) -> None:
        acts[ctx.name] = x.detach()

    def capture(x: Tensor, ctx: HookContext) -> Tensor:
        leaf = torch.zeros_like(x, requires_grad=True)
        acts[ctx.name], leaves[ctx.name] = x.detach(), leaf
        return x + leaf

    with frozen_weights(model.hf_model), torch.enable_grad(), \
            model.hooks(list(hooks or []) + [(n, capture) for n in chosen] + [(n, record) for n in read_only],
                        backend="torch"), active_inputs(inputs):
        logits = model.hf_model(**inputs.model_kwargs()).logits
        values = metric(logits, inputs)
        if values.dim() != 1 or values.shape[0] != inputs.batch_size:
            raise ValueError(f"metric must return one value per row, shape [{inputs.batch_size}], "
                             f"got {tuple(values.shape)}")
        missing = [n for n in chosen if n not in leaves] + [n for n in read_only if n not in acts]
        if missing:
            raise RuntimeError(f"{missing[:3]} never ran in this forward pass")
        if not values.requires_grad:
            raise ValueError("the metric does not depend on the logits differentiably (no gradient flows back)")
        grads = torch.autograd.grad(values.sum(), [leaves[n] for n in chosen], allow_unused=True)
    grads_by_name = {n: (torch.zeros_like(acts[n]) if g is None else g.detach()) for n, g in zip(chosen, grads)}
    grid = inputs.image_kwargs.get("image_grid_thw")

    def cache(d: dict[str, Tensor]) -> ActivationCache:
        return ActivationCache(d, inputs.image_mask, inputs.text_mask, inputs.last_index, grid)

    return GradRun(values=values.detach(), logits=logits.detach(), acts=cache(acts), grads=cache(grads_by_name))
