"""The flags every analysis script shares: out-of-range values fail at parse time, as the mllmeraser CLI's do."""
from __future__ import annotations

import pytest

from analyses.common import base_parser

from . import quick_eraser  # noqa: F401  (fixture)


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "non-negative integer, got -1"),
    (["--strength", "nan"], "finite number, got 'nan'"),
    (["--limit", "0"], "positive integer, got 0"),
    (["--batch-size", "0"], "positive integer, got 0"),
    (["--threads", "-2"], "positive integer, got -2"),
    (["--forget-ratio", "7"], "invalid choice"),
])
def test_out_of_range_shared_flags_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        base_parser("probing", "test").parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_in_range_shared_flags_parse():
    args = base_parser("probing", "test").parse_args(["--seed", "0", "--strength", "-0.5", "--limit", "3"])
    assert (args.seed, args.strength, args.limit, args.batch_size) == (0, -0.5, 3, 32)


def test_out_that_is_a_file_fails_at_parse_time(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as e:
        base_parser("probing", "test").parse_args(["--out", str(afile)])
    assert e.value.code == 2 and "is an existing file" in capsys.readouterr().err


def test_an_eraser_fitted_on_another_forget_split_is_refused(quick_eraser, tmp_path):
    """The shared artifact was fitted on forget 5 %: at forget 10 % the analyses would count people it was never
    fitted to steer as forgotten."""
    from analyses.patching import main
    from tests.analyses import script_args

    with pytest.raises(SystemExit, match=r"--eraser .*fitted on another forget set \(33 queries.*given \(66 queries.*--forget-ratio"):
        main(script_args(tmp_path, quick_eraser, 1, "--forget-ratio", "10"))


def test_a_corrupt_eraser_fails_in_one_line_before_any_model_loads(tmp_path, monkeypatch):
    import analyses.common as common
    from analyses.patching import main

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the artifact was checked")

    monkeypatch.setattr(common, "setup_from_args", no_model)
    bad = tmp_path / "eraser.safetensors"
    bad.write_bytes(b'{"not": "an artifact"}')
    with pytest.raises(SystemExit, match=r"--eraser .*eraser.safetensors: .*not a readable MLLMEraser artifact"):
        main(["--quick", "--eraser", str(bad), "--out", str(tmp_path / "out"), "--no-progress"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["--quick", "--eraser", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "out")])
