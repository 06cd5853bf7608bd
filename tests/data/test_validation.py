"""Every bad-input case raises a DataError naming file, record, field and a fix; skip_invalid
counts each skipped record by reason."""
import json

import pytest

from data import DataError, load_dataset


def _write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _row(i, **over):
    return {"id": f"r{i}", "images": ["a.png"], "question": "Q?", "options": ["x", "y"],
            "answer": "x", **over}


CASES = [  # (bad row, reason, field named in the message)
    (_row(1, images=["nope.png"]), "missing_image", "image"),
    (_row(1, images=["broken.png"]), "unreadable_image", "image"),
    (_row(1, answer=""), "missing_answer", "answer"),
    (_row(1, answer="z"), "answer_not_in_options", "answer"),
    (_row(1, answr="x"), "unknown_column", "answr"),
    (_row(1, question=" "), "missing_field", "question"),
]


@pytest.mark.parametrize("bad,reason,field", CASES, ids=[c[1] for c in CASES])
def test_error_names_file_line_field_and_fix(tmp_path, png, bad, reason, field):
    png("a.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = _write(tmp_path, [_row(0), bad])
    with pytest.raises(DataError) as info:
        load_dataset(path)
    error = info.value
    assert (error.reason, error.file, error.record, error.field) == (reason, path, "line 2", field)
    message = str(error)
    assert path in message and "line 2" in message and f"'{field}'" in message
    assert "How to fix:" in message


def test_duplicate_id_names_both_lines(tmp_path, png):
    png("a.png")
    path = _write(tmp_path, [_row(0), _row(1), _row(0)])
    with pytest.raises(DataError, match=r"line 3: field 'id': id 'r0' already used by line 1"):
        load_dataset(path)


def test_bad_json_line(tmp_path, png):
    png("a.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_row(0)) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2.*not valid JSON"):
        load_dataset(str(path))


def test_skip_invalid_counts_every_reason(tmp_path, png):
    png("a.png")
    (tmp_path / "broken.png").write_bytes(b"garbage")
    rows = [_row(0)] + [dict(bad, id=f"bad{i}") for i, (bad, _, _) in enumerate(CASES)]
    rows += [_row(0), _row(9)]  # a duplicate of r0 and one more good record
    data = load_dataset(_write(tmp_path, rows), skip_invalid=True)
    assert [r.id for r in data] == ["r0", "r9"]
    report = data.report
    assert (report.n_read, report.n_kept, report.n_skipped) == (9, 2, 7)
    assert dict(report.skipped) == {"missing_image": 1, "unreadable_image": 1,
                                    "missing_answer": 1, "answer_not_in_options": 1,
                                    "unknown_column": 1, "missing_field": 1, "duplicate_id": 1}
    assert "skipped 7 invalid" in report.summary() and len(report.examples) == 5


def test_unknown_columns_extra_keeps_them(tmp_path, png):
    png("a.png")
    path = _write(tmp_path, [_row(0, note="kept")])
    assert load_dataset(path, unknown_columns="extra")[0].extra == {"note": "kept"}
    assert load_dataset(path, unknown_columns="ignore")[0].extra == {}


def test_pmcvqa_label_out_of_range(tmp_path, png):
    png("f.jpg")
    (tmp_path / "t.csv").write_text("Figure_path,Question,Answer,Choice A,Choice B,Answer_label\n"
                                    "f.jpg,Q?,x,A:x,B:y,D\n")
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path / "t.csv"))
    assert (info.value.reason, info.value.record, info.value.field) == (
        "answer_not_in_options", "line 2", "Answer_label")


def test_omnimedvqa_missing_answer_names_id(tmp_path, png):
    png("i.png")
    rows = [{"question_id": "q9", "dataset": "D", "question": "Q", "gt_answer": "",
             "image_path": "i.png", "option_A": "a", "option_B": "b"}]
    (tmp_path / "D.json").write_text(json.dumps(rows))
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path / "D.json"))
    assert info.value.reason == "missing_answer" and "q9" in info.value.record


def test_check_images_exists_skips_decoding(tmp_path, png):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    path = _write(tmp_path, [_row(0, images=["broken.png"])])
    assert len(load_dataset(path, check_images="exists")) == 1
