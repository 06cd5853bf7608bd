"""Issue 12's defects, each on the file a new user would hand the loader: PathVQA splits from
image paths, PMC-VQA rows whose two answer columns disagree, bytes that are not UTF-8, ids
repeated across OmniMedVQA files, empty files, and image paths that leave image_root. Every error
names the file and the record; every skipped record is counted under its reason."""
import csv
import json

import pytest

from data import DataError, load_dataset

PMC_HEADER = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C",
              "Choice D", "Answer_label"]


def _csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header] + rows)
    return str(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _row(i, **over):
    return {"id": f"r{i}", "images": ["a.png"], "question": "Q?", "options": ["x", "y"],
            "answer": "x", **over}


# --- PathVQA: the split comes from the image's name, not its whole path ------------------------

def test_pathvqa_split_from_image_path_and_split_filter(tmp_path, png):
    for name in ("train_0001", "train_0002", "val_0001"):
        png(f"images/{name.split('_')[0]}/{name}.jpg")
    rows = [{"image": "images/train/train_0001.jpg", "question": "Q1?", "answer": "yes"},
            {"image": "images/train/train_0002", "question": "Q2?", "answer": "no"},
            {"image": "images/val/val_0001.jpg", "question": "Q3?", "answer": "yes"}]
    (tmp_path / "pathvqa.json").write_text(json.dumps(rows))
    data = load_dataset(str(tmp_path / "pathvqa.json"))
    assert [r.split for r in data] == ["train", "train", "val"]
    train = load_dataset(str(tmp_path / "pathvqa.json"), split="train")
    assert [r.question for r in train] == ["Q1?", "Q2?"] and train.report.filtered["split"] == 1


def test_a_filter_that_removes_everything_raises_and_lists_the_values_present(tmp_path, png):
    png("images/train/train_0001.jpg")
    rows = [{"image": "images/train/train_0001.jpg", "question": "Q?", "answer": "yes"}]
    (tmp_path / "pathvqa.json").write_text(json.dumps(rows))
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path / "pathvqa.json"), split="test")
    assert info.value.reason == "empty_dataset" and str(tmp_path / "pathvqa.json") in str(info.value)
    assert "split values present: 'train'=1" in str(info.value)
    empty = load_dataset(str(tmp_path / "pathvqa.json"), split="test", allow_empty=True)
    assert len(empty) == 0 and empty.report.filtered == {"split": 1}


# --- PMC-VQA: the Answer text and Answer_label must name the same option -----------------------

def _pmc_rows():
    return [["f.jpg", "Q0?", "MRI", "A:CT", "B:MRI", "C:PET", "D:US", "B"],      # agrees (text)
            ["f.jpg", "Q1?", "B:MRI", "A:CT", "B:MRI", "C:PET", "D:US", "B"],    # agrees (B:MRI)
            ["f.jpg", "Q2?", "PET", "A:CT", "B:MRI", "C:PET", "D:US", "B"],      # text says C
            ["f.jpg", "Q3?", "C", "A:CT", "B:MRI", "C:PET", "D:US", "B"],        # letter says C
            ["f.jpg", "Q4?", "CT", "A:CT", "B:MRI", "C:PET", "D:US", "AB"],      # two labels
            ["f.jpg", "Q5?", "PET", "A:CT", "", "C:PET", "D:US", "C"],           # gap at B
            ["f.jpg", "Q6?", "PET", "A:CT", "B:MRI", "C:PET", "", "C"]]          # 3 options: ok


def test_pmcvqa_disagreeing_rows_are_skipped_and_counted(tmp_path, png):
    png("f.jpg")
    path = _csv(tmp_path / "train.csv", PMC_HEADER, _pmc_rows())
    data = load_dataset(path, skip_invalid=True)
    assert [(r.question, r.answer, r.answer_letter) for r in data] == [
        ("Q0?", "MRI", "B"), ("Q1?", "MRI", "B"), ("Q6?", "PET", "C")]
    assert data[2].options == ["CT", "MRI", "PET"]
    assert dict(data.report.skipped) == {"answer_label_mismatch": 2, "multiple_answer_labels": 1,
                                         "option_gap": 1}
    assert (data.report.n_read, data.report.n_kept) == (7, 3)
    # rows are named by their CSV line (header = line 1): Q2 is on line 4
    assert "record line 4: field 'Answer': Answer 'PET' disagrees with Answer_label 'B'" in \
        data.report.examples_by_reason["answer_label_mismatch"][0]


@pytest.mark.parametrize("row,reason,field", [
    (["f.jpg", "Q?", "PET", "A:CT", "B:MRI", "C:PET", "D:US", "B"], "answer_label_mismatch", "Answer"),
    (["f.jpg", "Q?", "CT", "A:CT", "B:MRI", "C:PET", "D:US", "A,C"], "multiple_answer_labels",
     "Answer_label"),
    (["f.jpg", "Q?", "PET", "A:CT", "", "C:PET", "D:US", "C"], "option_gap", "Choice B"),
])
def test_pmcvqa_strict_mode_names_file_line_and_field(tmp_path, png, row, reason, field):
    png("f.jpg")
    path = _csv(tmp_path / "test.csv", PMC_HEADER, [_pmc_rows()[0], row])
    with pytest.raises(DataError) as info:
        load_dataset(path)
    error = info.value
    assert (error.reason, error.file, error.record, error.field) == (reason, path, "line 3", field)
    assert path in str(error) and "How to fix:" in str(error)


# --- bytes that are not UTF-8 ------------------------------------------------------------------

def test_bad_bytes_in_jsonl_are_skipped_and_counted_or_named(tmp_path, png):
    png("a.png")
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(_row(0)).encode() + b"\n"
                     + b'{"id": "r1", "images": ["a.png"], "question": "caf\xe9?", "answer": "x"}\n'
                     + json.dumps(_row(2)).encode() + b"\n")
    data = load_dataset(str(path), skip_invalid=True)
    assert [r.id for r in data] == ["r0", "r2"] and data.report.skipped == {"bad_encoding": 1}
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    assert (info.value.reason, info.value.file, info.value.record) == ("bad_encoding", str(path),
                                                                       "line 2")
    # '{"id": "r1", ' 13 bytes + '"images": ["a.png"], ' 21 + '"question": "' 13 + 'caf' 3 = 50
    assert "0xe9 at byte 51 of the line" in str(info.value)


def test_bad_bytes_in_csv_name_the_line_and_column(tmp_path, png):
    png("f.jpg")
    path = tmp_path / "t.csv"
    path.write_bytes(b"Figure_path,Question,Choice A,Choice B,Answer_label\n"
                     b"f.jpg,Q?,A:x,B:y,A\n"
                     b"f.jpg,Qu\xe9?,A:x,B:y,B\n")
    data = load_dataset(str(path), skip_invalid=True)
    assert [r.answer for r in data] == ["x"] and data.report.skipped == {"bad_encoding": 1}
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    assert (info.value.record, info.value.field) == ("line 3", "Question")
    assert "0xe9" in str(info.value) and str(path) in str(info.value)


def test_bad_bytes_in_json_name_the_item_and_its_line(tmp_path, png):
    png("i.png")
    good = {"question_id": "q0", "dataset": "D", "question": "Q", "gt_answer": "a",
            "image_path": "i.png", "option_A": "a", "option_B": "b"}
    text = ("[\n" + json.dumps(good) + ",\n" + json.dumps({**good, "question_id": "q1"})
            + ",\n" + json.dumps({**good, "question_id": "q2"}) + "\n]\n").encode()
    text = text.replace(b'"q1", "dataset": "D", "question": "Q"',
                        b'"q1", "dataset": "D", "question": "Q\xff"')
    (tmp_path / "D.json").write_bytes(text)
    data = load_dataset(str(tmp_path / "D.json"), skip_invalid=True)
    assert [r.id for r in data] == ["q0", "q2"] and data.report.skipped == {"bad_encoding": 1}
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path / "D.json"))
    assert info.value.record == "item 1 (id 'q1') at line 3" and info.value.field == "question"


def test_utf16_file_is_named(tmp_path):
    (tmp_path / "d.jsonl").write_bytes('{"id": "r0"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match="d.jsonl: record \\(file\\).*UTF-16"):
        load_dataset(str(tmp_path / "d.jsonl"), skip_invalid=True)


# --- duplicate ids across the files of an OmniMedVQA folder ------------------------------------

def _omni_folder(tmp_path, png):
    png("OmniMedVQA/Images/1.png")
    files = {"A.json": ["a1", "dup"], "B.json": ["b1"], "C.json": ["c1"], "D.json": ["dup", "d2"]}
    folder = tmp_path / "OmniMedVQA" / "QA_information" / "Open-access"
    folder.mkdir(parents=True)
    for name, ids in files.items():
        rows = [{"question_id": i, "dataset": name[0], "question": "Q?", "gt_answer": "x",
                 "image_path": "Images/1.png", "option_A": "x", "option_B": "y"} for i in ids]
        (folder / name).write_text(json.dumps(rows))
    return tmp_path / "OmniMedVQA", folder


def test_duplicate_ids_across_files_skip_and_name_both_files(tmp_path, png):
    root, folder = _omni_folder(tmp_path, png)
    data = load_dataset(str(root), skip_invalid=True)
    assert sorted(r.id for r in data) == ["a1", "b1", "c1", "d2", "dup"]
    assert [r.source for r in data if r.id == "dup"] == ["A"]  # the first occurrence is kept
    assert data.report.skipped == {"duplicate_id": 1} and data.report.n_read == 6
    with pytest.raises(DataError) as info:
        load_dataset(str(root))
    error = info.value
    assert (error.reason, error.file, error.record) == ("duplicate_id", str(folder / "D.json"),
                                                        "item 0 (id 'dup')")
    assert f"already used by {folder / 'A.json'} item 1 (id 'dup')" in str(error)
    assert "C.json" not in str(error) and "B.json" not in str(error)


# --- empty files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,content", [("d.jsonl", ""), ("d.jsonl", "\n  \n"),
                                          ("t.csv", ",".join(PMC_HEADER) + "\n"),
                                          ("d.json", ""), ("d.json", "[]")])
def test_empty_files_raise_naming_the_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    for skip in (False, True):
        with pytest.raises(DataError) as info:
            load_dataset(str(tmp_path / name), layout="jsonl" if name == "d.json" else "auto",
                         skip_invalid=skip)
        assert info.value.reason == "empty_file" and info.value.file == str(tmp_path / name)


def test_all_records_skipped_raises_empty_dataset(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [_row(0, images=["missing.png"])])
    with pytest.raises(DataError, match="no record is left .*skipped 1 invalid.*first skipped: .*"
                                        "line 1: field 'image'"):
        load_dataset(path, skip_invalid=True)


# --- image paths that leave image_root ---------------------------------------------------------

def test_image_outside_root_is_refused_unless_allowed(tmp_path, png):
    outside = png("x.png")
    (tmp_path / "data" / "sub").mkdir(parents=True)
    path = _jsonl(tmp_path / "data" / "sub" / "d.jsonl",
                  [_row(0, images=["../../x.png"]), _row(1, images=[outside])])
    with pytest.raises(DataError) as info:
        load_dataset(path)
    error = info.value
    assert (error.reason, error.record, error.field) == ("image_outside_root", "line 1", "images")
    assert "allow_outside_root=True" in str(error) and str(tmp_path / "data" / "sub") in str(error)
    skipped = load_dataset(path, skip_invalid=True)
    assert [r.id for r in skipped] == ["r1"] and skipped.report.skipped == {"image_outside_root": 1}
    allowed = load_dataset(path, allow_outside_root=True)
    assert [r.images for r in allowed] == [[outside], [outside]]
    # a path that goes up and comes back in stays inside
    png("data/sub/in.png")
    inside = _jsonl(tmp_path / "data" / "sub" / "e.jsonl", [_row(0, images=["../sub/in.png"])])
    assert load_dataset(inside)[0].images == [str(tmp_path / "data" / "sub" / "in.png")]


# --- damaged files: a DataError naming the file, never a bare exception ------------------------

@pytest.mark.parametrize("name,content,problem", [
    ("d.json", b"42", "expected a JSON list of records, got int"),
    ("d.json", b'[{"image": "a.png", "question": "q", "answer"', "not valid JSON"),
    ("d.json", b'[{"a": 1}]', "cannot guess the layout from the first record's keys ['a']"),
    ("d.pkl", "caf\xe9".encode("latin1"), "cannot unpickle"),
    ("d.pkl", b"\x80\x04K\x05.", "expected a list of records, got int"),   # pickle.dumps(5)
    ("d.parquet", b"PAR1", "not a readable Parquet file"),
])
def test_damaged_files_raise_data_errors_naming_the_file(tmp_path, name, content, problem):
    (tmp_path / name).write_bytes(content)
    for skip in (False, True):
        with pytest.raises(DataError) as info:
            load_dataset(str(tmp_path / name), skip_invalid=skip)
        assert info.value.file == str(tmp_path / name) and problem in str(info.value)
