"""The R1 layout of VLM-R1, R1-V, Med-R1 and PathVLM-R1 data files: {"image", "problem",
"solution"}, options written inside the problem, the answer as a letter, letter + text, or text."""
import json

import pytest

from data import DataError, detect_layout, load_dataset
from data.layouts import parse_problem, parse_solution


@pytest.mark.parametrize("problem,question,options", [
    # Med-R1's own sample: no space after the marker, an option holding "(PET)"
    ("What imaging technique is employed for obtaining this image? A)Mammogram, "
     "B)Positron emission tomography (PET), C)CT, D)Fluoroscopy",
     "What imaging technique is employed for obtaining this image?",
     ["Mammogram", "Positron emission tomography (PET)", "CT", "Fluoroscopy"]),
    # one option per line, an instruction after them
    ("<image>Which grade?\nOptions:\nA. low grade\nB. high grade\nAnswer with the option's letter.",
     "Which grade?", ["low grade", "high grade"]),
    # "(A)" markers, "or" between the last two
    ("Is it (A) benign, (B) borderline or (C) malignant?", "Is it",
     ["benign", "borderline", "malignant?"]),
    # "A:" markers; a letter inside the question text does not start the options
    ("Which vitamin, A or B? A: vitamin A; B: vitamin B", "Which vitamin, A or B?",
     ["vitamin A", "vitamin B"]),
    # an open question (R1-V counting)
    ("How many cubes are there?", "How many cubes are there?", None),
])
def test_parse_problem(problem, question, options):
    assert parse_problem(problem) == (question, options)


OPTIONS = ["Mammogram", "PET", "CT", "Fluoroscopy"]


@pytest.mark.parametrize("solution,answer", [
    ("<answer> C </answer>", "CT"),
    ("<think>looks like a scanner</think><answer>(C)</answer>", "CT"),
    ("C) CT", "CT"), ("C. ct", "CT"), ("CT", "CT"), ("<answer> Fluoroscopy </answer>", "Fluoroscopy"),
    ("<answer> E </answer>", None),        # no option E
    ("<answer> C) PET </answer>", None),   # letter and text disagree
    ("<answer> Ultrasound </answer>", None),
    ("<answer>  </answer>", None),
])
def test_parse_solution_with_options(solution, answer):
    assert parse_solution(solution, OPTIONS)[0] == answer


def test_parse_solution_open_question():
    assert parse_solution("<answer> 3 </answer>", None) == ("3", "")
    assert parse_solution("B", None)[0] is None  # a letter needs options


def _write(tmp_path, rows, name="train.json"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


def test_r1_files_load_detect_and_count_unresolved(tmp_path, png):
    ct = png("Images/Chest CT Scan/test/000139 (9).png")
    left, right = png("pair/l.png", size=(56, 56)), png("pair/r.png", size=(112, 84))
    rows = [
        {"image": "Images/Chest CT Scan/test/000139 (9).png",
         "problem": "What imaging technique is employed for obtaining this image? A)Mammogram, "
                    "B)PET, C)CT, D)Fluoroscopy", "solution": "<answer> C </answer>"},
        {"image": ["pair/l.png", "pair/r.png"],
         "problem": "Which image shows more nuclei?\nA. the first\nB. the second",
         "solution": "B. the second", "id": "pair-1", "modality": "H&E"},
        {"image": "pair/l.png", "problem": "How many nuclei?", "solution": "<answer> 3 </answer>"},
        {"image": "pair/l.png", "problem": "Q? A) x, B) y", "solution": "<answer> C </answer>"},
        {"image": "pair/l.png", "problem": "Q? A) x, B) y", "solution": "<answer> z </answer>"},
    ]
    for name in ("train.json", "train.jsonl"):
        path = _write(tmp_path, rows, name)
        assert detect_layout(path) == "r1"
        data = load_dataset(path, skip_invalid=True)
        assert [(r.images, r.question, r.options, r.answer, r.answer_letter) for r in data] == [
            ([ct], "What imaging technique is employed for obtaining this image?",
             ["Mammogram", "PET", "CT", "Fluoroscopy"], "CT", "C"),
            ([left, right], "Which image shows more nuclei?", ["the first", "the second"],
             "the second", "B"),
            ([left], "How many nuclei?", None, "3", None)]
        assert data.report.skipped == {"unresolved_answer": 2} and data.report.n_read == 5
        assert data[1].id == "pair-1" and data[1].modality == "pathology"
        assert data[0].extra["problem"] == rows[0]["problem"]
    # generated ids: the item index in JSON (0-based), the line in JSONL (1-based)
    assert [r.id for r in load_dataset(_write(tmp_path, rows, "train.json"), skip_invalid=True)] \
        == ["r1-train-0", "pair-1", "r1-train-2"]
    assert load_dataset(path, skip_invalid=True)[0].id == "r1-train-1"


def test_r1_unresolved_answer_raises_naming_the_record(tmp_path, png):
    png("a.png")
    path = _write(tmp_path, [{"image": "a.png", "problem": "Q? A) x, B) y",
                              "solution": "<answer> D </answer>"}], "d.jsonl")
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert (info.value.reason, info.value.record, info.value.field) == (
        "unresolved_answer", "line 1", "solution")
    assert "letter D names no option (there are 2)" in str(info.value)
