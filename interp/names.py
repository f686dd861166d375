"""Hook names: the TransformerLens-style grammar every site in a VLM is addressed by.

Why a grammar and not free strings: a layer sweep written against
``blocks.{l}.hook_resid_pre`` must run unchanged on LLaVA, Qwen2.5-VL and the
next architecture, and a typo must fail at once with the closest valid names,
not run silently on nothing.

A block name is ``[vision.]blocks.{l}.{site}``: ``site`` is one of the five
residual-level sites every architecture has (:data:`BLOCK_SITES`) or one of
the finer ones inside attention and the MLP that the architecture's adapter
declares (:data:`SITE_ORDER`: ``ln1.hook_normalized``, ``attn.hook_z``,
``mlp.hook_post``, ...).

>>> parse_block_name("blocks.3.attn.hook_z")
('lm', 3, 'attn.hook_z')
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Callable, Iterable, Sequence, Union

# The residual-level sites of every block, in execution order; every architecture has all five.
BLOCK_SITES = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")

#: Every per-block site, residual-level and inside attention and MLP, in the order a forward pass makes them
#: observable.  TransformerLens's names; an architecture's adapter declares which of the finer ones it has.
#: ``attn.hook_pattern`` is listed after ``attn.hook_z`` (not before, as TransformerLens lists it) because the
#: attention weights leave the attention module with its output, after the output projection has read ``z``.
SITE_ORDER = (
    "hook_resid_pre",
    "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern",
    "hook_attn_out", "hook_resid_mid",
    "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post",
    "hook_mlp_out", "hook_resid_post",
)

#: Sites a hook may read but not replace (the attention weights are consumed inside the attention function).
READ_ONLY_SITES = ("attn.hook_pattern",)

NameFilter = Union[str, Sequence[str], Callable[[str], bool], None]

_BLOCK_RE = re.compile(r"^(?P<prefix>vision\.)?blocks\.(?P<layer>\d+)\.(?P<site>(?:\w+\.)?\w+)$")


class HookNameError(KeyError):
    """An unknown hook name; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message, hiding newlines
        return str(self.args[0])


def all_hook_names(n_layers: int, n_vision_layers: int, lm_sites: Sequence[str] = BLOCK_SITES,
                   vision_sites: Sequence[str] = BLOCK_SITES) -> list[str]:
    """Every hook name of a model with these depths, in execution order (vision -> projector -> LM -> logits).

    ``lm_sites`` / ``vision_sites`` are the per-block sites the architecture has (default: the five
    residual-level ones); they are put in :data:`SITE_ORDER`.
    """
    lm_sites, vision_sites = _ordered_sites(lm_sites), _ordered_sites(vision_sites)
    names = ["vision.hook_embed"]
    names += [f"vision.blocks.{l}.{s}" for l in range(n_vision_layers) for s in vision_sites]
    names += ["projector.hook_in", "projector.hook_out", "hook_embed"]
    names += [f"blocks.{l}.{s}" for l in range(n_layers) for s in lm_sites]
    names += ["ln_final.hook_normalized", "hook_logits"]
    return names


def _ordered_sites(sites: Sequence[str]) -> list[str]:
    unknown = sorted(set(sites) - set(SITE_ORDER))
    if unknown:
        raise ValueError(f"unknown per-block sites {unknown}; known: {SITE_ORDER}")
    missing = [s for s in BLOCK_SITES if s not in sites]
    if missing:
        raise ValueError(f"every architecture has the residual-level sites; missing {missing}")
    return [s for s in SITE_ORDER if s in sites]


def is_vision_side(name: str) -> bool:
    """Sites of the vision tower and projector: no prompt positions, one row per image (or per patch for Qwen)."""
    return name.startswith(("vision.", "projector."))


def is_read_only(name: str) -> bool:
    """Whether ``name`` is a site hooks may read but not replace (:data:`READ_ONLY_SITES`)."""
    parsed = parse_block_name(name)
    return parsed is not None and parsed[2] in READ_ONLY_SITES


def parse_block_name(name: str) -> tuple[str, int, str] | None:
    """``"vision.blocks.3.hook_attn_out"`` -> ``("vision", 3, "hook_attn_out")``; ``("lm", l, site)`` for LM blocks
    (``site`` may be dotted: ``"attn.hook_z"``); None otherwise."""
    m = _BLOCK_RE.match(name)
    if m is None:
        return None
    return ("vision" if m.group("prefix") else "lm", int(m.group("layer")), m.group("site"))


def layer_of(name: str) -> int | None:
    """The block index a name refers to, or None for non-block sites."""
    parsed = parse_block_name(name)
    return None if parsed is None else parsed[1]


def closest_names(name: str, valid: Sequence[str], n: int = 5) -> list[str]:
    """Up to ``n`` names of ``valid`` that look like ``name`` (for error messages)."""
    return difflib.get_close_matches(name, valid, n=n, cutoff=0.5)


def unknown_name_error(name: str, valid: Sequence[str]) -> HookNameError:
    close = closest_names(name, valid)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    return HookNameError(
        f"unknown hook name {name!r}.{hint} Call model.hook_names() for all {len(valid)} valid names."
    )


def resolve_names(spec: NameFilter, valid: Sequence[str]) -> list[str]:
    """Turn a list, a glob string or a predicate into valid names, in execution order.

    A glob that matches nothing and an explicit unknown name are both errors:
    an empty cache is never what the caller meant.
    """
    order = {n: i for i, n in enumerate(valid)}
    if spec is None:
        return list(valid)
    if callable(spec):
        chosen = [n for n in valid if spec(n)]
        if not chosen:
            raise HookNameError("the name filter function matched no hook name")
        return chosen
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise HookNameError("no hook names given (an empty list)")
    chosen: set[str] = set()
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"hook names must be strings, got {type(pat).__name__}")
        if any(ch in pat for ch in "*?["):
            hits = fnmatch.filter(valid, pat)
            if not hits:
                raise unknown_name_error(pat, valid)
            chosen.update(hits)
        elif pat in order:
            chosen.add(pat)
        else:
            raise unknown_name_error(pat, valid)
    return sorted(chosen, key=order.__getitem__)


def resolve_names_except_read_only(spec: NameFilter, valid: Sequence[str], why: str) -> list[str]:
    """:func:`resolve_names`, for tools that must write to (or take one vector per position from) every site.

    Read-only sites (:data:`READ_ONLY_SITES`, the attention patterns) are left out of what a glob or
    predicate matches; naming one outright, or a filter that matches nothing else, is a ValueError
    that gives ``why``.
    """
    resolved = resolve_names(spec, valid)
    read_only = [n for n in resolved if is_read_only(n)]
    if not read_only:
        return resolved
    given = [] if spec is None or callable(spec) else [spec] if isinstance(spec, str) else list(spec)
    named = [n for n in read_only if n in given]
    kept = [n for n in resolved if not is_read_only(n)]
    if named or not kept:
        raise ValueError(f"{(named or read_only)[:3]}: {why}")
    return kept


def sort_by_execution(names: Iterable[str], valid: Sequence[str]) -> list[str]:
    order = {n: i for i, n in enumerate(valid)}
    return sorted(names, key=order.__getitem__)
