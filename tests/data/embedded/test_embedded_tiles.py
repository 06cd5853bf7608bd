"""Procedural pathology tiles: answers, criteria and pixels follow the ground truth."""
import numpy as np
from PIL import Image

from data import load_embedded
from data.embedded.tiles import (GRADED, GRADES, WORDS, caption, claim, generate_caption_item,
                                  generate_item)

FAMILY_OPTIONS = {**{f: (0, 1) for f in ("size", "stain", "density", "mitosis", "pleomorphism")},
                  "size_density": (0, 1, 2, 3), "size_stain": (0, 1, 2, 3), "grade": (0, 1, 2)}


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
        # one checkable claim per attribute the answer depends on, true value first
        truth = record.extra["truth"]
        attrs = {"grade": GRADED}.get(record.extra["task"], tuple(record.extra["task"].split("_")))
        claims = [claim(a, truth[a]) for a in attrs]
        if record.extra["task"] == "grade":
            claims.append(f"the grade is {record.answer.split()[0]}, not "
                          + " or ".join(g.split()[0] for g in GRADES if g != record.answer))
        assert record.criteria == claims, record.id


def test_claims_and_captions_by_hand():
    assert claim("size", "small") == "nuclear size is small, not large"
    assert claim("stain", "dark") == "nuclear staining is dark (hyperchromatic), not pale (vesicular)"
    assert claim("mitosis", "present") == "mitotic figures are present, not absent"
    truth = {"size": "large", "density": "low", "stain": "pale", "pleomorphism": "mild", "mitosis": "absent"}
    assert caption(truth) == ("nuclear size is large. cellularity is low. nuclear staining is pale (vesicular). "
                              "pleomorphism is mild. mitotic figures are absent.")


def test_correct_letters_are_balanced_in_every_family():
    """The correct option is uniform within each family (grade included), so a constant letter
    scores chance: checked on 1,200 generated items against the binomial spread."""
    from collections import Counter
    counts: dict = {}
    for index in range(1200):
        _, question, _, meta = generate_item(5, index)
        counts.setdefault(meta["task"], Counter())[question["options"].index(question["answer"])] += 1
    for family, c in counts.items():
        n, k = sum(c.values()), len(FAMILY_OPTIONS[family])
        assert sorted(c) == list(range(k)), family
        for hits in c.values():  # within 4 standard deviations of n / k
            assert abs(hits - n / k) < 4 * (n * (1 / k) * (1 - 1 / k)) ** 0.5, (family, dict(c))


def test_caption_stream_is_disjoint_and_describes_the_tile():
    image, text, truth = generate_caption_item(42, 0)
    tile, _, tile_truth, _ = generate_item(42, 0)
    assert text == caption(truth) and "<think>" not in text and "answer" not in text
    assert not np.array_equal(np.asarray(image), np.asarray(tile))


def test_images_show_what_the_labels_say(embedded_cache):
    """Cell pixels (green channel < 135: nuclei and cytoplasm, below any stroma) track
    cellularity whatever the nuclear size: every high-density tile has more than every
    low-density one; and nuclear radii separate small from large."""
    records = load_embedded("pathology", cache_dir=embedded_cache, n=120)

    def nuclear_fraction(record):
        return float((np.asarray(Image.open(record.images[0]))[..., 1] < 135).mean())

    def group(size, density):
        return [nuclear_fraction(r) for r in records if r.extra["truth"]["size"] == size
                and r.extra["truth"]["density"] == density]
    low = group("small", "low") + group("large", "low")
    high = group("small", "high") + group("large", "high")
    assert len(low) > 20 and len(high) > 20
    assert max(low) < min(high)
    sizes = {s: [r.extra["truth"]["mean_radius_px"] for r in records
                 if r.extra["truth"]["size"] == s and r.extra["truth"]["pleomorphism"] == "mild"]
             for s in ("small", "large")}
    assert max(sizes["small"]) < min(sizes["large"])
