"""What each gate reads: one site per steered layer (the paper), or one stack of sites for a single gate.

Why a module of its own: the fit's statistics (:meth:`eraser.method.MLLMEraser.collect_stats`), the
automatic choice of gamma and the null space (:func:`eraser.autotune.choose_gate`) and the diagnostics
must all turn a model's activations into exactly the rows the deployed gate scores, or the fitted
weights would be scored on other features than they were fitted on.

A *gate row* is one gate's input.  Per layer (``gate_stack`` None) there is one row per steered layer,
its own site's read.  Stacked (``gate_stack`` a tuple of layers) there is one row for the whole eraser:
the reads at those layers' sites, concatenated in layer order.  Why stack: in a model whose single
layer is too narrow to keep every retain identity out of a null space (the default model: d_model 128,
130 identities), the concatenation of several layers' reads still separates forget from retain people
(measured on the default model: calibrated validation margin 1.17 at the best single layer, 2.0 for
layers 1-3 stacked; ``analyses/stacked_gate.py``).  Steering stays causal: every steered layer comes at
or after the last stacked layer, so one forward pass has read every stacked site before it is steered.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["site_name", "row_names", "gate_rows", "read_names", "row_features", "stream_rows", "gate_row_stream",
           "check_stack"]


def site_name(site: str, layer: int) -> str:
    """The hook name of the method's ``site`` (``resid_pre`` / ``resid_post``) at decoder ``layer``."""
    return f"blocks.{layer}.hook_{site}"


def row_names(site: str, layers: Sequence[int], stack: Sequence[int] | None = None) -> list[list[str]]:
    """Per gate row, the hook names whose reads it concatenates, in order: one row per steered layer (its own
    site), or with ``stack`` one row over the stacked layers' sites."""
    if stack:
        return [[site_name(site, l) for l in stack]]
    return [[site_name(site, l)] for l in layers]


def check_stack(stack: Sequence[int], steered: Sequence[int], n_layers: int) -> None:
    """Raise unless a stacked gate over ``stack`` can steer ``steered`` in one causal pass."""
    bad = [l for l in stack if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"gate_stack layers {bad} are not decoder layers of this {n_layers}-layer model")
    early = [l for l in steered if l < max(stack)]
    if early:
        raise ValueError(f"a stacked gate reads layers {list(stack)}, so it cannot steer the earlier layers {early}: "
                         f"one forward pass has not read layer {max(stack)} yet when they run "
                         f"(steer layers >= {max(stack)})")


def gate_rows(config: Any, layers: Sequence[int]) -> list[list[str]]:
    """Per gate row, the hook names whose reads it concatenates, in order.

    ``config`` is an :class:`~eraser.config.EraserConfig` (its ``site`` and ``gate_stack``); ``layers`` the
    steered layers.
    """
    return row_names(config.site, layers, config.gate_stack)


def read_names(rows: list[list[str]]) -> list[str]:
    """Every hook name the rows read, once each, in order: what to collect for :func:`row_features`."""
    return list(dict.fromkeys(n for row in rows for n in row))


def row_features(batch: dict[str, Float[Tensor, "batch d"]], rows: list[list[str]]
                 ) -> list[Float[Tensor, "batch f"]]:
    """Each gate row's input for one batch of reads ``{name: [batch, d]}`` (e.g. from ``iter_query_activations``)."""
    missing = sorted({n for row in rows for n in row} - set(batch))
    if missing:
        raise KeyError(f"gate features need reads at {missing}")
    return [batch[row[0]] if len(row) == 1 else torch.cat([batch[n] for n in row], dim=-1) for row in rows]


def gate_row_stream(model: Any, queries: Sequence[Any], config: Any, layers: Sequence[int],
                    progress: bool = False, desc: str = "gate rows", batch_size: int | None = None
                    ) -> Iterator[list[Float[Tensor, "batch f"]]]:
    """Per batch of ``queries`` (``(images, prompt)`` pairs) through ``model`` (a ``HookedVLM``), what each gate
    row reads: ``[rows]`` of ``[batch, F]``.

    The same features the fit's statistics, the diagnostics and the deployed gate read; ``batch_size`` None
    takes ``config.batch_size``.
    """
    queries = list(queries)
    yield from stream_rows(model, [q[0] for q in queries], [q[1] for q in queries], gate_rows(config, layers),
                           config.gate_read, batch_size or config.batch_size, progress, desc)


def stream_rows(model: Any, images: Sequence[Any], prompts: Sequence[str], rows: list[list[str]], read: str = "last",
                batch_size: int = 32, progress: bool = False, desc: str = "gate rows"
                ) -> Iterator[list[Float[Tensor, "batch f"]]]:
    """Per batch of queries, each of ``rows``' features read as ``read`` (``"last"`` token or prompt ``"mean"``)."""
    from interp.collect import iter_query_activations  # the model-running part; the rest here is pure

    yield from (row_features(batch, rows) for batch in iter_query_activations(
        model, images, prompts, read_names(rows), batch_size, progress=progress, desc=desc, read=read))
