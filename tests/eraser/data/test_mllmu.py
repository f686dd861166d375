"""MLLMU-Bench parquet loader: round trip through the writer, lenient layouts, strict content errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eraser.data.mini import MiniMLLMU
from eraser.data.mllmu import BenchmarkFormatError, load_mllmu, save_mllmu, split_names
from eraser.data.schema import Benchmark


@pytest.fixture(scope="module")
def gen() -> MiniMLLMU:
    return MiniMLLMU(seed=0)


@pytest.fixture(scope="module")
def saved(gen: MiniMLLMU, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_mllmu(gen, tmp_path_factory.mktemp("mllmu"))


@pytest.fixture()
def copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "bench"))


def _same(a: Benchmark, b: Benchmark) -> None:
    for split in ("forget", "retain", "test", "celebrity"):
        pa_, pb = a.split(split), b.split(split)
        assert [p.id for p in pa_] == [p.id for p in pb], split
        for x, y in zip(pa_, pb):
            assert (x.name, x.biography, x.facts) == (y.name, y.biography, y.facts)
            assert (x.classification, x.generation, x.cloze) == (y.classification, y.generation, y.cloze)
            assert x.image.tobytes() == y.image.tobytes() and x.image.size == y.image.size
            assert [i.tobytes() for i in x.test_images] == [i.tobytes() for i in y.test_images]


def test_split_names() -> None:
    assert split_names(5) == {"forget": "forget_5", "retain": "retain_95", "test": "Test_Set", "celebrity": "Retain_Set"}
    assert split_names(15)["retain"] == "retain_85"


def test_layout_written(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == sorted(
        f"{s}.parquet" for s in ["forget_5", "forget_10", "forget_15", "retain_95", "retain_90", "retain_85",
                                 "Test_Set", "Retain_Set"])
    assert "images" in pq.read_schema(saved / "Test_Set.parquet").names
    assert pq.read_table(saved / "Test_Set.parquet").num_rows == 15


@pytest.mark.parametrize("ratio", [5, 10, 15])
def test_round_trip(gen: MiniMLLMU, saved: Path, ratio: int) -> None:
    _same(gen.build(ratio), load_mllmu(saved, ratio))


def test_sharded_layout_under_data_folder(tmp_path: Path) -> None:
    small = MiniMLLMU(seed=3, n_profiles=20, n_celebrities=4, image_size=32, n_test_images=2)
    save_mllmu(small, tmp_path / "data", sharded=True)
    assert (tmp_path / "data" / "forget_10" / "0.parquet").exists()
    _same(small.build(10), load_mllmu(tmp_path, 10))


def test_hugging_face_shard_names_load_and_two_copies_of_a_split_are_refused(tmp_path: Path) -> None:
    import shutil

    small = MiniMLLMU(seed=3, n_profiles=20, n_celebrities=4, image_size=32, n_test_images=2)
    save_mllmu(small, tmp_path / "flat")
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    for f in (tmp_path / "flat").glob("*.parquet"):  # the names a Hugging Face dataset export gives its shards
        shutil.copy(f, hub / f"{f.stem}-00000-of-00001.parquet")
    _same(small.build(5), load_mllmu(tmp_path / "hub", 5))
    (hub / "forget_5").mkdir()
    shutil.copy(tmp_path / "flat" / "forget_5.parquet", hub / "forget_5" / "0.parquet")
    with pytest.raises(BenchmarkFormatError, match="split 'forget_5' is stored more than once"):
        load_mllmu(tmp_path / "hub", 5)


def _rewrite(path: Path, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    rows = edit(pq.read_table(path).to_pylist())
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_lenient_encodings(gen: MiniMLLMU, copy: Path) -> None:
    """Raw image bytes, JSON-string tasks, lower-case keys, integer IDs, answer text instead of letter."""
    def edit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for r in rows:
            r["image"] = r["image"]["bytes"]
            r["Generation_Task"] = json.dumps(r["Generation_Task"])
            r["mask_task"] = r.pop("Mask_Task")
            q = r["Classification_Task"]["Image_Textual_Questions"][0]
            q["Correct_Answer"] = q["Options"][q["Correct_Answer"]]
        return rows
    _rewrite(copy / "forget_5.parquet", edit)
    _same(gen.build(5), load_mllmu(copy, 5))


@pytest.mark.parametrize("bad", [0, 20, 95, "5"])
def test_bad_ratio(saved: Path, bad: Any) -> None:
    with pytest.raises(BenchmarkFormatError, match=r"\(5, 10, 15\)"):
        load_mllmu(saved, bad)
    assert issubclass(BenchmarkFormatError, ValueError)


def test_missing_split_file(copy: Path) -> None:
    (copy / "retain_95.parquet").unlink()
    with pytest.raises(BenchmarkFormatError, match="retain_95"):
        load_mllmu(copy, 5)
    with pytest.raises(BenchmarkFormatError, match="does not exist"):
        load_mllmu(copy / "nowhere", 5)


@pytest.mark.parametrize("field", ["Mask_Task", "ID", "image", "biography", "Classification_Task"])
def test_missing_field(copy: Path, field: str) -> None:
    _rewrite(copy / "forget_5.parquet", lambda rows: [{k: v for k, v in r.items() if k != field} for r in rows])
    with pytest.raises(BenchmarkFormatError, match=rf"forget_5\.parquet: row 0.*'{field}'"):
        load_mllmu(copy, 5)


def test_a_test_set_without_images_names_its_images_field(copy: Path) -> None:
    _rewrite(copy / "Test_Set.parquet", lambda rows: [{k: v for k, v in r.items() if k != "images"} for r in rows])
    with pytest.raises(BenchmarkFormatError, match=r"Test_Set\.parquet: row 0.*missing field 'images'"):
        load_mllmu(copy, 5)


def test_missing_nested_field(copy: Path) -> None:
    def edit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        del rows[1]["Generation_Task"][2]["Ground_Truth"]
        return rows
    _rewrite(copy / "retain_95.parquet", edit)
    with pytest.raises(BenchmarkFormatError, match=r"retain_95\.parquet: row 1 .*Generation_Task\[2\].*Ground_Truth"):
        load_mllmu(copy, 5)


@pytest.mark.parametrize("split,column", [("forget_5", "image"), ("Test_Set", "images")])
def test_unreadable_image(copy: Path, split: str, column: str) -> None:
    def edit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        garbage = {"bytes": b"not a png at all", "path": None}
        rows[0][column] = [garbage] if column == "images" else garbage
        return rows
    _rewrite(copy / f"{split}.parquet", edit)
    with pytest.raises(BenchmarkFormatError, match=rf"{split}\.parquet: row 0 .*unreadable image"):
        load_mllmu(copy, 5)


def test_bad_content(copy: Path) -> None:
    def edit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows[0]["Mask_Task"][0]["Question"] = "no blank here"
        return rows
    _rewrite(copy / "Retain_Set.parquet", edit)
    with pytest.raises(BenchmarkFormatError, match="Retain_Set.*no '__' blank"):
        load_mllmu(copy, 5)


def test_bad_type_and_missing_test_rows(copy: Path) -> None:
    def bad_type(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows[0]["Generation_Task"][0]["Type"] = "Audio"
        return rows
    _rewrite(copy / "forget_10.parquet", bad_type)
    with pytest.raises(BenchmarkFormatError, match="Type must be"):
        load_mllmu(copy, 10)
    _rewrite(copy / "Test_Set.parquet", lambda rows: rows[1:])
    with pytest.raises(BenchmarkFormatError, match="Test_Set: no rows for forget ids"):
        load_mllmu(copy, 15)


def test_empty_split_overlap_duplicates_and_question_less_rows_are_refused(copy: Path) -> None:
    forget_rows = pq.read_table(copy / "forget_5.parquet").to_pylist()
    _rewrite(copy / "retain_95.parquet", lambda rows: rows + forget_rows[:1])  # a forget person also retained
    with pytest.raises(BenchmarkFormatError, match=rf"1 identities are in both forget_5 and retain_95: "
                                                   rf"\['{forget_rows[0]['ID']}'\]"):
        load_mllmu(copy, 5)
    _rewrite(copy / "retain_95.parquet", lambda rows: rows[:-1])
    load_mllmu(copy, 5)  # repaired
    _rewrite(copy / "Retain_Set.parquet", lambda rows: rows + rows[:1])
    with pytest.raises(BenchmarkFormatError, match=r"Retain_Set: identities appear more than once"):
        load_mllmu(copy, 5)
    _rewrite(copy / "Retain_Set.parquet", lambda rows: rows[:-1])
    _rewrite(copy / "forget_10.parquet", lambda rows: [])
    with pytest.raises(BenchmarkFormatError, match=r"split 'forget_10' has no rows"):
        load_mllmu(copy, 10)

    def no_questions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows[2]["Generation_Task"], rows[2]["Mask_Task"] = None, None
        rows[2]["Classification_Task"] = {"Image_Textual_Questions": None, "Pure_Text_Questions": None}
        return rows
    _rewrite(copy / "forget_15.parquet", no_questions)
    with pytest.raises(BenchmarkFormatError, match=r"forget_15\.parquet: row 2 .*no questions at all"):
        load_mllmu(copy, 15)


def test_list_options_duplicate_answer_texts_text_only_types_and_pooled_test_images(gen: MiniMLLMU,
                                                                                    copy: Path) -> None:
    """From a mutation audit, four export variants nothing exercised: Options as a list (lettered A, B, C, D), an
    answer text matching two options (the first letter), Type "text_only" (a QA question), and several Test_Set rows
    for one identity (their images pooled)."""
    import io

    from PIL import Image

    rows = pq.read_table(copy / "forget_5.parquet").to_pylist()
    cls = rows[0]["Classification_Task"]
    first, second = cls["Image_Textual_Questions"][0], cls["Pure_Text_Questions"][0]
    opts = [first["Options"][k] for k in "ABCD"]
    twice = [second["Options"]["A"], "same text", second["Options"]["C"], "same text"]

    def edit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, r in enumerate(rows):
            c = r["Classification_Task"]
            if i == 0:
                c["Image_Textual_Questions"][0].update(Options=opts, Correct_Answer="C")
                c["Pure_Text_Questions"][0].update(Options=twice, Correct_Answer="same text")
                r["Generation_Task"][0]["Type"] = "text_only"
            r["Classification_Task"] = json.dumps(c)  # one column type for the list and the mappings
        return rows
    _rewrite(copy / "forget_5.parquet", edit)

    pid = rows[0]["ID"]
    buf = io.BytesIO()
    Image.new("RGB", (9, 7), (1, 2, 3)).save(buf, format="PNG")

    def extra_test_row(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        row = dict(next(r for r in rows if r["ID"] == pid))
        row["images"] = [{"bytes": buf.getvalue(), "path": None}]
        return rows + [row]
    _rewrite(copy / "Test_Set.parquet", extra_test_row)

    before = gen.build(5)
    bench = load_mllmu(copy, 5)
    p, p0 = bench.forget[0], before.forget[0]
    assert p.id == pid == p0.id
    vqa = [q for q in p.classification if q.modality == "vqa"]
    qa = [q for q in p.classification if q.modality == "qa"]
    assert vqa[0].options == dict(zip("ABCD", opts)) and vqa[0].answer == "C"
    assert qa[0].options == dict(zip("ABCD", twice)) and qa[0].answer == "B"
    assert p.generation[0].modality == "qa" and p0.generation[0].modality == "vqa"
    assert p.generation[0].question == p0.generation[0].question and p.generation[1:] == p0.generation[1:]
    n = len(before.test[0].test_images)
    assert len(bench.test[0].test_images) == n + 1
    assert [i.tobytes() for i in bench.test[0].test_images[:n]] == [i.tobytes() for i in before.test[0].test_images]
    assert bench.test[0].test_images[n].size == (9, 7) and bench.test[0].test_images[n].getpixel((0, 0)) == (1, 2, 3)
