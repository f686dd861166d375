"""The real MLLMU-Bench, read from a local directory of parquet files, and a writer of the same layout.

Why a local reader: the benchmark cannot be downloaded here, so the loader
takes whatever copy the user has (the Hugging Face export: one parquet file
``<split>.parquet`` or a folder ``<split>/`` of shards per split) and turns it
into the same :class:`~eraser.data.schema.Benchmark` that
:class:`~eraser.data.mini.MiniMLLMU` builds, so every consumer runs unchanged
on either.  It is lenient about *where* a split lives and about encodings
seen in the wild (image structs or raw bytes, nested structs or JSON strings,
key case), and strict about *content*: a missing split, field or image is a
:class:`BenchmarkFormatError` naming the file and row, never a silently
empty split that would make a model look perfectly unlearned.

:func:`save_mllmu` writes any benchmark source (anything with
``build(forget_ratio) -> Benchmark``, e.g. ``MiniMLLMU``) in this layout, so
the loader is tested on generated data by a round trip.  It also writes two
optional columns the real data lacks, ``name`` and ``facts`` (JSON), which the
loader reads when present; without them ``Profile.name`` is ``""`` and
``Profile.facts`` is empty.
"""
from __future__ import annotations

import ast
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .schema import Benchmark, ClassificationQ, ClozeQ, GenerationQ, Modality, Profile

FORGET_RATIOS: tuple[int, ...] = (5, 10, 15)
_TYPE_NAMES: dict[Modality, str] = {"vqa": "Image_Textual", "qa": "Pure_Text"}
_CLS_KEYS: dict[Modality, str] = {"vqa": "Image_Textual_Questions", "qa": "Pure_Text_Questions"}


class BenchmarkFormatError(ValueError):
    """The local benchmark copy is missing something or holds something unreadable; the message says where."""


class BenchmarkSource(Protocol):
    def build(self, forget_ratio: int = ...) -> Benchmark: ...


def split_names(forget_ratio: int) -> dict[str, str]:
    """Benchmark split -> MLLMU-Bench split name for one ratio, e.g. 5 -> forget_5, retain_95, Test_Set, Retain_Set."""
    if forget_ratio not in FORGET_RATIOS:
        raise BenchmarkFormatError(f"forget_ratio must be one of {FORGET_RATIOS}, got {forget_ratio!r}")
    return {"forget": f"forget_{forget_ratio}", "retain": f"retain_{100 - forget_ratio}",
            "test": "Test_Set", "celebrity": "Retain_Set"}


def split_files(root: str | Path, split: str) -> list[Path]:
    """Parquet files of one split, under ``root`` or ``root/data``: ``<split>.parquet``, ``<split>/**/*.parquet``,
    or Hugging Face shards ``<split>-00000-of-00002.parquet``.

    Names match case-insensitively.  Raises :class:`BenchmarkFormatError` when none exist, and when two of
    these layouts hold the split (which copy is the benchmark would be a guess).
    """
    root = Path(root)
    shard = re.compile(rf"^{re.escape(split.lower())}-\d+-of-\d+\.parquet$")
    found: list[list[Path]] = []
    for base in (root, root / "data"):
        if not base.is_dir():
            continue
        hf_shards = []
        for entry in sorted(base.iterdir()):
            name = entry.name.lower()
            if entry.is_file() and name == f"{split.lower()}.parquet":
                found.append([entry])
            elif entry.is_file() and shard.match(name):
                hf_shards.append(entry)
            elif entry.is_dir() and name == split.lower():
                shards = sorted(entry.rglob("*.parquet"))
                if shards:
                    found.append(shards)
        if hf_shards:
            found.append(hf_shards)
    if not found:
        raise BenchmarkFormatError(f"{root}: no parquet data for split {split!r} (looked for {split}.parquet, "
                                   f"{split}/*.parquet and {split}-NNNNN-of-NNNNN.parquet, also under data/)")
    if len(found) > 1:
        raise BenchmarkFormatError(f"{root}: split {split!r} is stored more than once "
                                   f"({'; '.join(str(f[0]) for f in found)}): keep one copy")
    return found[0]


def load_mllmu(root: str | Path, forget_ratio: int) -> Benchmark:
    """Read the four splits for ``forget_ratio`` from ``root``; the test split is ``Test_Set`` restricted to forget ids."""
    names = split_names(forget_ratio)
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkFormatError(f"{root}: benchmark directory does not exist")
    forget = _load_split(root, names["forget"], test=False)
    retain = _load_split(root, names["retain"], test=False)
    celebrity = _load_split(root, names["celebrity"], test=False)
    for split, profiles in ((names["forget"], forget), (names["retain"], retain), (names["celebrity"], celebrity)):
        ids = [p.id for p in profiles]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise BenchmarkFormatError(f"{root}/{split}: identities appear more than once: {dup[:10]}")
    both = sorted({p.id for p in forget} & {p.id for p in retain})
    if both:  # a forget person in the retain set would be in the null space the eraser must spare
        raise BenchmarkFormatError(f"{root}: {len(both)} identities are in both {names['forget']} and "
                                   f"{names['retain']}: {both[:10]}")
    by_id: dict[str, Profile] = {}
    for p in _load_split(root, names["test"], test=True):
        if p.id in by_id:  # several rows for one identity: pool their images
            by_id[p.id].test_images.extend(p.test_images)
        else:
            by_id[p.id] = p
    missing = [p.id for p in forget if p.id not in by_id]
    if missing:
        raise BenchmarkFormatError(f"{root}/{names['test']}: no rows for forget ids {missing[:10]}")
    test = [by_id[p.id] for p in forget]
    return Benchmark(f"MLLMU-Bench({root.name})", forget_ratio, forget, retain, test, celebrity)


def save_mllmu(source: BenchmarkSource, root: str | Path, ratios: Iterable[int] = FORGET_RATIOS,
               sharded: bool = False) -> Path:
    """Write ``source`` in the MLLMU-Bench parquet layout: forget/retain per ratio, Test_Set, Retain_Set.

    ``Test_Set`` holds the union of the ratios' test profiles (every identity
    that is forgotten at some ratio).  ``sharded`` writes ``<split>/0.parquet``
    folders instead of ``<split>.parquet`` files.  Images are stored as PNG,
    so pixels survive exactly.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[Profile]] = {}
    test: dict[str, Profile] = {}
    for r in ratios:
        bench, names = source.build(r), split_names(r)
        tables[names["forget"]], tables[names["retain"]] = bench.forget, bench.retain
        tables[names["celebrity"]] = bench.celebrity
        test.update((p.id, p) for p in bench.test)
    tables["Test_Set"] = list(test.values())
    for split, profiles in tables.items():
        is_test = split == "Test_Set"
        table = pa.Table.from_pylist([_row(p, is_test) for p in profiles], schema=_schema(is_test))
        path = root / split / "0.parquet" if sharded else root / f"{split}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    return root


# ----- reading ----------------------------------------------------------------------------------
def _load_split(root: Path, split: str, test: bool) -> list[Profile]:
    out = []
    for file in split_files(root, split):
        try:
            rows = pq.read_table(file).to_pylist()
        except Exception as exc:  # noqa: BLE001 - any reader failure is a format problem of this file
            raise BenchmarkFormatError(f"{file}: not a readable parquet file ({exc})") from exc
        out += [_parse_row(row, f"{file}: row {i}", file, test) for i, row in enumerate(rows)]
    if not out:
        raise BenchmarkFormatError(f"{root}: split {split!r} has no rows (an empty split would evaluate nothing)")
    return out


def _parse_row(row: dict[str, Any], where: str, file: Path, test: bool) -> Profile:
    pid = _get(row, "ID", where)
    if pid is None:
        raise BenchmarkFormatError(f"{where}: field 'ID' is empty")
    where = f"{where} (ID={pid})"
    if test:
        raw = _get(row, "images", where, required=False)
        if raw is None:  # the Test_Set's field is 'images' (a list); a single 'image' is accepted as well
            try:
                raw = [_get(row, "image", where)]
            except BenchmarkFormatError:
                raise BenchmarkFormatError(f"{where}: missing field 'images' (the Test_Set's list of images)") from None
        if not isinstance(raw, list) or not raw:
            raise BenchmarkFormatError(f"{where}: field 'images' must be a non-empty list")
        test_images = [_image(x, f"{where} images[{i}]", file) for i, x in enumerate(raw)]
        image = test_images[0]
    else:
        image, test_images = _image(_get(row, "image", where), f"{where} image", file), []
    biography = _get(row, "biography", where, required=not test) or ""
    cls_task = _structured(_get(row, "Classification_Task", where), f"{where} Classification_Task")
    if not isinstance(cls_task, dict):
        raise BenchmarkFormatError(f"{where}: Classification_Task must be a struct, got {type(cls_task).__name__}")
    classification = [
        _classification(q, modality, f"{where} Classification_Task.{key}[{i}]")
        for modality, key in _CLS_KEYS.items()
        for i, q in enumerate(_structured(_get(cls_task, key, f"{where} Classification_Task"), where) or [])
    ]
    generation = [GenerationQ(*_open_q(q, f"{where} Generation_Task[{i}]", cloze=False))
                  for i, q in enumerate(_list(row, "Generation_Task", where))]
    cloze = [ClozeQ(*_open_q(q, f"{where} Mask_Task[{i}]", cloze=True))
             for i, q in enumerate(_list(row, "Mask_Task", where))]
    if not (classification or generation or cloze):
        raise BenchmarkFormatError(f"{where}: no questions at all (Classification_Task, Generation_Task and "
                                   "Mask_Task are all empty or null)")
    name = _get(row, "name", where, required=False) or ""
    facts = _structured(_get(row, "facts", where, required=False) or {}, f"{where} facts")
    return Profile(str(pid), str(name), image, str(biography), classification, generation, cloze, test_images,
                   {str(k): str(v) for k, v in dict(facts).items()})


def _classification(q: Any, modality: Modality, where: str) -> ClassificationQ:
    q = _structured(q, where)
    question = _text(_get(q, "Question", where), where, "Question")
    options = _structured(_get(q, "Options", where), f"{where} Options")
    if isinstance(options, list):
        options = dict(zip("ABCDEFGH", options))
    if not isinstance(options, dict):
        raise BenchmarkFormatError(f"{where}: Options must be a letter -> answer mapping")
    options = {str(k).strip().upper(): str(v) for k, v in options.items() if v is not None}
    if len(options) < 2:
        raise BenchmarkFormatError(f"{where}: needs at least two options, got {options}")
    answer = str(_get(q, "Correct_Answer", where)).strip()
    if answer.upper() in options:
        answer = answer.upper()
    else:  # some exports store the answer text instead of its letter
        letters = [k for k, v in options.items() if v.strip() == answer]
        if not letters:
            raise BenchmarkFormatError(f"{where}: Correct_Answer {answer!r} is neither a letter nor an option")
        answer = letters[0]
    return ClassificationQ(question, options, answer, modality)


def _open_q(q: Any, where: str, cloze: bool) -> tuple[str, str, Modality]:
    q = _structured(q, where)
    question = _text(_get(q, "Question", where), where, "Question")
    if cloze and "__" not in question:
        raise BenchmarkFormatError(f"{where}: cloze question has no '__' blank: {question!r}")
    truth = _text(_get(q, "Ground_Truth", where), where, "Ground_Truth")
    kind = str(_get(q, "Type", where)).lower()
    if "pure" in kind or "text_only" in kind:
        return question, truth, "qa"
    if "image" in kind:
        return question, truth, "vqa"
    raise BenchmarkFormatError(f"{where}: Type must be Image_Textual or Pure_Text, got {kind!r}")


def _image(value: Any, where: str, file: Path) -> Image.Image:
    data: Any = value
    if isinstance(value, dict):
        data = _get(value, "bytes", where, required=False) or _get(value, "path", where, required=False)
    if isinstance(data, str):  # a path: absolute, or relative to the parquet file
        path = Path(data) if Path(data).is_absolute() else file.parent / data
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BenchmarkFormatError(f"{where}: unreadable image file {path} ({exc})") from exc
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BenchmarkFormatError(f"{where}: no image bytes (got {type(value).__name__})")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise BenchmarkFormatError(f"{where}: unreadable image ({exc})") from exc
    return img.convert("RGB")


def _get(d: Any, key: str, where: str, required: bool = True) -> Any:
    """``d[key]``, matching the key case-insensitively; a missing required key is a format error."""
    if not isinstance(d, dict):
        raise BenchmarkFormatError(f"{where}: expected a struct with field {key!r}, got {type(d).__name__}")
    if key in d:
        return d[key]
    for k, v in d.items():
        if isinstance(k, str) and k.lower() == key.lower():
            return v
    if required:
        raise BenchmarkFormatError(f"{where}: missing field {key!r}")
    return None


def _list(row: dict[str, Any], key: str, where: str) -> list[Any]:
    value = _structured(_get(row, key, where), f"{where} {key}")
    if value is None:
        return []
    if not isinstance(value, list):
        raise BenchmarkFormatError(f"{where}: {key} must be a list, got {type(value).__name__}")
    return value


def _structured(value: Any, where: str) -> Any:
    """Nested data as Python objects; some exports store it as JSON or Python-literal strings."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise BenchmarkFormatError(f"{where}: string is neither JSON nor a Python literal") from exc


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BenchmarkFormatError(f"{where}: {key} must be a non-empty string")
    return value


# ----- writing ----------------------------------------------------------------------------------
def _png(img: Image.Image) -> dict[str, Any]:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _row(p: Profile, test: bool) -> dict[str, Any]:
    def cls(modality: Modality) -> list[dict[str, Any]]:
        if any(sorted(q.options) != list("ABCD") for q in p.classification):
            raise ValueError(f"profile {p.id}: the parquet layout stores exactly the options A-D")
        return [{"Question": q.question, "Options": q.options, "Correct_Answer": q.answer}
                for q in p.classification if q.modality == modality]

    first = p.generation[0] if p.generation else None
    row: dict[str, Any] = {
        "ID": p.id, "name": p.name, "biography": p.biography,
        "question": first.question if first else "", "answer": first.ground_truth if first else "",
        "Classification_Task": {key: cls(m) for m, key in _CLS_KEYS.items()},
        "Generation_Task": [{"Question": q.question, "Ground_Truth": q.ground_truth, "Type": _TYPE_NAMES[q.modality]}
                            for q in p.generation],
        "Mask_Task": [{"Question": q.question, "Ground_Truth": q.ground_truth, "Type": _TYPE_NAMES[q.modality]}
                      for q in p.cloze],
        "facts": json.dumps(p.facts, sort_keys=True),
    }
    if test:
        row["images"] = [_png(im) for im in (p.test_images or [p.image])]
    else:
        if p.image is None:
            raise ValueError(f"profile {p.id} has no image to save")
        row["image"] = _png(p.image)
    return row


def _schema(test: bool) -> pa.Schema:
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cq = pa.struct([("Question", pa.string()), ("Options", pa.struct([(k, pa.string()) for k in "ABCD"])),
                    ("Correct_Answer", pa.string())])
    oq = pa.list_(pa.struct([("Question", pa.string()), ("Ground_Truth", pa.string()), ("Type", pa.string())]))
    return pa.schema([
        ("images", pa.list_(img)) if test else ("image", img),
        ("ID", pa.string()), ("name", pa.string()), ("biography", pa.string()),
        ("question", pa.string()), ("answer", pa.string()),
        ("Classification_Task", pa.struct([(k, pa.list_(cq)) for k in _CLS_KEYS.values()])),
        ("Generation_Task", oq), ("Mask_Task", oq), ("facts", pa.string()),
    ])
