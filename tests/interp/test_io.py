"""Atomic writes: the target changes only when the whole write succeeded, and no temporary file is left."""
from __future__ import annotations

import json

import numpy as np
import pytest

from interp.io import atomic_path, write_json


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_text("half of the new fi")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n" and _leftovers(tmp_path) == []


def test_a_finished_write_replaces_the_file_and_creates_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new\n")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_text() == "new\n" and _leftovers(target.parent) == []


def test_write_json_serialises_before_touching_the_file(tmp_path):
    target = tmp_path / "r.json"
    write_json(target, {"methods": {"vanilla": {"forget": {"cls_acc": 1.0}}}})
    assert json.loads(target.read_text()) == {"methods": {"vanilla": {"forget": {"cls_acc": 1.0}}}}
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})  # not serialisable: fails before any write
    assert json.loads(target.read_text())["methods"]["vanilla"]["forget"]["cls_acc"] == 1.0
    assert _leftovers(tmp_path) == []


def test_write_json_writes_strict_json_nan_and_inf_become_null(tmp_path):
    """Python's json writes NaN / Infinity, which strict readers refuse; every writer here goes through this one."""
    target = tmp_path / "gates.json"
    write_json(target, {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": {"d": 0.25}, "e": 3})
    text = target.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": 0.25}, "e": 3}


def test_json_records_name_the_file_and_the_problem(tmp_path):
    from interp.head_patching import HeadPatchResult
    from interp.patching import PatchResult

    res = HeadPatchResult(layers=[0], patched=np.zeros((1, 1)), clean=1.0, corrupted=0.0)
    res.save(tmp_path / "heads.json")
    with pytest.raises(ValueError, match=r"heads.json is not a saved PatchResult: it has no field 'names'"):
        PatchResult.load(tmp_path / "heads.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list.json is not a saved PatchResult: it holds a JSON list"):
        PatchResult.load(tmp_path / "list.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ValueError, match=r"bin.json is not a JSON file"):
        PatchResult.load(tmp_path / "bin.json")


def test_atomic_files_get_the_permissions_open_would_give(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        (tmp_path / "plain.txt").write_text("x")
        import torch
        from safetensors.torch import save_file

        with atomic_path(tmp_path / "t.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))  # safetensors creates its files owner-only
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "r.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "t.safetensors").stat().st_mode) == 0o644



def test_temporaries_a_killed_writer_left_are_removed_by_the_next_write(tmp_path):
    """From an audit: kill -9 mid-write skips the cleanup, and the hidden temporaries stayed forever.  Only old
    ones go (a young one may be a live writer's), only the same target's, and names with glob characters match
    literally."""
    import os
    import time

    from interp.io import STALE_TMP_S, write_json

    target = tmp_path / "results[1].json"
    stale = tmp_path / ".results[1].json.abc123.tmp"
    fresh = tmp_path / ".results[1].json.def456.tmp"
    other = tmp_path / ".other.json.abc123.tmp"
    lookalike = tmp_path / ".results1.json.abc123.tmp"  # "[1]" as a glob class would match this
    for f in (stale, fresh, other, lookalike):
        f.write_text("{")
    old = time.time() - STALE_TMP_S - 60
    for f in (stale, other, lookalike):
        os.utime(f, (old, old))
    write_json(target, {"a": 1})
    assert not stale.exists() and fresh.exists() and other.exists() and lookalike.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, fresh.name, other.name, lookalike.name])
