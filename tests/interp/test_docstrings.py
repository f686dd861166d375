"""Every runnable example in interp's docstrings runs and prints what it says (doctest), so the docs cannot rot."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import interp

MODULES = sorted(m.name for m in pkgutil.walk_packages(interp.__path__, "interp."))


def test_every_module_is_collected():
    assert {"interp.model", "interp.sites", "interp.head_patching", "interp.patching", "interp.tl"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"
