"""Hugging Face copies: Parquet files whose images are {bytes, path} structs (PathVQA, VQA-RAD)
read through pyarrow, and in-memory ``datasets.Dataset`` objects, both through the layouts; image
bytes land once in a content-addressed cache and record ids do not move."""
import io
import json
import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data import DataError, as_records, detect_layout, from_hf_dataset, load_dataset
from data.convert import RowView
from data.layouts import pathvqa_or_vqarad
from data.readers import sha256_hex
from data.splits import split_records


def _png(size, colour):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


RED, BLUE = _png((40, 30), (255, 0, 0)), _png((30, 60), (0, 0, 255))


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([r[0] for r in rows], type=image),
                      "question": [r[1] for r in rows], "answer": [r[2] for r in rows]})
    pq.write_table(table, path, row_group_size=2)  # several row groups: read in batches
    return str(path)


def test_pathvqa_parquet_images_cached_once_and_ids_stable(tmp_path):
    path = _parquet(tmp_path / "path-vqa" / "data" / "train-00000-of-00002.parquet", [
        ({"bytes": RED, "path": "train_0001.jpg"}, "Is this lung?", "yes"),
        ({"bytes": None, "path": None}, "broken row?", "no"),        # no image at all
        ({"bytes": BLUE, "path": None}, "What is present?", "granuloma"),
        ({"bytes": RED, "path": "train_0001.jpg"}, "Is it normal?", "no")])
    assert detect_layout(path) == "pathvqa"
    cache = tmp_path / "cache"
    data = load_dataset(path, skip_invalid=True, image_cache=str(cache))
    assert [(r.id, r.question, r.split) for r in data] == [
        ("pathvqa-train-00000-of-00002-0", "Is this lung?", "train"),
        ("pathvqa-train-00000-of-00002-2", "What is present?", "train"),
        ("pathvqa-train-00000-of-00002-3", "Is it normal?", "train")]
    assert data.report.skipped == {"missing_field": 1}
    assert "record row 1: field 'image'" in data.report.examples[0]
    red = str(cache / (sha256_hex(RED)[:20] + ".jpg"))     # named by content, ext from its path
    blue = str(cache / (sha256_hex(BLUE)[:20] + ".png"))   # no path: ext sniffed from the bytes
    assert [r.images for r in data] == [[red], [blue], [red]]
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(red), os.path.basename(blue)])
    assert Image.open(blue).size == (30, 60)
    stamp = os.stat(red).st_mtime_ns
    again = load_dataset(path, skip_invalid=True, image_cache=str(cache))
    assert [r.id for r in again] == [r.id for r in data] and os.stat(red).st_mtime_ns == stamp
    # default cache: $GRPO_VLM_CACHE/images (tests point it at a temporary folder)
    default = load_dataset(path, skip_invalid=True)
    assert default[0].images == [os.path.join(os.environ["GRPO_VLM_CACHE"], "images",
                                              os.path.basename(red))]


def test_vqarad_parquet_detected_by_name_and_paths_without_bytes(tmp_path, png):
    image = png("vqa-rad/data/synpic1.jpg")
    path = _parquet(tmp_path / "vqa-rad" / "data" / "test-00000-of-00001.parquet", [
        ({"bytes": BLUE, "path": "synpic2.jpg"}, "is there a mass?", "no"),
        ({"bytes": None, "path": "synpic1.jpg"}, "is this a ct?", "yes")])
    assert detect_layout(path) == "vqarad"
    data = load_dataset(path, image_cache=str(tmp_path / "cache"))
    assert [(r.id, r.source, r.answer) for r in data] == [
        ("vqarad-test-00000-of-00001-0", "VQA-RAD", "no"),
        ("vqarad-test-00000-of-00001-1", "VQA-RAD", "yes")]
    assert data[1].images == [image]


def test_hf_exports_told_apart_by_their_names(tmp_path, caplog):
    rows = lambda image: [{"image": image, "question": "q?", "answer": "a"}]  # noqa: E731
    (tmp_path / "rad.json").write_text(json.dumps(rows("synpic54610.jpg")))
    (tmp_path / "pv.json").write_text(json.dumps(rows("train_0422.jpg")))
    (tmp_path / "other.json").write_text(json.dumps(rows("x.jpg")))
    with caplog.at_level("WARNING", logger="data.loaders"):
        assert detect_layout(str(tmp_path / "rad.json")) == "vqarad"  # MedPix image names
        assert detect_layout(str(tmp_path / "pv.json")) == "pathvqa"
        assert not caplog.records
        assert detect_layout(str(tmp_path / "other.json")) == "pathvqa"
    assert "pass layout='vqarad' for a VQA-RAD export" in caplog.records[0].getMessage()
    # the nearest name in the path wins: a VQA-RAD copy inside a folder of PathVQA experiments
    assert pathvqa_or_vqarad("/runs/path-vqa/copies/vqa_rad/train.parquet") == ("vqarad", True)


def test_damaged_and_empty_parquet_name_the_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="bad.parquet: record \\(file\\).*not a readable Parquet"):
        load_dataset(str(tmp_path / "bad.parquet"), layout="pathvqa")
    empty = _parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(DataError) as info:
        load_dataset(empty, skip_invalid=True)
    assert info.value.reason == "empty_file" and info.value.file == empty


def _image_dataset():
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": RED, "path": None}, {"bytes": BLUE, "path": None}],
         "question": ["Is this lung?", "What is present?"], "answer": ["yes", "granuloma"]},
        split="train").cast_column("image", datasets.Image())


def test_datasets_dataset_goes_through_the_layouts(tmp_path):
    ds = _image_dataset()
    assert isinstance(ds[0]["image"], Image.Image)  # datasets decodes; the loader does not
    data = from_hf_dataset(ds, image_cache=str(tmp_path / "cache"))
    assert [(r.id, r.split, r.source) for r in data] == [("pathvqa-train-0", "train", "PathVQA"),
                                                         ("pathvqa-train-1", "train", "PathVQA")]
    # the stored bytes themselves, not a re-encoding of the decoded image
    assert [open(r.images[0], "rb").read() for r in data] == [RED, BLUE]
    assert [r.id for r in load_dataset(ds, image_cache=str(tmp_path / "cache"))] == \
        ["pathvqa-train-0", "pathvqa-train-1"]
    assert [r.source for r in as_records(ds, layout="vqarad", image_cache=str(tmp_path))] == \
        ["VQA-RAD", "VQA-RAD"]
    # a shuffled / selected dataset keeps each row's own content
    picked = from_hf_dataset(ds.select([1]), image_cache=str(tmp_path / "cache"))
    assert [(r.question, r.id) for r in picked] == [("What is present?", "pathvqa-train-0")]


def test_datasets_r1_with_image_lists_and_a_bad_row(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"image": [[{"bytes": RED, "path": None}, {"bytes": BLUE, "path": None}],
                   [{"bytes": RED, "path": None}]],
         "problem": ["Which is red? A) the first B) the second", "Q? A) x B) y"],
         "solution": ["<answer> A </answer>", "<answer> C </answer>"]},
    ).cast_column("image", datasets.Sequence(datasets.Image()))
    data = from_hf_dataset(ds, skip_invalid=True, image_cache=str(tmp_path))
    assert len(data) == 1 and data.report.skipped == {"unresolved_answer": 1}
    assert [Image.open(p).size for p in data[0].images] == [(40, 30), (30, 60)]
    assert data[0].answer == "the first" and data[0].id == "r1-dataset-0"
    with pytest.raises(DataError) as info:
        from_hf_dataset(ds, image_cache=str(tmp_path))
    assert (info.value.file, info.value.record) == ("datasets.Dataset (in memory)", "row 1")
    assert str(info.value).startswith("datasets.Dataset (in memory): record row 1: field 'solution'")
    named = from_hf_dataset(_image_dataset(), image_cache=str(tmp_path))
    assert named.report.source == "datasets.Dataset split 'train'"


def test_split_records_accepts_a_dataset_and_rejects_dict_items(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_VLM_CACHE", str(tmp_path))
    parts = split_records(_image_dataset(), {"a": 1, "b": 1}, seed=0)
    assert sorted(r.question for part in parts.values() for r in part) == [
        "Is this lung?", "What is present?"]
    with pytest.raises(TypeError, match="needs data.VQARecord items"):
        split_records([{"id": "x"}], (1,))


def test_chat_datasets_are_read_row_by_row_and_dataset_dicts_refused():
    chat = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]] * 3,
                                       "answer": ["a", "b", "c"]})
    rows = as_records(chat)
    assert isinstance(rows, RowView) and len(rows) == 3
    assert rows[1]["answer"] == "b" and [r["answer"] for r in rows[1:]] == ["b", "c"]
    assert as_records([1, 2]) == [1, 2]
    with pytest.raises(ValueError, match="DatasetDict with splits \\['test', 'train'\\]"):
        as_records(datasets.DatasetDict({"train": chat, "test": chat}))
