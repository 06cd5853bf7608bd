"""``python -m data.check``: the load report a user reads before training, run as a user would
(a subprocess), with the numbers worked out by hand."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data.check import image_tokens

ROOT = Path(__file__).resolve().parents[2]


def _check(*args):
    result = subprocess.run([sys.executable, "-m", "data.check", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("size,limits,expected", [
    # 24x32 -> rounded 28x28 = 784 < 3136: scaled by sqrt(3136/768) and rounded up: 56x84
    ((32, 24), (3136, 65536), (84, 56, 6)),
    # 80x100 -> 84x112 (round to 28) = 9408 pixels, inside the limits: 3 x 4 blocks
    ((100, 80), (3136, 65536), (112, 84, 12)),
    # 300x600 -> 308x588 > 65536: scaled by sqrt(180000/65536) = 1.657, floored: 168x336
    ((600, 300), (3136, 65536), (336, 168, 72)),
    # same image under max 12544: scale 3.788, 300/3.788/28 = 2.8 -> 56, 600/3.788/28 = 5.7 -> 140
    ((600, 300), (3136, 12544), (140, 56, 10)),
])
def test_image_tokens_by_hand_and_as_the_qwen_processor_counts_them(size, limits, expected):
    from models.processor import make_image_processor
    assert image_tokens(*size, *limits) == expected
    grid = make_image_processor(*limits)(images=[Image.new("RGB", size)],
                                         return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) // 4 == expected[2]  # 14-px patches, merged 2x2 into one token


def test_check_prints_the_report_and_exits_zero(tmp_path, png):
    png("s.png", size=(32, 24))
    png("m.png", size=(100, 80))
    png("l.png", size=(600, 300))
    rows = [{"id": "r0", "images": ["s.png"], "question": "Q?", "options": ["x", "y"],
             "answer": "x", "modality": "CT", "source": "a"},
            {"id": "r1", "images": ["m.png", "l.png"], "question": "Q?", "options": ["x", "y"],
             "answer": "y", "modality": "pathology", "source": "a"},
            {"id": "r2", "images": ["m.png"], "question": "Q?", "options": ["x", "y", "z"],
             "answer": "B", "modality": "pathology", "source": "b"},
            {"id": "r3", "images": ["m.png"], "question": "Organ?", "answer": "liver",
             "modality": "ct", "source": "b"},
            {"id": "bad1", "images": ["missing.png"], "question": "Q?", "answer": "x"},
            {"id": "bad2", "images": ["m.png"], "question": "Q?", "options": ["x", "y"],
             "answer": "w"},
            {"id": "bad3", "images": ["nowhere.png"], "question": "Q?", "answer": "x"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = _check(path)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1] == "records: read 7, kept 4, skipped 3, filtered out 0"
    assert lines[2:4] == ["skipped, by reason:", "  missing_image: 2"]
    assert lines[4].startswith(f"    e.g. {path}: record line 5: field 'image': image file not found")
    assert lines[5].startswith(f"    e.g. {path}: record line 7")
    assert lines[6] == "  answer_not_in_options: 1"
    assert "modality: ct=2 (50.0%), pathology=2 (50.0%)" in lines
    assert "source: a=2 (50.0%), b=2 (50.0%)" in lines
    assert "answer letters (3 multiple-choice): B=2 (66.7%), A=1 (33.3%)" in lines
    assert "options per question: 2: 2, 3: 1" in lines and "open questions: 1" in lines
    assert "images: 3 distinct; per record: 1: 3, 2: 1" in lines
    start = lines.index("image sizes (width x height) -> resized -> tokens, at min_pixels=3136, "
                        "max_pixels=65536:")
    assert lines[start + 1:start + 4] == ["  min    32x24 -> 84x56 = 6 tokens",
                                          "  median 100x80 -> 112x84 = 12 tokens",
                                          "  max    600x300 -> 336x168 = 72 tokens"]
    # per record: r0 6, r1 12 + 72 = 84, r2 12, r3 12
    assert lines[start + 4] == "image tokens per record: min 6, median 12, max 84"
    code, out, _ = _check(path, "--max-pixels", 12544)
    assert "  max    600x300 -> 140x56 = 10 tokens" in out.splitlines()


def test_check_exits_nonzero_when_nothing_valid_remains(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "r0", "images": ["missing.png"], "question": "Q?",
                                "answer": "x"}) + "\n")
    code, out, _ = _check(path, "--layout", "jsonl")
    assert code == 1 and "records: read 1, kept 0, skipped 1" in out
    assert out.splitlines()[-1] == "no valid record remains"
    (tmp_path / "empty.jsonl").write_text("")
    code, out, err = _check(tmp_path / "empty.jsonl")
    assert code == 2 and f"{tmp_path / 'empty.jsonl'}: record (file)" in err and "no records" in err
