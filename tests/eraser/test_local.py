"""A local checkpoint on a local MLLMU-Bench copy (``--model`` + ``--mllmu``): the paper's setting, offline.

The quick zoo model is saved as a Hugging Face folder and MiniMLLMU as MLLMU-Bench parquet files; loaded back
through the local path, the vanilla model must give exactly the numbers the zoo path gives, split by split.
"""
from __future__ import annotations

import json

import pytest
import torch

from eraser.cli import main
from eraser.pipeline import LocalSetupError, evaluate_model, load_local_setup, setup_from_args
from tests.conftest import save_local_copy


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    return save_local_copy(root), root


def test_the_local_path_loads_the_same_model_and_data(local):
    zoo, root = local
    setup = load_local_setup(str(root / "model"), str(root / "mllmu"), forget_ratio=5, progress=False)
    assert setup.recipe is None and setup.source is None and not setup.has_oracle and setup.seed == 0
    for split in ("forget", "retain", "test", "celebrity"):
        assert [p.id for p in setup.bench.split(split)] == [p.id for p in zoo.bench.split(split)], split
    p = zoo.bench.forget[0]
    inputs = zoo.model.encode(images=[p.image, None], prompts=[p.generation[0].question, "who is he"])
    assert torch.equal(setup.model.run_with_hooks(inputs, []), zoo.model.run_with_hooks(inputs, []))
    cfg = setup.config()
    assert cfg["recipe"] is None and cfg["local"]["model"].endswith("model") and cfg["forget_ratio"] == 5
    with pytest.raises(LocalSetupError, match="no retain-only oracle for a local checkpoint"):
        setup.oracle


def test_eval_of_a_local_checkpoint_matches_the_zoo_path(local, tmp_path, capsys):
    zoo, root = local
    expected, _, _ = evaluate_model(zoo, with_probs=False)
    argv = ["eval", "--model", str(root / "model"), "--mllmu", str(root / "mllmu"), "--no-progress", "--threads", "2",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "no retain-only oracle" in capsys.readouterr().err  # skipped, and said so
    res = json.loads((tmp_path / "results.json").read_text())
    for split, metrics in expected.items():
        for metric, value in metrics.items():
            assert res["methods"]["vanilla"][split][metric] == value, (split, metric)
    memo = res["checks"]["memorisation"]
    assert "forbidden_refusal_rate" not in memo and any("forbidden_refusal_rate" in s for s in memo["skipped"])
    # the reason is that there is none, not a flag the user did not pass
    assert "oracle_forget_cls_acc (no retain-only oracle for this model: --oracle-model PATH)" in memo["skipped"]
    assert memo["forget_cls_acc"]["pass"] and res["config"]["local"]["data"].endswith("mllmu")
    assert res["checks"]["refusal"]["vanilla"] == {}  # MLLMU-Bench has no refusal requests


def test_local_flags_fail_clearly(local, tmp_path, capsys):
    _, root = local
    for argv, message in [
        (["eval", "--model", str(root / "model")], "--model and --mllmu go together"),
        (["eval", "--quick", "--oracle-model", str(root / "model")], "--oracle-model goes with --model"),
        (["eval", "--model", str(tmp_path), "--mllmu", str(root / "mllmu")], "does not load as a vision-language"),
        (["eval", "--model", str(root / "model"), "--mllmu", str(tmp_path)], "no parquet data for split"),
    ]:
        assert main(argv + ["--no-progress"]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_setup_from_args_keeps_the_embedded_default():
    import argparse

    args = argparse.Namespace(arch="llava", seed=0, forget_ratio=5, quick=True, cache_dir=None, no_progress=True,
                              batch_size=64)
    assert setup_from_args(args).recipe is not None  # a Namespace without the local flags still works
