"""Gate diagnostics: what each layer's gate sees, and how far steering moves activations.

The paper pictures the activation shift; reviewers asked for it measured.
For every query set we record, per steered layer, the gate value
``g_l(h_T)`` on the steered run (so later layers see earlier steering, as in
deployment) and the scalar projection of the last-token activation on the
erasure direction before and after steering, plus firing rates.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from interp import HookedVLM

from .direction import projection
from .method import MLLMEraser, Query
from .metrics import gate_firing_rates


def _batches(queries: Sequence[Query], size: int):
    for s in range(0, len(queries), size):
        chunk = queries[s:s + size]
        yield [q[0] for q in chunk], [q[1] for q in chunk]


def gate_report(model: HookedVLM, eraser: MLLMEraser, sets: dict[str, Sequence[Query]], batch_size: int = 64,
                strength: float | None = None, threshold: float = 0.5) -> dict[str, Any]:
    """``{"layers", "strength", "sets": {name: {"gate", "proj_before", "proj_after"}}, "firing": {...}}`` (lists, JSON-ready)."""
    names = [eraser.config.hook_name(l) for l in eraser.layers]
    lam = eraser.config.strength if strength is None else strength
    out: dict[str, Any] = {"layers": eraser.layers, "strength": lam, "sets": {}}
    for set_name, queries in sets.items():
        if not queries:
            raise ValueError(f"query set {set_name!r} is empty")
        gates, before, after = [], [], []
        for imgs, prompts in _batches(list(queries), batch_size):
            inputs = model.encode(images=imgs, prompts=prompts)
            record: list = []
            _, base = model.run_with_cache(inputs, names=names)
            _, steered = model.run_with_cache(inputs, names=names, hooks=eraser.hooks(lam, record=record))
            by_layer = {layer: g for layer, step, g in record if step == 0}
            gates.append(torch.stack([by_layer[l] for l in eraser.layers], dim=1))
            before.append(torch.stack([projection(base.last(n), eraser.d[i]) for i, n in enumerate(names)], dim=1))
            after.append(torch.stack([projection(steered.last(n), eraser.d[i]) for i, n in enumerate(names)], dim=1))
        out["sets"][set_name] = {k: torch.cat(v).tolist() for k, v in
                                 (("gate", gates), ("proj_before", before), ("proj_after", after))}
    if "forget" in out["sets"] and "retain" in out["sets"]:
        gf = torch.tensor(out["sets"]["forget"]["gate"])
        gr = torch.tensor(out["sets"]["retain"]["gate"])
        out["firing"] = {str(l): gate_firing_rates(gf[:, i], gr[:, i], threshold) for i, l in enumerate(eraser.layers)}
    return out
