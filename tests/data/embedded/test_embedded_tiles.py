"""Procedural pathology tiles: answers, criteria and pixels follow the ground truth."""
import numpy as np
from PIL import Image

from data import load_embedded
from data.embedded.tiles import GRADES, WORDS


def _expected_answer(record):
    truth, task = record.extra["truth"], record.extra["task"]
    if task in WORDS:
        return WORDS[task][truth[task]]
    if task == "grade":
        return GRADES[max(truth["grade_points"] - 1, 0)]
    first, second = task.split("_")
    return f"{WORDS[first][truth[first]]}, {WORDS[second][truth[second]]}"


def test_answers_and_criteria_follow_ground_truth(embedded_cache):
    records = load_embedded("pathology", cache_dir=embedded_cache, n=120)
    assert {r.extra["difficulty"] for r in records} == {"easy", "medium", "hard"}
    for record in records:
        assert record.answer == _expected_answer(record), record.id
        assert record.extra["synthetic"] is True and 2 <= len(record.options) <= 4
        exclusions = [c for c in record.criteria if c.startswith("option ")]
        assert len(exclusions) == len(record.options) - 1
        assert record.answer_letter + " (" not in " ".join(exclusions)


def test_images_show_what_the_labels_say(embedded_cache):
    """Nuclear pixels (green channel < 135, below any stroma) must grow with size x density:
    every large/high-density tile has more than every small/low-density one."""
    records = load_embedded("pathology", cache_dir=embedded_cache, n=120)

    def nuclear_fraction(record):
        return float((np.asarray(Image.open(record.images[0]))[..., 1] < 135).mean())

    def group(size, density):
        return [nuclear_fraction(r) for r in records if r.extra["truth"]["size"] == size
                and r.extra["truth"]["density"] == density]
    small_low, large_high = group("small", "low"), group("large", "high")
    assert len(small_low) > 5 and len(large_high) > 5
    assert max(small_low) < min(large_high)
    sizes = {s: [r.extra["truth"]["mean_radius_px"] for r in records
                 if r.extra["truth"]["size"] == s and r.extra["truth"]["pleomorphism"] == "mild"]
             for s in ("small", "large")}
    assert max(sizes["small"]) < min(sizes["large"])
