"""The embedded-dataset builder: deterministic, cached, prefix-stable, split sft/rl/test/ood."""
import os

from data import embedded_splits, load_embedded
from data.embedded import cache_path


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
