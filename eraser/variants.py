"""The MLLMEraser variants every command and the demo run: the method, its ablations, and one extension.

Why a module of its own: the command line's choices (``eval --method
mllmeraser``, ``fit --variant``), the pipeline that fits each variant and the
demo all read this one table, so adding a variant is one line here.  A
variant is a set of :class:`~eraser.method.EraserConfig` field changes plus
four switches that are not config: ``pgd`` (False: clean recall images, the text-only direction),
``gated`` (False: static steering, the same direction on every input), ``window`` (True: a
saturating gate window chosen on the validation split, :func:`eraser.autotune.choose_window`) and
``retain_requests`` (True: ordinary requests about retain people join the retain set,
:func:`eraser.pairs.answerable_requests`).
"""
from __future__ import annotations

from typing import Any

__all__ = ["ERASER_VARIANTS", "NOT_CONFIG"]

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
}

#: Variant switches that are not EraserConfig fields.
NOT_CONFIG = ("pgd", "gated", "window", "retain_requests")
