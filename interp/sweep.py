"""Resumable grid sweeps, their results, and constrained choice of a setting.

Why a JSONL journal: a sweep over layers x strengths on a 7B model runs for
hours, and a crash (or a pre-empted job) must not cost the finished part.
Every finished setting is appended as one line ``{"setting": ..., "result": ...}``
and fsync'ed; a restart reads the journal, drops a half-written last line,
and evaluates only what is missing.  A finished setting is never recomputed.

The sweep knows nothing about what it evaluates: settings are JSON dicts,
results are JSON dicts of metrics.  :func:`choose_setting` then picks the
best setting under constraints ("maximise forgetting subject to retain
accuracy >= vanilla - 0.03").

The batched-coefficient helpers live in :mod:`interp.steering` and are
re-exported here, since sweeps over strengths are their main use.
"""
from __future__ import annotations

import json
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .io import atomic_path
from .steering import generate_coefficients, repeat_inputs, row_scales, run_coefficients

__all__ = [
    "JournalError", "NoFeasibleSetting", "Sweep", "SweepContextError", "SweepResult", "check_context", "choose_setting",
    "generate_coefficients", "repeat_inputs", "row_scales", "run_coefficients", "run_sweep", "setting_key",
]

Record = dict[str, dict[str, Any]]


# -- JSON helpers --------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """numpy / torch scalars and arrays -> Python numbers and lists, so settings and results serialise."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return obj.tolist()  # numpy arrays/scalars, torch tensors
    return obj


def setting_key(setting: Mapping[str, Any]) -> str:
    """Canonical JSON of a setting: the identity used to skip finished work.

    Key order does not matter; a tuple and a list of the same values are the
    same; ``1`` and ``1.0`` are not (keep a key's type consistent).
    """
    return json.dumps(_plain(setting), sort_keys=True, separators=(",", ":"), allow_nan=True)


def _line(record: Record) -> str:
    return json.dumps(record, allow_nan=True) + "\n"


class JournalError(ValueError):
    """A file that is not a sweep journal (not UTF-8 text, or a line that is not a JSON record); the message
    names the file and the line."""


def _read_journal(path: Path, repair: bool) -> tuple[dict[str, Any] | None, list[Record]]:
    """Parse a journal: its context (a first line ``{"context": {...}}``, or None) and its records.

    A last line without its newline that does not parse is a crash mid-write: it is dropped (and cut off if
    ``repair``); one that parses is a complete record whose newline is missing (a hand-written file): it is
    kept (and its newline written if ``repair``).  A file that is not a journal (not UTF-8 text, or a line
    that is not a JSON record) is an error naming it, checked before anything is written to it.
    """
    if not path.exists():
        return None, []
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise JournalError(f"{path} is not a sweep journal (not UTF-8 text; a journal is JSON lines)") from None
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with its newline
    complete = None
    if tail.strip():
        try:
            complete = json.loads(tail)
        except json.JSONDecodeError:
            if not tail.lstrip().startswith("{"):
                raise JournalError(f"{path} is not a sweep journal: its last line {tail[:60]!r} is not a JSON "
                                 "record") from None
        if complete is not None:
            lines.append(tail)
    records, context = [], None
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise JournalError(f"{path}:{i}: not a sweep record ({e}); a journal is JSON lines, and only its last "
                             "line may be partial") from None
        if i == 1 and isinstance(rec, dict) and set(rec) == {"context"} and isinstance(rec["context"], dict):
            context = rec["context"]
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("setting"), dict) and isinstance(rec.get("result"), dict)):
            raise JournalError(f"{path}:{i}: expected {{'setting': {{...}}, 'result': {{...}}}}, got {raw[:80]!r}")
        records.append(rec)
    if repair and tail.strip():
        with open(path, "r+b") as f:
            if complete is not None:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())
    return context, records


class SweepContextError(ValueError):
    """A journal was written under another context (another model, data split or artifact): resuming it would
    mix its results with this run's; the message names what differs."""


def check_context(path: Path, on_disk: dict[str, Any] | None, n_records: int, context: Mapping[str, Any]) -> None:
    """Raise :class:`SweepContextError` unless a journal's context (``on_disk``, None for none) is ``context``;
    a journal with records but no context cannot be vouched for."""
    want = _plain(dict(context))
    if on_disk is None:
        if n_records:
            raise SweepContextError(
                f"{path} holds {n_records} records but no context, so it cannot be checked against this run's "
                f"({want}); write this sweep elsewhere, or move the journal away")
        return
    if setting_key(on_disk) != setting_key(want):
        diff = sorted(k for k in set(on_disk) | set(want)
                      if setting_key({"v": on_disk.get(k)}) != setting_key({"v": want.get(k)}))
        shown = "; ".join(f"{k}: journal {on_disk.get(k)!r}, this run {want.get(k)!r}" for k in diff[:6])
        raise SweepContextError(f"{path} was written by another run ({shown}); its results do not apply here: "
                                "write this sweep to another folder, or move the journal away to start over")


# -- results -------------------------------------------------------------------
@dataclass
class Grid:
    """A metric on a 2-D grid of two setting keys (for heatmaps): ``values[i, j]`` at ``rows[i]``, ``cols[j]``; NaN where missing."""

    row_key: str
    col_key: str
    rows: list[Any]
    cols: list[Any]
    values: np.ndarray


def _sort_values(values: Iterable[Any]) -> list[Any]:
    vals = list(dict.fromkeys(setting_key({"v": v}) for v in values))
    decoded = [json.loads(k)["v"] for k in vals]
    try:
        return sorted(decoded)
    except TypeError:
        return decoded


@dataclass
class SweepResult:
    """The finished records of a sweep, in completion order, with the queries a sweep is run for.

    Each record is ``{"setting": {...}, "result": {...}}``; :meth:`rows`
    flattens them to ``{**setting, **result}`` (a result value wins over a
    setting value of the same name), which is what constraints receive.
    """

    records: list[Record] = field(default_factory=list)
    #: what the results depend on besides the settings (the journal's context line), when the sweep had one
    context: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def rows(self) -> list[dict[str, Any]]:
        return [{**r["setting"], **r["result"]} for r in self.records]

    def where(self, predicate: Callable[[dict[str, Any]], bool] | None = None, **fixed: Any) -> "SweepResult":
        """The records whose flat row satisfies ``predicate`` and has ``key == value`` for each ``fixed`` pair."""
        keep = []
        for rec, row in zip(self.records, self.rows()):
            if all(k in row and setting_key({"v": row[k]}) == setting_key({"v": v}) for k, v in fixed.items()) and (
                    predicate is None or predicate(row)):
                keep.append(rec)
        return SweepResult(keep, self.context)

    def metrics(self) -> list[str]:
        return list(dict.fromkeys(k for r in self.records for k in r["result"]))

    def table(self, keys: Sequence[str] | str, metric: str) -> dict[Any, Any]:
        """``metric`` indexed by setting ``keys``: one key -> ``{v: x}``; two -> ``{v1: {v2: x}}``; and so on.

        Raises if two records share the same key values (another setting key
        varies too): narrow first with :meth:`where`.
        """
        keys = [keys] if isinstance(keys, str) else list(keys)
        if not keys:
            raise ValueError("table needs at least one key")
        out: dict[Any, Any] = {}
        seen: dict[str, dict] = {}
        for rec, row in zip(self.records, self.rows()):
            missing = [k for k in keys + [metric] if k not in row]
            if missing:
                raise KeyError(f"record {rec['setting']} has no {missing}; metrics are {self.metrics()}")
            ident = setting_key({k: row[k] for k in keys})
            if ident in seen:
                varying = sorted(k for k in rec["setting"] if k not in keys
                                 and setting_key({"v": rec["setting"][k]}) != setting_key({"v": seen[ident].get(k)}))
                raise ValueError(f"two records share {json.loads(ident)}; setting keys {varying} vary too: "
                                 f"add them to keys or narrow with .where({varying[0] if varying else 'key'}=...)")
            seen[ident] = rec["setting"]
            node = out
            for k in keys[:-1]:
                node = node.setdefault(_hashable(row[k]), {})
            node[_hashable(row[keys[-1]])] = row[metric]
        return out

    def grid(self, row_key: str, col_key: str, metric: str) -> Grid:
        """``metric`` as a 2-D array over two setting keys (sorted values; NaN where no record), for heatmaps."""
        nested = self.table([row_key, col_key], metric)
        rows = _sort_values(nested)
        cols = _sort_values(c for inner in nested.values() for c in inner)
        values = np.full((len(rows), len(cols)), np.nan)
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                v = nested.get(_hashable(r), {}).get(_hashable(c))
                if v is not None:
                    values[i, j] = float(v)
        return Grid(row_key, col_key, rows, cols, values)

    def best(self, objective: str, maximize: bool = True,
             constraint: Callable[[dict[str, Any]], bool] | None = None) -> Record:
        """The record with the highest (or lowest) ``objective`` among those meeting ``constraint``.

        NaN objectives never win; ties go to the earliest record.
        """
        cands = [(rec, row) for rec, row in zip(self.records, self.rows())
                 if objective in row and _finite(row[objective]) and (constraint is None or constraint(row))]
        if not cands:
            have = [row[objective] for row in self.rows() if objective in row]
            if not have:
                why = f"no record has {objective!r}; metrics are {self.metrics()}"
            elif constraint is None or not any(_finite(v) for v in have):
                why = f"no record has a finite {objective!r} (all NaN, inf or not numbers)"
            else:
                why = "no record satisfies the constraint"
            raise NoFeasibleSetting(f"best({objective!r}): {why} ({len(self.records)} records)")
        pick = max if maximize else min
        return pick(cands, key=lambda c: float(c[1][objective]))[0]

    def save(self, path: str | Path) -> None:
        """Write the records as a JSONL journal (atomically), readable by :meth:`load` and resumable by :class:`Sweep`
        (its context line first, when there is one, so ``Sweep(path, context=...)`` can check it).

        Values serialise as :meth:`Sweep.append` writes them (numpy / torch scalars as numbers; JSON has no tuples,
        so they come back as lists, and dict keys as strings)."""
        head = json.dumps({"context": _plain(dict(self.context))}, allow_nan=True) + "\n" if self.context else ""
        text = head + "".join(_line({"setting": _plain(r["setting"]), "result": _plain(r["result"])})
                              for r in self.records)
        with atomic_path(path) as tmp:
            tmp.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "SweepResult":
        """Read a journal; a partial last line (a crash mid-write) is ignored, the file is left untouched."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sweep journal at {path}")
        context, records = _read_journal(path, repair=False)
        return cls(records, context)


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class NoFeasibleSetting(ValueError):
    """No setting of a sweep satisfies the constraints; the message says which came closest."""


# -- running -------------------------------------------------------------------
class Sweep:
    """A sweep's journal on disk: what is done, and appending what finishes.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "sweep.jsonl")
    >>> settings = [{"layer": l, "coeff": c} for l in (1, 2) for c in (-1.0, 1.0)]
    >>> res = run_sweep(settings, lambda s: {"score": s["layer"] * s["coeff"]}, path, progress=False)
    >>> res.best("score")["setting"]
    {'layer': 2, 'coeff': 1.0}
    >>> calls = []
    >>> _ = run_sweep(settings, lambda s: calls.append(s) or {"score": 0.0}, path, progress=False)
    >>> calls  # everything was already done
    []
    """

    def __init__(self, path: str | Path, context: Mapping[str, Any] | None = None) -> None:
        """Open (or start) the journal at ``path``.

        ``context`` is what the results depend on besides the settings (model, data split, artifact, ...).
        A new journal records it on its first line; an existing one must have been written with the same
        context, or opening it raises :class:`SweepContextError` (resuming would silently return another
        run's numbers).  Without ``context`` nothing is checked.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        on_disk, self._records = _read_journal(self.path, repair=True)
        self.context = on_disk
        if context is not None:
            check_context(self.path, on_disk, len(self._records), context)
            if on_disk is None:  # a new (or empty) journal: its first line says what it was run under
                header = json.dumps({"context": _plain(dict(context))}, allow_nan=True) + "\n"
                with atomic_path(self.path) as tmp:
                    tmp.write_text(header)
                self.context = _plain(dict(context))
        self._done = {setting_key(r["setting"]) for r in self._records}

    @property
    def result(self) -> SweepResult:
        return SweepResult(list(self._records), self.context)

    def is_done(self, setting: Mapping[str, Any]) -> bool:
        return setting_key(setting) in self._done

    def append(self, setting: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """Record a finished setting durably (one line, flushed and fsync'ed)."""
        if not isinstance(result, Mapping):
            raise TypeError(f"evaluate must return a dict of metrics, got {type(result).__name__} for {dict(setting)}")
        rec = {"setting": _plain(setting), "result": _plain(result)}
        line = _line(rec)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._records.append(rec)
        self._done.add(setting_key(setting))

    def run(self, settings: Iterable[Mapping[str, Any]], evaluate: Callable[[dict], dict] | None = None,
            progress: bool = True, evaluate_batch: Callable[[list[dict]], list[dict]] | None = None,
            group_by: Sequence[str] = ()) -> SweepResult:
        """Evaluate every setting not yet in the journal; return the records of ``settings`` (in their order).

        With ``evaluate_batch``, pending settings are grouped by the values of
        ``group_by`` (all in one group if empty) and each group is evaluated
        by one call, which must return one result per setting, in order.
        """
        if (evaluate is None) == (evaluate_batch is None):
            raise ValueError("pass exactly one of evaluate or evaluate_batch")
        if group_by and evaluate_batch is None:
            raise ValueError("group_by only applies with evaluate_batch")
        wanted = {}
        for s in settings:
            if not isinstance(s, Mapping):
                raise TypeError(f"each setting must be a dict, got {type(s).__name__}")
            wanted.setdefault(setting_key(s), dict(s))
        pending = [s for k, s in wanted.items() if k not in self._done]
        bar = _progress(len(wanted), len(wanted) - len(pending), progress, self.path.name)
        try:
            if evaluate is not None:
                for s in pending:
                    self.append(s, evaluate(dict(s)))
                    bar.update(1)
            else:
                for group in _group(pending, group_by):
                    results = evaluate_batch([dict(s) for s in group])
                    if len(results) != len(group):
                        raise ValueError(f"evaluate_batch returned {len(results)} results for {len(group)} settings")
                    for s, r in zip(group, results):
                        self.append(s, r)
                    bar.update(len(group))
        finally:
            bar.close()
        by_key = {setting_key(r["setting"]): r for r in self._records}
        return SweepResult([by_key[k] for k in wanted], self.context)


def _group(settings: list[dict], keys: Sequence[str]) -> list[list[dict]]:
    groups: dict[str, list[dict]] = {}
    for s in settings:
        missing = [k for k in keys if k not in s]
        if missing:
            raise KeyError(f"group_by keys {missing} are not in setting {s}")
        groups.setdefault(setting_key({k: s[k] for k in keys}), []).append(s)
    return list(groups.values())


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, done: int, enabled: bool, name: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=f"sweep {name}", unit="setting")


def run_sweep(settings: Iterable[Mapping[str, Any]], evaluate: Callable[[dict], dict] | None = None,
              path: str | Path | None = None, progress: bool = True,
              evaluate_batch: Callable[[list[dict]], list[dict]] | None = None,
              group_by: Sequence[str] = (), context: Mapping[str, Any] | None = None) -> SweepResult:
    """Evaluate a grid of settings, resumably, journaled at ``path`` (JSONL).

    Kill it at any point and run it again with the same arguments: finished
    settings are read back, never recomputed.  Use ``evaluate_batch`` with
    ``group_by=("layer",)`` to evaluate all strengths of one layer in one
    batched forward (see :func:`interp.steering.run_coefficients`).  ``context`` (model, data, artifact, ...)
    is recorded in a new journal and checked against an existing one (:class:`Sweep`).

    >>> import tempfile, os, itertools
    >>> path = os.path.join(tempfile.mkdtemp(), "grid.jsonl")
    >>> grid = [{"layer": l, "coeff": c} for l, c in itertools.product([0, 1], [-0.5, 0.5])]
    >>> res = run_sweep(grid, lambda s: {"forget": s["coeff"] * (s["layer"] + 1), "retain": 1 - abs(s["coeff"]) * s["layer"]},
    ...                 path, progress=False)
    >>> res.table(["layer", "coeff"], "forget")
    {0: {-0.5: -0.5, 0.5: 0.5}, 1: {-0.5: -1.0, 0.5: 1.0}}
    >>> choose_setting(res, "forget", {"retain": (">=", 0.6)})["setting"]
    {'layer': 0, 'coeff': 0.5}
    """
    if path is None:
        raise TypeError("run_sweep needs a path for its journal")
    return Sweep(path, context=context).run(settings, evaluate, progress=progress, evaluate_batch=evaluate_batch,
                                            group_by=group_by)


# -- choosing ------------------------------------------------------------------
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq, "!=": operator.ne,
}


def _shortfall(value: Any, op: str, bound: float) -> float:
    """How far ``value`` is from meeting ``op bound`` (0 when met, inf when missing or NaN)."""
    if not _finite(value):
        return math.inf
    if _OPS[op](value, bound):
        return 0.0
    if op == "!=":
        return math.inf  # "!=" cannot be nearly met
    return abs(float(value) - float(bound))


def choose_setting(result: SweepResult, objective: str, constraints: Mapping[str, tuple[str, float]] | None = None,
                   maximize: bool = True) -> Record:
    """The record that maximises (or minimises) ``objective`` subject to every ``metric op bound`` constraint.

    ``constraints`` maps a metric (or setting key) to ``(op, bound)`` with op
    in ``>= > <= < == !=``.  When nothing is feasible, :class:`NoFeasibleSetting`
    says, per constraint, how many settings meet it and how close the best
    came, and which single setting came closest to meeting all of them.
    """
    constraints = dict(constraints or {})
    for metric, spec in constraints.items():
        if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] in _OPS):
            raise ValueError(f"constraint on {metric!r} must be (op, bound) with op in {sorted(_OPS)}, got {spec!r}")
    if not result.records:
        raise NoFeasibleSetting("the sweep has no records")
    rows = result.rows()
    known = set().union(*(r.keys() for r in rows))
    for name in [objective, *constraints]:
        if name not in known:
            raise KeyError(f"{name!r} is not a metric or setting key of this sweep; metrics: {result.metrics()}")

    def feasible(row: dict) -> bool:
        return all(_shortfall(row.get(m), op, b) == 0.0 for m, (op, b) in constraints.items())

    try:
        return result.best(objective, maximize=maximize, constraint=feasible)
    except NoFeasibleSetting:
        if not constraints:
            raise
    n_ok = sum(feasible(r) for r in rows)
    if n_ok:
        raise NoFeasibleSetting(f"{n_ok} setting(s) satisfy the constraints, but none has a finite {objective!r}")
    lines = [f"no setting of {len(rows)} satisfies all constraints for {'max' if maximize else 'min'} {objective!r}:"]
    for m, (op, b) in constraints.items():
        gaps = [_shortfall(r.get(m), op, b) for r in rows]
        met = sum(g == 0.0 for g in gaps)
        i = int(np.argmin(gaps))
        status = f"met by {met}/{len(rows)}" if met else f"met by none; closest {m} = {rows[i].get(m)!r} misses by {gaps[i]:.4g}"
        lines.append(f"  {m} {op} {b}: {status}")
    worst = [max((_shortfall(r.get(m), op, b), m) for m, (op, b) in constraints.items()) for r in rows]
    i = min(range(len(rows)), key=lambda j: worst[j][0])
    gap, m = worst[i]
    op, b = constraints[m]
    lines.append(f"  nearest miss: {result.records[i]['setting']} fails {m} {op} {b} by {gap:.4g} ({m} = {rows[i].get(m)!r})")
    raise NoFeasibleSetting("\n".join(lines))
