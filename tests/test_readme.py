"""The README's module tables name modules that exist, and every module of the two libraries is in one of them,
so a newcomer who reads them finds everything, and a renamed or new module cannot leave them stale."""
from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _tabled() -> set[str]:
    names = set()
    for line in README.read_text().splitlines():
        first = line.split("|")[1] if line.startswith("| `") else ""
        names.update(re.findall(r"`((?:interp|eraser)\.[\w.]+)`", first))
    return names


def test_every_tabled_module_imports():
    tabled = _tabled()
    assert len(tabled) > 30
    for name in sorted(tabled):
        importlib.import_module(name)


def test_every_public_module_is_tabled():
    tabled = _tabled()
    missing = []
    for package in ("interp", "eraser"):
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            name = f"{package}.{info.name}"
            if not info.name.startswith("_") and name not in tabled:
                missing.append(name)
    assert not missing, f"modules missing from the README's module tables: {missing}"
