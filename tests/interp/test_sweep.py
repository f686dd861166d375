"""Resumable sweeps: crash-safe journal, no recomputation, grouping, tables, constrained choice."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from interp.sweep import (NoFeasibleSetting, Sweep, SweepContextError, SweepResult, choose_setting, run_sweep,
                          setting_key)

GRID = [{"layer": l, "coeff": c} for l, c in itertools.product([0, 1, 2], [-1.0, -0.5, 0.5])]


def metrics(s):
    return {"forget": -s["coeff"] * (s["layer"] + 1), "retain": 1.0 - 0.1 * abs(s["coeff"]) * s["layer"]}


class Counter:
    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, s):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise RuntimeError("killed")
        self.calls.append(s)
        return metrics(s)


def test_setting_key_is_canonical():
    assert setting_key({"a": 1, "b": (2, 3)}) == setting_key({"b": [2, 3], "a": 1})
    assert setting_key({"a": np.float64(0.5)}) == setting_key({"a": 0.5})


def test_journal_lines_and_result_order(tmp_path):
    path = tmp_path / "s.jsonl"
    res = run_sweep(GRID, metrics, path, progress=False)
    lines = path.read_text().splitlines()
    assert len(lines) == 9 and json.loads(lines[4]) == {"setting": GRID[4], "result": metrics(GRID[4])}
    assert [r["setting"] for r in res] == GRID
    assert SweepResult.load(path).records == res.records


def test_killed_sweep_resumes_without_recomputing(tmp_path):
    path = tmp_path / "s.jsonl"
    first = Counter(fail_after=4)
    with pytest.raises(RuntimeError, match="killed"):
        run_sweep(GRID, first, path, progress=False)
    assert len(path.read_text().splitlines()) == 4
    second = Counter()
    res = run_sweep(GRID, second, path, progress=False)
    assert second.calls == GRID[4:]  # only the missing five
    assert len(res) == 9 and [r["result"] for r in res] == [metrics(s) for s in GRID]
    third = Counter()
    run_sweep(GRID + [GRID[0]], third, path, progress=True)  # duplicates and a finished grid: nothing to do
    assert third.calls == []


def test_partial_last_line_is_dropped_and_redone(tmp_path):
    path = tmp_path / "s.jsonl"
    run_sweep(GRID[:3], metrics, path, progress=False)
    full = path.read_bytes()
    path.write_bytes(full + b'{"setting": {"layer": 1, "coeff": -1.0}, "res')  # crash mid-write of GRID[3]
    assert len(SweepResult.load(path)) == 3  # load tolerates it and leaves the file alone
    assert path.read_bytes().endswith(b'"res')
    c = Counter()
    res = run_sweep(GRID[:5], c, path, progress=False)
    assert c.calls == GRID[3:5]
    assert path.read_bytes().startswith(full) and len(path.read_text().splitlines()) == 5
    assert all(json.loads(line) for line in path.read_text().splitlines())
    assert len(res) == 5


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"setting": {}, "result": {}}\nnot json\n{"setting": {}, "result": {}}\n')
    with pytest.raises(ValueError, match=":2: not a sweep record"):
        Sweep(path)


def test_a_file_that_is_not_a_journal_is_refused_and_left_intact(tmp_path):
    """Opening another file as a journal must not cut it down: before, a safetensors file given as a sweep
    path was truncated to 0 bytes, and a hand-written journal without a final newline lost its last record."""
    binary = tmp_path / "eraser.safetensors"
    binary.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}\xff\xfe" + bytes(range(256)))
    before = binary.read_bytes()
    for open_it in (lambda: Sweep(binary), lambda: run_sweep(GRID[:1], metrics, binary, progress=False),
                    lambda: SweepResult.load(binary)):
        with pytest.raises(ValueError, match="not a sweep journal"):
            open_it()
        assert binary.read_bytes() == before
    text = tmp_path / "notes.txt"
    text.write_text("layer sweep notes\nto do")
    with pytest.raises(ValueError, match="not a sweep journal"):
        Sweep(text)
    assert text.read_text() == "layer sweep notes\nto do"
    hand = tmp_path / "hand.jsonl"
    hand.write_text("\n".join(json.dumps({"setting": g, "result": metrics(g)}) for g in GRID[:3]))  # no final newline
    assert len(SweepResult.load(hand)) == 3
    c = Counter()
    assert len(run_sweep(GRID[:4], c, hand, progress=False)) == 4 and c.calls == GRID[3:4]
    assert len(hand.read_text().splitlines()) == 4 and hand.read_text().endswith("\n")
    with pytest.raises(FileNotFoundError, match="no sweep journal"):
        SweepResult.load(tmp_path / "missing.jsonl")


def test_evaluate_batch_called_once_per_group(tmp_path):
    calls = []

    def batch(settings):
        calls.append(settings)
        return [metrics(s) for s in settings]

    path = tmp_path / "s.jsonl"
    Sweep(path).append(GRID[0], metrics(GRID[0]))  # already done: not passed again
    res = run_sweep(GRID, path=path, evaluate_batch=batch, group_by=("layer",), progress=False)
    assert [[s["layer"] for s in g] for g in calls] == [[0, 0], [1, 1, 1], [2, 2, 2]]
    assert calls[0] == GRID[1:3]
    assert [r["result"] for r in res] == [metrics(s) for s in GRID]
    with pytest.raises(ValueError, match="returned 1 results for 3"):
        run_sweep([dict(s, seed=1) for s in GRID], path=path, evaluate_batch=lambda ss: [{}],
                  group_by=("layer",), progress=False)


def test_table_grid_best_save_load(tmp_path):
    res = run_sweep(GRID, metrics, tmp_path / "s.jsonl", progress=False)
    t = res.table(["layer", "coeff"], "forget")
    assert t[2][-1.0] == 3.0 and t[0][0.5] == -0.5 and len(t) == 3 and len(t[1]) == 3
    g = res.grid("layer", "coeff", "retain")
    assert g.rows == [0, 1, 2] and g.cols == [-1.0, -0.5, 0.5]
    assert g.values.shape == (3, 3) and math.isclose(g.values[2, 0], 0.8)
    partial = SweepResult(res.records[:-1]).grid("layer", "coeff", "retain")
    assert np.isnan(partial.values[2, 2])
    with pytest.raises(ValueError, match=r"\['coeff'\] vary"):
        res.table("layer", "forget")
    assert res.where(coeff=0.5).table("layer", "forget") == {0: -0.5, 1: -1.0, 2: -1.5}
    assert res.best("forget")["setting"] == {"layer": 2, "coeff": -1.0}
    assert res.best("forget", maximize=False)["setting"] == {"layer": 2, "coeff": 0.5}
    assert res.best("forget", constraint=lambda r: r["retain"] >= 0.95)["setting"] == {"layer": 0, "coeff": -1.0}
    res.save(tmp_path / "copy.jsonl")
    assert SweepResult.load(tmp_path / "copy.jsonl").records == res.records
    # numpy values serialise as Sweep.append writes them (save raised TypeError on an int64, an audit)
    hand = SweepResult([{"setting": {"layer": np.int64(3)}, "result": {"forget": np.float32(0.5), "v": np.arange(2)}}])
    hand.save(tmp_path / "hand.jsonl")
    assert SweepResult.load(tmp_path / "hand.jsonl").records == [{"setting": {"layer": 3},
                                                                   "result": {"forget": 0.5, "v": [0, 1]}}]
    nan = SweepResult([{"setting": {"layer": 0}, "result": {"forget": math.nan}}])
    with pytest.raises(NoFeasibleSetting, match="no record has a finite 'forget'"):
        nan.best("forget")


def test_choose_setting_constrained_argmax(tmp_path):
    res = run_sweep(GRID, metrics, tmp_path / "s.jsonl", progress=False)
    pick = choose_setting(res, "forget", {"retain": (">=", 0.9 - 1e-9)})
    assert pick["setting"] == {"layer": 1, "coeff": -1.0} and pick["result"]["forget"] == 2.0
    pick = choose_setting(res, "retain", {"forget": (">", 0.0), "layer": ("==", 2)}, maximize=False)
    assert pick["setting"] == {"layer": 2, "coeff": -1.0}


def test_choose_setting_explains_infeasibility(tmp_path):
    res = run_sweep(GRID, metrics, tmp_path / "s.jsonl", progress=False)
    with pytest.raises(NoFeasibleSetting) as err:
        choose_setting(res, "forget", {"retain": (">=", 0.5), "forget": (">=", 3.5)})
    msg = str(err.value)
    assert "retain >= 0.5: met by 9/9" in msg
    assert "forget >= 3.5: met by none; closest forget = 3.0 misses by 0.5" in msg
    assert "nearest miss: {'layer': 2, 'coeff': -1.0} fails forget >= 3.5 by 0.5" in msg
    with pytest.raises(KeyError, match="retian"):
        choose_setting(res, "forget", {"retian": (">=", 0.5)})
    with pytest.raises(ValueError, match="op, bound"):
        choose_setting(res, "forget", {"retain": ("at least", 0.5)})


def test_a_journal_of_another_context_is_refused_not_resumed(tmp_path):
    path = tmp_path / "s.jsonl"
    ctx = {"model": "abc", "forget_ratio": 5}
    first = run_sweep(GRID, metrics, path, progress=False, context=ctx)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"context": ctx} and len(lines) == len(GRID) + 1
    assert len(SweepResult.load(path)) == len(GRID)  # the context line is not a record
    calls = Counter()
    again = run_sweep(GRID, calls, path, progress=False, context={"forget_ratio": 5, "model": "abc"})  # key order
    assert calls.calls == [] and again.rows() == first.rows()
    with pytest.raises(SweepContextError, match=r"written by another run \(forget_ratio: journal 5, this run 10\)"):
        run_sweep(GRID, calls, path, progress=False, context={"model": "abc", "forget_ratio": 10})
    assert calls.calls == [] and path.read_text().splitlines() == lines  # nothing evaluated, nothing written
    # a journal without a context cannot be vouched for once a context is asked for; without one, it resumes
    plain = tmp_path / "plain.jsonl"
    run_sweep(GRID[:2], metrics, plain, progress=False)
    with pytest.raises(SweepContextError, match="holds 2 records but no context"):
        Sweep(plain, context=ctx)
    assert Sweep(plain).context is None and Sweep(path).context == ctx
    # a result saved elsewhere keeps its context line, so the copy resumes under the same check (an audit: it was
    # dropped, and Sweep(copy, context=ctx) refused the copy for having records but no context)
    copy = tmp_path / "copy.jsonl"
    first.save(copy)
    assert first.context == ctx and SweepResult.load(copy).context == ctx
    assert len(Sweep(copy, context=ctx).result) == len(GRID) and Sweep(copy, context=ctx).result.rows() == first.rows()
    assert first.where(layer=0).context == ctx
    # a partial last line after the context line is still repaired
    with open(path, "a") as f:
        f.write('{"setting": {"layer"')
    assert len(Sweep(path, context=ctx).result) == len(GRID)

