"""Peak resident memory of a stretch of work, not of the whole process.

Why not ``ru_maxrss`` alone: it is the process's lifetime peak, so when building
the model peaks higher than the work measured afterwards (temporary copies at
initialisation), the work shows as "+0". Linux lets a process reset its
high-water mark (writing ``5`` to ``/proc/self/clear_refs``, kernel >= 4.0);
:func:`peak_rss` then reads the peak of what ran after the reset.
Elsewhere it falls back to ``ru_maxrss`` (the peak since the process started) and
:func:`reset_peak` says it could not reset.
"""
from __future__ import annotations

import re
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def current_rss() -> int:
    """Resident bytes now (the ``ru_maxrss`` peak where ``/proc`` is missing)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else _rusage_peak()


def _rusage_peak() -> int:
    """``ru_maxrss`` in bytes (Linux reports KiB; on Linux a :func:`reset_peak` resets it too)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the resident high-water mark to the current size; False where the OS cannot."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def peak_rss() -> int:
    """The resident high-water mark in bytes: since the last :func:`reset_peak`, else since the start."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else _rusage_peak()
