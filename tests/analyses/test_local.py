"""The analyses on a local checkpoint and a local MLLMU-Bench (``--model`` + ``--mllmu``): the path a real
LLaVA-1.5-7B takes.  The quick zoo model is saved as a Hugging Face folder and its benchmark as MLLMU-Bench
parquet files; with the same eraser, the scripts must give the numbers they give on the embedded default."""
from __future__ import annotations

import pytest

from analyses import patching, probing
from interp import HookedVLM

from tests.conftest import save_local_copy

from . import one_thread, quick_eraser, read_json, script_args  # noqa: F401


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    save_local_copy(root)
    return root


def _local_args(out, eraser, root, limit=3, *extra):
    args = script_args(out, eraser, limit, *extra)
    args.remove("--quick")
    return args + ["--model", str(root / "model"), "--mllmu", str(root / "mllmu")]


def test_patching_and_probing_match_the_embedded_default(local, quick_eraser, tmp_path):
    with one_thread():
        for script, name in ((patching, "patching.json"), (probing, "probing.json")):
            script.main(_local_args(tmp_path / "local", quick_eraser, local, 3))
            script.main(script_args(tmp_path / "zoo", quick_eraser, 3))
            here, there = read_json(tmp_path / "local" / name), read_json(tmp_path / "zoo" / name)
            assert here["config"]["local"]["model"].endswith("model") and there["config"]["recipe"] is not None
            keys = ("tasks", "shift") if script is probing else ("flow", "steering")
            for key in keys:  # same weights, same data, same eraser: the same numbers
                assert here[key] == there[key], (script.__name__, key)


def test_local_flags_fail_clearly(local, quick_eraser, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit, match="--model and --mllmu go together"):
        patching.main(script_args(tmp_path, quick_eraser, 3, "--model", str(local / "model")))
    with pytest.raises(SystemExit, match="does not load as a vision-language checkpoint"):
        patching.main(_local_args(tmp_path, quick_eraser, local) + ["--model", str(tmp_path)])
    # from an audit: each of these ran, silently ignoring a flag (and --quick was recorded as true)
    with pytest.raises(SystemExit, match="--quick picks the embedded default's small model"):
        patching.main(_local_args(tmp_path, quick_eraser, local) + ["--quick"])
    with monkeypatch.context() as m:  # told from config.json, before any weights load
        m.setattr(HookedVLM, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("the checkpoint loaded")))
        with pytest.raises(SystemExit, match="--arch qwen2_5_vl, but --model .* is a llava checkpoint"):
            patching.main(_local_args(tmp_path, quick_eraser, local) + ["--arch", "qwen2_5_vl"])
    with pytest.raises(SystemExit, match="--dtype goes with --model"):
        patching.main(script_args(tmp_path, quick_eraser, 3, "--dtype", "bfloat16"))
    with pytest.raises(SystemExit, match="no parquet data for split 'forget_10'"):  # was a 26-line traceback
        patching.main(_local_args(tmp_path, quick_eraser, local) + ["--forget-ratio", "10"])


def test_quick_from_the_environment_is_for_the_embedded_default_only(local, quick_eraser, tmp_path, monkeypatch):
    monkeypatch.setenv("MLLMERASER_QUICK", "1")
    with one_thread():
        res = patching.main(_local_args(tmp_path, quick_eraser, local, 2))
    assert res["config"]["quick"] is False and res["config"]["local"]["dtype"] == "float32"
