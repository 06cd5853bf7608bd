"""Real images shipped in packages: the real part, and a missing package named with its fix."""
import importlib.metadata

import pytest
from PIL import Image

import data.embedded.assets as assets
from data import load_embedded


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
