"""The MLLMEraser variants every command and the demo run: the method, its ablations, and one extension.

Why a module of its own: the command line's choices (``eval --method
mllmeraser``, ``fit --variant``), the pipeline that fits each variant and the
demo all read this one table, so adding a variant is one line here.  A
variant is a set of :class:`~eraser.method.EraserConfig` field changes plus
switches that are not config: ``pgd`` (False: clean recall images, the text-only direction),
``gated`` (False: static steering, the same direction on every input), ``window`` (True: a
saturating gate window chosen on the validation split, :func:`eraser.autotune.choose_window`) and
``retain_requests`` (True: ordinary requests about retain people join the retain set,
:func:`eraser.pairs.answerable_requests`), ``stack`` (k: one gate over the last k steered layers'
reads, stacked, steering the layers from the last of them on; :func:`stacked_layers`) and
``retain_per_feature`` (k: the retain statistics stream a seeded sample of k x the gate's width retain
questions instead of all of them, :func:`eraser.pipeline.retain_budget`).
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["ERASER_VARIANTS", "GATED_VARIANTS", "NOT_CONFIG", "stacked_layers"]

ERASER_VARIANTS: dict[str, dict[str, Any]] = {
    "mllmeraser": {},
    "mllmeraser_no_nullspace": {"use_null_space": False},
    "steer_static": {"gated": False},
    "mllmeraser_text_only": {"pgd": False},
    # An extension, not the paper: the gate reads the mean over the prompt instead of the last token.
    "mllmeraser_mean_gate": {"gate_read": "mean"},
    # An extension: the mean gate, saturated by a window (0 under the retain gates' 99th percentile, 1 over twice it).
    "mllmeraser_window_gate": {"gate_read": "mean", "window": True},
    # An extension: the window gate with one gate per forget person, steering by the most forget-like one,
    # and a retain set that also holds ordinary requests about retain people.
    "mllmeraser_concept_gate": {"gate_read": "mean", "window": True, "concept_gates": True, "retain_requests": True},
    # An extension: per-person window gates over the prompt means of the last three steered layers' inputs,
    # stacked (wider than one layer, so 125 retain identities still leave forget directions free), and the
    # first three answer tokens steered along the answer direction with the prompt's gate; its retain
    # statistics come from 2 retain questions per gate feature (768 of 4125 on the default model), not all.
    "mllmeraser_stacked_gate": {"gate_read": "mean", "window": True, "concept_gates": True, "stack": 3,
                                "answer_steps": 3, "retain_per_feature": 2},
}

#: Variant switches that are not EraserConfig fields.
NOT_CONFIG = ("pgd", "gated", "window", "retain_requests", "stack", "retain_per_feature")

#: The variants that are erasers (gated); ``steer_static`` is an ablation, applied with ``gated=False``.
GATED_VARIANTS: tuple[str, ...] = tuple(sorted(v for v, opts in ERASER_VARIANTS.items() if opts.get("gated", True)))


def stacked_layers(layers: Sequence[int], k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(gate_stack, steered)`` for the ``stack: k`` switch: the last ``k`` of ``layers`` are read, stacked,
    and the layers from the last of them on are steered (one causal pass: :func:`eraser.features.check_stack`).

    On a 4-layer model with layers 1-3 and k = 3 the gate reads layers 1, 2, 3 and steers layer 3 alone.
    For a deep model, set ``EraserConfig.gate_stack`` and ``layers`` directly (e.g. read a few middle layers,
    steer every later one): a stack of every layer would need an F x F second moment with F = n_layers * d.
    """
    layers = sorted(layers)
    if k < 1 or not layers:
        raise ValueError(f"a stacked gate needs k >= 1 and some layers, got k={k}, layers={layers}")
    stack = tuple(layers[-k:])
    return stack, tuple(l for l in layers if l >= stack[-1])
