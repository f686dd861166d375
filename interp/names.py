"""Hook names: the TransformerLens-style grammar every site in a VLM is addressed by.

Why a grammar and not free strings: a layer sweep written against
``blocks.{l}.hook_resid_pre`` must run unchanged on LLaVA, Qwen2.5-VL and the
next architecture, and a typo must fail at once with the closest valid names,
not run silently on nothing.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Callable, Iterable, Sequence, Union

# Per-block sites in execution order; the language model and the vision tower share them.
BLOCK_SITES = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")

NameFilter = Union[str, Sequence[str], Callable[[str], bool], None]

_BLOCK_RE = re.compile(r"^(?P<prefix>vision\.)?blocks\.(?P<layer>\d+)\.(?P<site>\w+)$")


class HookNameError(KeyError):
    """An unknown hook name; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message, hiding newlines
        return str(self.args[0])


def all_hook_names(n_layers: int, n_vision_layers: int) -> list[str]:
    """Every hook name of a model with these depths, in execution order (vision -> projector -> LM -> logits)."""
    names = ["vision.hook_embed"]
    names += [f"vision.blocks.{l}.{s}" for l in range(n_vision_layers) for s in BLOCK_SITES]
    names += ["projector.hook_in", "projector.hook_out", "hook_embed"]
    names += [f"blocks.{l}.{s}" for l in range(n_layers) for s in BLOCK_SITES]
    names += ["ln_final.hook_normalized", "hook_logits"]
    return names


def parse_block_name(name: str) -> tuple[str, int, str] | None:
    """``"vision.blocks.3.hook_attn_out"`` -> ``("vision", 3, "hook_attn_out")``; ``("lm", l, site)`` for LM blocks; None otherwise."""
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


def sort_by_execution(names: Iterable[str], valid: Sequence[str]) -> list[str]:
    order = {n: i for i, n in enumerate(valid)}
    return sorted(names, key=order.__getitem__)
