"""eraser.plots.make_all and the figures/ scripts: every figure from a run folder, skips on missing input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from eraser import plots

from .saved_runs import assert_png, write_run


def test_make_all_writes_every_figure(run_dir, tmp_path):
    made = plots.make_all(run_dir, tmp_path)
    assert [p.name for p in made] == ["tradeoff.png", "gates.png", "timing.png", "heatmap.png"]
    for p in made:
        assert_png(p)
    with Image.open(tmp_path / "gates.png") as im:  # 12 x 3.6 in at 120 dpi
        assert im.size == (1440, 432)


def test_make_all_skips_missing_inputs(tmp_path, capsys):
    d = write_run(tmp_path / "run", tradeoff=False, gates=False, sweep=False)
    results = json.loads((d / "results.json").read_text())
    del results["config"]["selection"]
    (d / "results.json").write_text(json.dumps(results))
    made = plots.make_all(d)
    assert [p.name for p in made] == ["timing.png"]
    err = capsys.readouterr().err
    for name in ("tradeoff", "gates", "heatmap"):
        assert f"skipping {name}" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plots.make_all(empty) == []
    for fn in (plots.plot_tradeoff, plots.plot_gates, plots.plot_timing, plots.plot_heatmap):
        assert fn(empty, tmp_path / "x.png") is None
        assert fn(None, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(FileNotFoundError):
        plots.make_all(tmp_path / "nope")


def test_scripts_run_from_a_folder(run_dir, tmp_path):
    from figures import figure_main

    root = Path(__file__).resolve().parents[3]
    out = tmp_path / "figs"
    r = subprocess.run([sys.executable, "-m", "figures.make_all", "--from", str(run_dir), "--out", str(out),
                        "--only", "timing", "gates"], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gates.png", "timing.png"]
    assert figure_main("heatmap", ["--from", str(run_dir), "--out", str(out)]) == 0
    assert_png(out / "heatmap.png")
    assert figure_main("gates", ["--from", str(tmp_path), "--out", str(out / "none")]) == 1  # no data: skipped


def test_make_all_script_fails_when_nothing_can_be_drawn_and_offers_the_analysis_figures(tmp_path, capsys):
    from eraser.plots import ANALYSIS_FIGURES
    from figures.make_all import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--from", str(empty)]) == 1
    assert "no figure had data" in capsys.readouterr().err
    name = sorted(ANALYSIS_FIGURES)[0]
    assert main(["--from", str(empty), "--only", name]) == 1  # accepted as a choice; no data for it here


def test_a_truncated_results_file_fails_in_one_line_on_both_entry_points(tmp_path, capsys):
    from eraser.cli import main as cli_main
    from figures.make_all import main

    (tmp_path / "leakage.json").write_text('{"attacks": {"direct": ')  # cut short
    assert main(["--from", str(tmp_path), "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    # the message names the file (an audit saw a bare JSONDecodeError)
    assert f"leakage_bars failed: ValueError: {tmp_path / 'leakage.json'} is not readable JSON (JSONDecodeError" in err
    assert "figures failed: leakage_bars" in err
    assert "Traceback" not in err
    assert cli_main(["figures", "--from", str(tmp_path), "--out", str(tmp_path / "b")]) == 1
    assert "mllmeraser figures: error: figures failed: leakage_bars" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["figures", "--from", str(empty)]) == 1  # nothing drawn is a failure here too
    assert "no figure had data" in capsys.readouterr().err
