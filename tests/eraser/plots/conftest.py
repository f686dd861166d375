from __future__ import annotations

from pathlib import Path

import pytest

from .saved_runs import write_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("run"))
