"""analyses/walkthrough.ipynb executes top to bottom on the quick model (nbclient), in under 3 minutes."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[2] / "analyses" / "walkthrough.ipynb"


def test_notebook_is_clean_and_valid():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook without outputs"


def test_notebook_runs_on_the_quick_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLMERASER_QUICK", "1")
    monkeypatch.setenv("MLLMERASER_THREADS", "1")
    monkeypatch.setenv("MLLMERASER_WALKTHROUGH_OUT", str(tmp_path / "out"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel must import this checkout's packages: run it with this interpreter, from the repo root
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH", "")]))
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    assert elapsed < 180, f"the walkthrough took {elapsed:.0f}s on the quick model"
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "quick=True" in text and "fitted in" in text and "steered:" in text
    row = next(l for l in text.splitlines() if l.startswith("blocks.0.hook_resid_pre"))  # section 3b's table
    assert float(row.split()[1]) == 1.0  # the first block's input at the image positions is the whole difference
    assert "114 edges; the largest by EAP-IG:" in text  # section 3c
    kept = text.split("faithfulness of circuits grown from the logits: ")[1].splitlines()[0]
    assert kept.endswith(("edges 0.9", "edges 1.0")) or float(kept.split()[-1]) > 0.5  # 50 of 114 edges keep most
    gate = text.split("gate value (raw): forget ")[1].splitlines()[0]  # section 4b
    assert float(gate.split(",")[0]) > float(gate.split("retain ")[1].split()[0])  # the forget picture opens it more
    assert (tmp_path / "out" / "sweep.jsonl").is_file()
    assert (tmp_path / "out" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(shown) >= 2  # the portrait and the sweep heatmap
