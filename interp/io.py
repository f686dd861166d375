"""Atomic file writes: a crash mid-write leaves the previous file intact."""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: A temporary file of :func:`atomic_path` this old (seconds) belongs to a writer that died (killed mid-write):
#: the next write of the same target removes it.  Far above any write of this project's files.
STALE_TMP_S = 3600.0


def remove_stale_temps(path: Path, older_than: float = STALE_TMP_S) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left for ``path`` when its writer was killed (``kill -9``
    skips the cleanup), if older than ``older_than`` seconds: younger ones may belong to a live writer."""
    removed = []
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.is_file() and now - tmp.stat().st_mtime > older_than:
                tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over ``path`` only if the block succeeds.

    Temporary files a killed writer left for the same target (older than :data:`STALE_TMP_S`) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp (and safetensors, which writes its own file) make it owner-only: give it what open() would
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def strict_json(obj: Any) -> Any:
    """NaN / inf -> None (JSON null), recursively through dicts, lists and tuples.

    Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which strict readers (``jq``, browsers,
    most non-Python JSON libraries) refuse; null is what a missing number means in every reader.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Serialise fully in memory first (as strict JSON: NaN / inf become null), then write atomically."""
    text = json.dumps(strict_json(obj), indent=2, sort_keys=False, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def json_number(value: Any) -> float:
    """A number read back from :func:`write_json`'s output: null (a NaN or inf when written) is NaN again."""
    return math.nan if value is None else float(value)


class JsonRecord:
    """Mixin for result value objects that are plain data: :meth:`save` writes ``to_dict()`` as strict JSON,
    atomically; :meth:`load` reads it back through ``from_dict`` (a file that is not JSON is a ValueError)."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        """Strict JSON (NaN written as null), atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path):
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a JSON file ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a saved {cls.__name__}: it holds a JSON {type(data).__name__}, not an object")
        try:
            return cls.from_dict(data)  # type: ignore[attr-defined]
        except KeyError as e:
            raise ValueError(f"{path} is not a saved {cls.__name__}: it has no field {e}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path} is not a saved {cls.__name__} ({type(e).__name__}: {e})") from None
