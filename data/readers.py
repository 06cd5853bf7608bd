"""Raw file readers: JSONL, JSON, CSV, PathVQA pickles, (optionally) Parquet, images, hashes.

Each record reader yields ``(Where, dict)`` pairs so that every later error can name the file and
the line (JSONL, CSV) or item (JSON, pickle, Parquet) it came from. Every image in the package
is opened through :func:`read_image` / :func:`image_format`, and every sha256 is taken by
:func:`sha256_hex` / :func:`file_sha256`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
from typing import Iterator

from PIL import Image

from .records import DataError, Where

Row = tuple[Where, dict]


def sha256_hex(content: bytes | str) -> str:
    """Hex sha256 of bytes, or of text encoded as UTF-8."""
    return hashlib.sha256(content.encode("utf-8") if isinstance(content, str)
                          else content).hexdigest()


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_image(source: str | bytes) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def read_image(source: str | bytes, page: int = 0) -> Image.Image:
    """Decode an image (a path or the file's bytes) into an RGB PIL image; ``page`` selects a
    TIFF/SVS page (1 = the first downsampled level). Raises Pillow's errors."""
    with _open_image(source) as image:
        if page:
            image.seek(page)
        return image.convert("RGB")


def image_format(source: str | bytes, verify: bool = False) -> str | None:
    """Pillow's format name (``"PNG"``, ``"JPEG"``...) from the header; with ``verify`` also
    check the file's structure and checksums without decoding all pixels. Raises Pillow's
    errors for data it cannot read."""
    with _open_image(source) as image:
        if verify:
            image.verify()
        return image.format


def read_jsonl(path: str) -> Iterator[Row | DataError]:
    """One JSON object per line; blank lines are allowed. A bad line yields a DataError."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = Where(path, f"line {number}")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield where.error("bad_value", "(whole line)", f"not valid JSON ({exc.msg} at "
                                  f"column {exc.colno})", "write one JSON object per line")
                continue
            if not isinstance(row, dict):
                yield where.error("bad_value", "(whole line)", f"expected a JSON object, got "
                                  f"{type(row).__name__}", "write one JSON object per line")
                continue
            yield where, row


def load_json(path: str):
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as exc:
            raise DataError("bad_value", path, f"line {exc.lineno}", "(file)",
                            f"not valid JSON ({exc.msg})", "fix the JSON syntax") from None


def iter_items(path: str, items: list, id_key: str | None = None) -> Iterator[Row]:
    """Number the items of a JSON/pickle list; prefer the record's own id in messages."""
    for index, row in enumerate(items):
        label = f"item {index}"
        if isinstance(row, dict) and id_key and row.get(id_key) is not None:
            label += f" (id {row[id_key]!r})"
        if not isinstance(row, dict):
            row = {"__not_a_dict__": row}
        yield Where(path, label), row


def read_csv(path: str) -> Iterator[Row]:
    """CSV with a header row; line numbers count the header as line 1 (as editors show them)."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            yield Where(path, f"line {reader.line_num}"), row


class _NoGlobalsUnpickler(pickle.Unpickler):
    """PathVQA ships its QA lists as pickles. Unpickling can run arbitrary code, so only plain
    containers and strings/numbers are allowed: any class or function reference is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain lists, dicts "
                                     "and strings are accepted in a QA pickle")


def read_pickle(path: str) -> list:
    with open(path, "rb") as handle:
        try:
            data = _NoGlobalsUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError) as exc:
            raise DataError("bad_value", path, "(file)", "(file)", f"cannot unpickle: {exc}",
                            "convert the file to JSON/JSONL with plain fields") from None
    if isinstance(data, dict):  # some re-exports store {"train": [...]} or a column dict
        data = [row for rows in data.values() for row in rows] if all(
            isinstance(v, list) for v in data.values()) else [data]
    return data


def read_parquet(path: str, image_dir: str) -> list[dict]:
    """Hugging Face Parquet exports (e.g. ``flaviagiammarino/path-vqa``) store the image as
    ``{"bytes": ..., "path": ...}``. The bytes are written once to ``image_dir`` (named by content
    hash) and the row's ``image`` becomes that file's path. Needs ``pyarrow`` (optional)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("bad_value", path, "(file)", "(file)", "reading Parquet needs pyarrow, "
                        "which is not installed", "pip install pyarrow, or export the data "
                        "to JSON/JSONL with image files") from None
    rows = pq.read_table(path).to_pylist()
    os.makedirs(image_dir, exist_ok=True)
    for row in rows:
        for key in ("image", "img", "image_path"):
            if isinstance(row.get(key), dict) and row[key].get("bytes"):
                row[key] = write_image_bytes(row[key]["bytes"], row[key].get("path"), image_dir)
    return rows


def write_image_bytes(data: bytes, name: str | None, image_dir: str) -> str:
    """Write embedded image bytes to ``image_dir`` under a content-hash name; return the path."""
    ext = os.path.splitext(name or "")[1] or _sniff_ext(data)
    target = os.path.join(image_dir, sha256_hex(data)[:20] + ext)
    if not os.path.exists(target):
        with open(target, "wb") as handle:
            handle.write(data)
    return target


def _sniff_ext(data: bytes) -> str:
    try:
        return "." + (image_format(data) or "png").lower().replace("jpeg", "jpg")
    except OSError:
        return ".bin"
