"""The embedded dataset: deterministic, cached, truthful labels, real assets, clear errors."""
import importlib.metadata
import os

import numpy as np
import pytest
from PIL import Image

import data.assets as assets
from data import embedded_splits, load_embedded
from data.embedded import cache_path
from data.synthetic import GRADES, WORDS


def test_deterministic_and_prefix_stable(tmp_path):
    a = load_embedded("pathology", seed=3, cache_dir=str(tmp_path / "a"), n=12)
    b = load_embedded("pathology", seed=3, cache_dir=str(tmp_path / "b"), n=20)
    assert [r.to_json().replace(str(tmp_path / "a"), "") for r in a] == [
        r.to_json().replace(str(tmp_path / "b"), "") for r in b[:12]]
    assert all(open(x.images[0], "rb").read() == open(y.images[0], "rb").read()
               for x, y in zip(a, b))
    c = load_embedded("pathology", seed=4, cache_dir=str(tmp_path / "a"), n=12)
    assert [r.answer for r in c] != [r.answer for r in a]


def test_cache_location_env_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_VLM_CACHE", str(tmp_path / "env"))
    folder = cache_path(seed=5)
    assert folder.startswith(str(tmp_path / "env" / "embedded")) and folder.endswith("-5")
    first = load_embedded("pathology", seed=5, n=4)
    assert os.path.dirname(os.path.dirname(first[0].images[0])) == folder
    stamp = os.path.getmtime(first[0].images[0])
    load_embedded("pathology", seed=5, n=6)  # extends the cache, keeps existing files
    assert os.path.getmtime(first[0].images[0]) == stamp
    assert len(os.listdir(os.path.join(folder, "pathology"))) == 6


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


def test_splits_and_ood(embedded_cache):
    splits = embedded_splits(sizes=(12, 4, 6), cache_dir=embedded_cache, ood_n=5)
    assert [len(splits[k]) for k in ("sft", "rl", "test")] == [12, 4, 6]
    images = [p for k in ("sft", "rl", "test") for r in splits[k] for p in r.images]
    assert len(images) == len(set(images)) == 22
    assert sorted(splits["ood"]) == ["ct", "dermoscopy", "fundus", "oct"]
    counts = {m: len(v) for m, v in splits["ood"].items()}
    assert counts == {"ct": 5 + 1, "dermoscopy": 5, "fundus": 5 + 4, "oct": 5}  # + real images
    real = [r for v in splits["ood"].values() for r in v if not r.extra["synthetic"]]
    assert sorted(r.source for r in real) == ["pydicom:ct_small"] + [
        "scikit-image:microaneurysms"] * 2 + ["scikit-image:retina"] * 2


def test_real_part(embedded_cache):
    real = load_embedded("real", cache_dir=embedded_cache)
    assert len(real) == 13
    assert {r.modality for r in real} == {"pathology", "fundus", "ct", "mri", "ultrasound"}
    ct = [r for r in real if r.source == "pydicom:ct_small"][0]
    assert ct.answer == "CT" and ct.answer_letter == "A"
    assert Image.open(ct.images[0]).size == (128, 128)


def _hide(monkeypatch, package):
    real = importlib.metadata.distribution

    def fake(name):
        if name == package:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(assets.importlib.metadata, "distribution", fake)


def test_missing_asset_package_is_named_and_procedural_still_works(tmp_path, monkeypatch):
    _hide(monkeypatch, "scikit-image")
    with pytest.raises(assets.AssetMissingError,
                       match=r"pip install --no-deps scikit-image==0\.26\.0"):
        load_embedded("real", cache_dir=str(tmp_path))
    ood = load_embedded("ood", cache_dir=str(tmp_path), n=2)
    # 4 modalities x 2 procedural + the real CT (pydicom is present); the 4 questions on the
    # two scikit-image fundus images are counted as skipped, not silently dropped.
    assert len(ood) == 9 and [r.source for r in ood if not r.extra["synthetic"]] == [
        "pydicom:ct_small"]
    assert ood.report.skipped["asset_missing"] == 4 and ood.report.n_read == 13
