"""Queries, the method's unit of data: ``(image or None, prompt)`` pairs, checked and hashed one way.

Why a module of its own: the eraser, its erasure direction and its gate all take query sets, and each
must refuse the same bad input (an empty set, an ``(image, prompt, answer)`` triple whose answer would be
dropped silently) and tie an artifact to its data with the same hash.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

Query = tuple[Any, str]

__all__ = ["Query", "split_queries", "hash_queries"]


def split_queries(queries: Sequence[Query], what: str) -> tuple[list, list[str]]:
    """``(images, prompts)`` of a non-empty sequence of ``(image or None, prompt)`` pairs; ``what`` names the set
    in the error."""
    queries = list(queries)
    if not queries:
        raise ValueError(f"the {what} set is empty; MLLMEraser needs at least one {what} query")
    bad = [i for i, q in enumerate(queries)
           if not isinstance(q, (tuple, list)) or len(q) != 2 or not isinstance(q[1], str)]
    if bad:
        q = queries[bad[0]]
        hint = ("an answer is not used: the method reads the prompt's activations; pass (image, prompt)"
                if isinstance(q, (tuple, list)) and len(q) > 2 else "a single pair? wrap it in a list")
        raise ValueError(f"the {what} set must be a sequence of (image or None, prompt) pairs; item {bad[0]} is "
                         f"{type(q).__name__} {str(q)[:60]!r} ({hint})")
    return [q[0] for q in queries], [q[1] for q in queries]


def hash_queries(queries: Sequence[Query]) -> str:
    """A stable hash of the queries (prompts and image bytes), the same in every process.

    A row with several images hashes each one's bytes, size and mode: hashing the list's ``repr`` (memory
    addresses) gave the same forget set another hash in every process.  Single images keep the original
    scheme, so the hashes stored in existing artifacts stay valid.
    """
    h = hashlib.sha256()
    for image, prompt in queries:
        h.update(prompt.encode())
        if isinstance(image, (list, tuple)):
            h.update(f"[{len(image)} images]".encode())
            for im in image:
                h.update(f"{getattr(im, 'mode', type(im).__name__)}{getattr(im, 'size', getattr(im, 'shape', ''))}"
                         .encode())
                h.update(im.tobytes() if hasattr(im, "tobytes") else repr(im).encode())
        elif image is not None:
            h.update(image.tobytes() if hasattr(image, "tobytes") else repr(image).encode())
    return h.hexdigest()[:16]
