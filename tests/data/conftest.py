"""Fixtures for the data tests: tiny images and a small shared embedded-dataset cache."""
import pytest
from PIL import Image


@pytest.fixture
def png(tmp_path):
    """png("rel/path.png") writes a small valid image under tmp_path and returns its path."""
    def write(relative, size=(32, 24), colour=(200, 100, 150)):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(path)
        return str(path)
    return write


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("embedded-cache"))


@pytest.fixture(autouse=True)
def _no_home_cache(monkeypatch, tmp_path):
    # Tests must never write to the real ~/.cache.
    monkeypatch.setenv("GRPO_VLM_CACHE", str(tmp_path / "env-cache"))
