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
    (["demo", "--out", "x", "--baselines", "ga,sgd"], "expected distinct names among"),
    (["demo", "--out", "x", "--baselines", "ga,ga"], "expected distinct names among"),
])
def test_out_of_range_flags_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_sweep_runs_and_resumes_without_recomputing(tmp_path, capsys, monkeypatch):
    args = ["sweep", "--quick", "--threads", "1", "--no-progress", "--out", str(tmp_path), "--strengths", "-0.2", "-1.0"]
    assert main(args) == 0
    lines = (tmp_path / "sweep.jsonl").read_text().splitlines()
    context = json.loads(lines[0])["context"]
    assert context["forget_ratio"] == 5 and len(context["eraser"]) == 16
    records = [json.loads(line) for line in lines[1:]]
    layers = {r["setting"]["layer"] for r in records}
    assert len(records) == 2 * len(layers) and -1 in layers  # every layer alone, and all layers together
    for r in records:
        assert 0.0 <= r["result"]["forget_refusal_rate"] <= 1.0 and 0.0 <= r["result"]["retain_cls_acc"] <= 1.0
    assert (tmp_path / "heatmap.png").stat().st_size > 5000
    assert (tmp_path / "eraser.safetensors").exists()
    from eraser import pipeline

    def no_refit(*a, **k):
        raise AssertionError("a resumed sweep fitted again")

    monkeypatch.setattr(pipeline, "fit_variant", no_refit)
    capsys.readouterr()
    assert main(args) == 0  # a finished setting is never recomputed (the journal is unchanged), nor the fit
    assert "reusing the eraser fitted by an earlier run" in capsys.readouterr().out
    assert (tmp_path / "sweep.jsonl").read_text().splitlines() == lines
    # the journal is another split's: refused before fitting, not resumed with the forget-5 % numbers
    assert main(args + ["--forget-ratio", "10"]) == 2
    assert "forget_ratio: journal 5, this run 10" in capsys.readouterr().err
    assert (tmp_path / "sweep.jsonl").read_text().splitlines() == lines
    _audited_sweep_and_demo_failures(tmp_path, args, capsys, monkeypatch)


def _audited_sweep_and_demo_failures(done, args, capsys, monkeypatch):
    """From an audit, each a one-line refusal now (or a clean stop), with the folder left as it was."""
    import dataclasses
    import shutil

    from eraser import MLLMEraser, demo, pipeline

    def at(folder):
        return [a if a != str(done) else str(folder) for a in args]

    # a demo into a folder holding another run's journal: refused after loading the model, before ~5 min of
    # fitting, and before it wrote its eraser and gates.json beside that journal
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    monkeypatch.setattr(demo, "evaluate_model", lambda *a, **k: pytest.fail("the demo started working"))
    assert main(["demo", "--quick", "--no-oracle", "--threads", "1", "--no-progress", "--baselines", "",
                 "--forget-ratio", "10", "--out", str(done)]) == 2
    assert "forget_ratio: journal 5, this run 10" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before
    # a corrupt journal: one line and exit 2 (was a 22-line traceback and exit 1), the file untouched
    bad = done.parent / f"{done.name}_badjournal"
    bad.mkdir()
    shutil.copy(done / "eraser.safetensors", bad)
    (bad / "sweep.jsonl").write_text('{"x": 1}\n')
    assert main(at(bad)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweep.jsonl:1: expected {'setting'" in err
    assert (bad / "sweep.jsonl").read_text() == '{"x": 1}\n'
    # an eraser another command fitted as another variant is not swept as the paper's method
    other = done.parent / f"{done.name}_othervariant"
    other.mkdir()
    eraser = MLLMEraser.load(done / "eraser.safetensors")
    dataclasses.replace(eraser, info={**eraser.info, "variant": "mllmeraser_stacked_gate"}).save(
        other / "eraser.safetensors")
    assert main(at(other)) == 2
    assert "was fitted as mllmeraser_stacked_gate; the sweep sweeps the paper's method" in capsys.readouterr().err
    assert not (other / "sweep.jsonl").exists()
    # Ctrl-C: one line and exit 130 (was a 147-line KeyboardInterrupt traceback)
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "layer_sweep", interrupted)
    assert main(args) == 130
    assert "mllmeraser sweep: interrupted" in capsys.readouterr().err
    # fit records its artifact's digest beside the selection, so the pair can be checked
    monkeypatch.setattr(pipeline, "fit_variant", lambda setup, name: (eraser, None, {"fit_s": 0.0}))
    fitted = done.parent / f"{done.name}_fit"
    assert main(["fit", "--quick", "--threads", "1", "--no-progress", "--out", str(fitted)]) == 0
    selection = json.loads((fitted / "selection.json").read_text())
    assert selection["eraser_digest"] == MLLMEraser.load(fitted / "eraser.safetensors").digest() == eraser.digest()


def test_no_oracle_flag_is_offered_by_eval_and_demo_only():
    ap = build_parser()
    assert ap.parse_args(["eval", "--no-oracle"]).no_oracle and not ap.parse_args(["eval"]).no_oracle
    assert ap.parse_args(["demo", "--out", "x", "--no-oracle"]).no_oracle
    with pytest.raises(SystemExit):
        ap.parse_args(["fit", "--out", "x", "--no-oracle"])


def test_out_must_be_a_folder_and_is_checked_before_any_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv in (["fit", "--out", str(afile)], ["eval", "--out", str(afile)], ["demo", "--out", str(afile / "sub")],
                 ["figures", "--from", str(tmp_path), "--out", str(afile)]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2
        assert "existing file" in capsys.readouterr().err
    assert build_parser().parse_args(["fit", "--out", str(tmp_path / "new" / "folder")]).out == tmp_path / "new" / "folder"


def test_eval_artifact_refuses_a_bad_file_before_loading_any_model(tmp_path, capsys):
    bad = tmp_path / "eraser.safetensors"
    bad.write_bytes(b"not an artifact")
    assert main(["eval", "--quick", "--no-oracle", "--artifact", str(tmp_path)]) == 2
    assert "is not a readable MLLMEraser artifact" in capsys.readouterr().err
    assert main(["eval", "--quick", "--no-oracle", "--artifact", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err



def test_demo_baselines_default_to_the_papers_four_and_take_mmunlearner(tmp_path):
    args = build_parser().parse_args(["demo", "--out", str(tmp_path)])
    assert args.baselines == ("ga", "grad_diff", "kl_min", "npo")
    args = build_parser().parse_args(["demo", "--out", str(tmp_path), "--baselines", "npo, mmunlearner"])
    assert args.baselines == ("npo", "mmunlearner")
    assert build_parser().parse_args(["demo", "--out", str(tmp_path), "--baselines", ""]).baselines == ()


def test_a_killed_evaluation_resumes_and_another_runs_journal_is_refused(tmp_path, capsys, monkeypatch):
    """From an audit: `eval` started over after a kill (issue 7: "sweeps and evaluations resume")."""
    from eraser import pipeline

    args = ["eval", "--quick", "--no-oracle", "--no-progress", "--threads", "2", "--method",
            "mllmeraser_stacked_gate", "--out", str(tmp_path)]
    fit = pipeline.fit_variant

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "fit_variant", killed)
    assert main(args) == 130  # killed after vanilla finished, before the variant did
    lines = (tmp_path / "eval_journal.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["setting"] == {"method": "vanilla"}
    assert not (tmp_path / "results.json").exists()
    evaluated = []
    evaluate = pipeline.evaluate_model
    monkeypatch.setattr(pipeline, "fit_variant", fit)
    monkeypatch.setattr(pipeline, "evaluate_model", lambda *a, **k: evaluated.append(1) or evaluate(*a, **k))
    assert main(args) == 0
    assert len(evaluated) == 1  # vanilla was read back, only the variant ran
    first = json.loads((tmp_path / "results.json").read_text())
    assert set(first["methods"]) == {"vanilla", "mllmeraser_stacked_gate"}
    assert first["checks"]["memorisation"]["forget_cls_acc"]["pass"]  # the resumed vanilla numbers, checked as usual
    monkeypatch.setattr(pipeline, "evaluate_model", lambda *a, **k: pytest.fail("a finished method ran again"))
    assert main(args) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["methods"] == first["methods"] and again["checks"] == first["checks"]
    capsys.readouterr()
    assert main(args[:-1] + [str(tmp_path), "--forget-ratio", "10"]) == 2  # another split: refused, not mixed in
    assert "eval_journal.jsonl was written by another run" in capsys.readouterr().err
