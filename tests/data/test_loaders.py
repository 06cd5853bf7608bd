"""Each public layout, written in its exact column names, loads into the expected records."""
import csv
import json
import pickle

import pytest

from data import VQARecord, detect_layout, load_dataset


def test_jsonl_round_trip(tmp_path, png):
    image = png("img/a.png")
    record = VQARecord(id="r1", images=["img/a.png"], question="Q?", options=["x", "y"],
                       answer="y", modality="pathology", source="mine", criteria=["c1"],
                       extra={"k": 1})
    (tmp_path / "d.jsonl").write_text(record.to_json() + "\n\n")
    data = load_dataset(str(tmp_path / "d.jsonl"))
    assert len(data) == 1 and data.report.n_kept == 1
    got = data[0]
    assert got.images == [image] and got.answer_letter == "B" and got.extra == {"k": 1}
    assert VQARecord.from_json(got.to_json()) == got


def test_jsonl_letter_answer_becomes_text(tmp_path, png):
    png("a.png")
    row = {"id": "1", "image": "a.png", "question": "Q", "options": ["p", "q", "r"],
           "answer": "C"}
    (tmp_path / "d.jsonl").write_text(json.dumps(row))
    record = load_dataset(str(tmp_path / "d.jsonl"))[0]
    assert record.answer == "r" and record.answer_letter == "C"


def test_pathvqa_pickle_layout(tmp_path, png):
    # Original release: qas/<split>/<split>_qa.pkl, images/<split>/<name>.jpg, name w/o ext.
    image = png("images/train/train_0422.jpg")
    qa = tmp_path / "qas" / "train"
    qa.mkdir(parents=True)
    rows = [{"image": "train_0422", "question": "Is this lung?", "answer": "yes"}]
    (qa / "train_qa.pkl").write_bytes(pickle.dumps(rows))
    data = load_dataset(str(qa / "train_qa.pkl"))
    assert [(r.images, r.answer, r.split, r.source, r.modality) for r in data] == [
        ([image], "yes", "train", "PathVQA", "pathology")]


def test_pathvqa_pickle_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (tmp_path / "x.pkl").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        load_dataset(str(tmp_path / "x.pkl"))


def test_pathvqa_json_export(tmp_path, png):
    image = png("figs/p1.png")
    (tmp_path / "pv.json").write_text(json.dumps(
        [{"image": "figs/p1.png", "question": "what is present?", "answer": "granuloma"}]))
    assert detect_layout(str(tmp_path / "pv.json")) == "pathvqa"
    record = load_dataset(str(tmp_path / "pv.json"))[0]
    assert record.images == [image] and record.answer == "granuloma" and record.options is None


def test_pmcvqa_csv(tmp_path, png):
    image = png("images/PMC1_fig2.jpg")
    header = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C",
              "Choice D", "Answer_label"]
    rows = [["PMC1_fig2.jpg", "What modality is shown?", "MRI", " A:CT ", " B:MRI ", " C:PET ",
             " D:X-ray ", "B"]]
    with open(tmp_path / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header] + rows)
    record = load_dataset(str(tmp_path / "train.csv"))[0]
    assert record.options == ["CT", "MRI", "PET", "X-ray"]
    assert (record.answer, record.answer_letter, record.images) == ("MRI", "B", [image])
    assert record.id == "pmcvqa-train-2" and record.source == "PMC-VQA"


def test_letter_prefix_removed_only_when_it_is_the_options_own(tmp_path, png):
    png("f.jpg")
    (tmp_path / "t.csv").write_text("Figure_path,Question,Choice A,Choice B,Choice C,Answer_label\n"
                                    "f.jpg,Which fungus?,A:Candida,B:Mucor,A. fumigatus,C\n")
    record = load_dataset(str(tmp_path / "t.csv"))[0]
    assert record.options == ["Candida", "Mucor", "A. fumigatus"]
    assert record.answer == "A. fumigatus"


def _omni(tmp_path, png):
    root = tmp_path / "OmniMedVQA"
    files = {
        "Chest CT Scan": [{"question_id": "ct_1", "dataset": "Chest CT Scan",
                           "question_type": "Disease Diagnosis", "question": "What is shown?",
                           "gt_answer": "Adenocarcinoma", "image_path": "Images/ct/1.png",
                           "option_A": "Adenocarcinoma", "option_B": "Normal",
                           "option_C": "", "modality_type": "CT(Computed Tomography)"}],
        "ISIC2020": [{"question_id": "isic_1", "dataset": "ISIC2020",
                      "question_type": "Disease Diagnosis", "question": "Diagnosis?",
                      "gt_answer": "Melanoma", "image_path": "Images/isic/1.jpg",
                      "option_A": "Nevus", "option_B": "Melanoma", "option_C": "Wart",
                      "option_D": "Normal", "modality": "Dermoscopy"}],  # key variant seen
        "Retinal OCT-C8": [{"question_id": "oct_1", "dataset": "Retinal OCT-C8",
                            "question_type": "Disease Diagnosis", "question": "Diagnosis?",
                            "gt_answer": "DME", "image_path": "Images/oct/1.jpg",
                            "option_A": "DME", "option_B": "CNV",
                            "modality_type": "OCT (Optical Coherence Tomography"}],
    }
    for name, rows in files.items():
        path = root / "QA_information" / "Open-access" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
        for row in rows:
            png(f"OmniMedVQA/{row['image_path']}")
    return root


def test_omnimedvqa_root_and_filters(tmp_path, png):
    root = _omni(tmp_path, png)
    data = load_dataset(str(root))
    assert sorted((r.id, r.modality, r.source) for r in data) == [
        ("ct_1", "ct", "Chest CT Scan"), ("isic_1", "dermoscopy", "ISIC2020"),
        ("oct_1", "oct", "Retinal OCT-C8")]
    ct = [r for r in data if r.id == "ct_1"][0]
    assert ct.options == ["Adenocarcinoma", "Normal"] and ct.answer_letter == "A"
    assert ct.images == [str(root / "Images" / "ct" / "1.png")]
    derm = load_dataset(str(root), modality="dermoscopy")
    assert [r.answer_letter for r in derm] == ["B"] and derm.report.filtered["modality"] == 2
    by_source = load_dataset(str(root), source=["Chest CT Scan", "Retinal OCT-C8"])
    assert sorted(r.id for r in by_source) == ["ct_1", "oct_1"]
    single = root / "QA_information" / "Open-access" / "ISIC2020.json"
    assert detect_layout(str(single)) == "omnimedvqa" and len(load_dataset(str(single))) == 1


def test_pathmmu_nested_json(tmp_path, png):
    image = png("images/pubmed_1.jpg")
    data = {"PubMed": {"test": [{"No": 7, "img": "./images/pubmed_1.jpg",
                                 "question": "Which tumour?",
                                 "options": ["A) Melanoma", "B) Lymphoma", "C) Sarcoma"],
                                 "answer": "B", "explanation": "Sheets of lymphocytes. CD20+."}]},
            "EduContent": {"val": [{"No": 1, "img": "./images/pubmed_1.jpg", "question": "Q?",
                                    "options": ["A) x", "B) y"], "answer": "A) x"}]}}
    (tmp_path / "data.json").write_text(json.dumps(data))
    assert detect_layout(str(tmp_path / "data.json")) == "pathmmu"
    records = load_dataset(str(tmp_path / "data.json"))
    first, second = records
    assert (first.id, first.options, first.answer, first.answer_letter, first.split) == (
        "pathmmu-PubMed-test-7", ["Melanoma", "Lymphoma", "Sarcoma"], "Lymphoma", "B", "test")
    assert first.criteria == ["Sheets of lymphocytes.", "CD20+."] and first.images == [image]
    assert (second.answer, second.source) == ("x", "PathMMU/EduContent")


def test_slake_english_filter(tmp_path, png):
    image = png("imgs/xmlab102/source.jpg")
    base = {"img_id": 102, "img_name": "xmlab102/source.jpg", "location": "Lung",
            "modality": "CT", "answer_type": "CLOSED", "base_type": "vqa",
            "content_type": "Organ", "triple": ["vhead", "_", "_"]}
    rows = [{**base, "qid": 1, "question": "Is the lung healthy?", "answer": "No",
             "q_lang": "en"},
            {**base, "qid": 2, "question": "肺是否健康?", "answer": "否", "q_lang": "zh"}]
    (tmp_path / "train.json").write_text(json.dumps(rows, ensure_ascii=False))
    data = load_dataset(str(tmp_path / "train.json"))
    assert [(r.id, r.modality, r.images) for r in data] == [("slake-1", "ct", [image])]
    assert data.report.filtered["language"] == 1 and data.report.n_read == 2
    assert len(load_dataset(str(tmp_path / "train.json"), language=None)) == 2


def test_vqarad_original_and_hf(tmp_path, png):
    image = png("images/synpic54610.jpg")
    original = [{"qid": "0", "phrase_type": "freeform", "qid_linked_id": "03f45",
                 "image_case_url": "https://medpix/x", "image_name": "synpic54610.jpg",
                 "image_organ": "HEAD", "evaluation": "given", "question": "Are there two?",
                 "question_rephrase": "NULL", "question_relation": "NULL",
                 "question_frame": "NULL", "question_type": "COUNT", "answer": 1,
                 "answer_type": "CLOSED"}]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(original))
    record = load_dataset(str(tmp_path / "VQA_RAD Dataset Public.json"))[0]
    assert (record.answer, record.images, record.source) == ("1", [image], "VQA-RAD")
    assert record.extra["image_organ"] == "HEAD"
    hf = [{"image": "images/synpic54610.jpg", "question": "is there a mass?", "answer": "no"}]
    (tmp_path / "hf.json").write_text(json.dumps(hf))
    assert load_dataset(str(tmp_path / "hf.json"), layout="vqarad")[0].answer == "no"


def test_embedded_name(embedded_cache, monkeypatch):
    monkeypatch.setenv("GRPO_VLM_CACHE", embedded_cache)
    assert len(load_dataset("embedded:real")) == 13
