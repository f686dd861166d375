"""Every research script's --help is its whole docstring with each option's default; --device is checked when parsed."""
from __future__ import annotations

import argparse
import importlib

import pytest

from analyses._cli import torch_device

SCRIPTS = ["answer_shift", "attribution", "bench_attribution", "bench_cache", "bench_edges", "bench_fit", "bench_steer", "bench_sweep",
           "circuit", "gate_attribution", "hard_negatives", "heads", "interp_tour", "leakage", "patching", "pgd_budget", "probing",
           "scale_check", "stacked_gate"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_names_the_module_and_gives_the_whole_docstring_and_every_default(name, capsys):
    module = importlib.import_module(f"analyses.{name}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m analyses.{name}")
    last_paragraph = module.__doc__.strip().split("\n\n")[-1].strip().splitlines()[-1].strip()
    assert last_paragraph in text  # the end of the docstring, not just its first line
    options = [line.split()[0] for line in text.split("options:")[1].splitlines()
               if line.startswith("  --") and not line.startswith("  --help")]
    body = text.split("options:")[1]
    assert options and body.count("(default:") >= len(options) - body.count("==SUPPRESS==")


def test_device_is_checked_when_parsed():
    assert torch_device("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="not a torch device: 'foo'"):
        torch_device("foo")
    with pytest.raises(argparse.ArgumentTypeError, match="only cpu and cuda"):
        torch_device("meta")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="torch sees no CUDA device"):
            torch_device("cuda")
