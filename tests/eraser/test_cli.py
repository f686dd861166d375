"""The mllmeraser CLI: flags out of range fail clearly; the sweep writes a resumable journal and a heatmap."""
from __future__ import annotations

import json

import pytest

from eraser.cli import build_parser, main


@pytest.mark.parametrize("argv, message", [
    (["eval", "--forget-ratio", "7"], "invalid choice"),
    (["eval", "--seed", "-1"], "non-negative"),
    (["eval", "--batch-size", "0"], "positive"),
    (["eval", "--arch", "gpt2"], "invalid choice"),
    (["fit"], "--out"),
    (["fit", "--out", "x", "--variant", "steer_static"], "invalid choice"),  # an ablation, no artifact of its own
    (["sweep", "--out", "x", "--strengths", "-1", "nan"], "expected a finite number, got 'nan'"),
    (["sweep", "--out", "x", "--strengths", "-1", "inf"], "expected a finite number, got 'inf'"),
    (["sweep", "--out", "x", "--strengths", "strong"], "expected a number, got 'strong'"),
])
def test_out_of_range_flags_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_sweep_runs_and_resumes_without_recomputing(tmp_path):
    args = ["sweep", "--quick", "--threads", "1", "--no-progress", "--out", str(tmp_path), "--strengths", "-0.2", "-1.0"]
    assert main(args) == 0
    lines = (tmp_path / "sweep.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    layers = {r["setting"]["layer"] for r in records}
    assert len(records) == 2 * len(layers) and -1 in layers  # every layer alone, and all layers together
    for r in records:
        assert 0.0 <= r["result"]["forget_refusal_rate"] <= 1.0 and 0.0 <= r["result"]["retain_cls_acc"] <= 1.0
    assert (tmp_path / "heatmap.png").stat().st_size > 5000
    assert main(args) == 0  # a finished setting is never recomputed: the journal is unchanged
    assert (tmp_path / "sweep.jsonl").read_text().splitlines() == lines


def test_no_oracle_flag_is_offered_by_eval_and_demo_only():
    ap = build_parser()
    assert ap.parse_args(["eval", "--no-oracle"]).no_oracle and not ap.parse_args(["eval"]).no_oracle
    assert ap.parse_args(["demo", "--out", "x", "--no-oracle"]).no_oracle
    with pytest.raises(SystemExit):
        ap.parse_args(["fit", "--out", "x", "--no-oracle"])
