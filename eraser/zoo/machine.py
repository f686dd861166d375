"""Which machine trained a checkpoint: CPU model, vendor, torch's CPU kernels and threads.

Why it is recorded: the same recipe, seed and library versions train a different model on another CPU
(the float kernels differ in their summation order), and on the quick model that was enough to move
a method test across its bar (forget multiple choice 0 on an AMD EPYC's model, 0.091 on an Intel Xeon's).
A cached checkpoint's ``train_log.json`` and every ``results.json`` (``config.trained_on``) therefore say
where the model was trained, so two runs' numbers are compared knowing whether the models can differ.
"""
from __future__ import annotations

import platform
from typing import Any

import torch

__all__ = ["machine_info"]

CPUINFO = "/proc/cpuinfo"


def _cpuinfo(path: str | None = None) -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        with open(path or CPUINFO, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def machine_info() -> dict[str, Any]:
    """``{"cpu", "vendor", "arch", "torch", "cpu_capability", "threads"}``: JSON-ready strings and an int."""
    info = _cpuinfo()
    return {"cpu": info.get("model name") or platform.processor() or "unknown",
            "vendor": info.get("vendor_id", "unknown"), "arch": platform.machine() or "unknown",
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}
