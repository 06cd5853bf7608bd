"""Raw file readers: JSONL, JSON, CSV, PathVQA pickles, Parquet, images, hashes.

Each record reader yields ``(Where, dict)`` pairs so that every later error can name the file and
the line (JSONL, CSV), item (JSON, pickle) or row (Parquet) it came from; a record that cannot be
read at all (bytes that are not UTF-8, a line that is not JSON) is yielded as a ``DataError`` so
the loader can skip and count it or raise. Every image in the package
is opened through :func:`read_image` / :func:`image_format`, and every sha256 is taken by
:func:`sha256_hex` / :func:`file_sha256`.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import pickle
import re
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


def image_size(source: str | bytes) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels."""
    with _open_image(source) as image:
        return image.size


def image_format(source: str | bytes, verify: bool = False) -> str | None:
    """Pillow's format name (``"PNG"``, ``"JPEG"``...) from the header; with ``verify`` also
    check the file's structure and checksums without decoding all pixels. Raises Pillow's
    errors for data it cannot read."""
    with _open_image(source) as image:
        if verify:
            image.verify()
        return image.format


# Bytes that are not UTF-8 are decoded with "surrogateescape" (each bad byte becomes one lone
# surrogate U+DC80..U+DCFF), so a bad line or record can be named, skipped and counted instead of
# a bare UnicodeDecodeError aborting the whole file.
_ESCAPED = re.compile("[\udc80-\udcff]")
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
_ENCODING_FIX = ("re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT), or pass "
                 "skip_invalid=True to skip and count such records")


def _escaped_byte(text: str) -> str | None:
    """The first non-UTF-8 byte in ``text`` as '0xNN', or None if there is none."""
    match = _ESCAPED.search(text)
    return None if match is None else f"0x{ord(match.group()) - 0xDC00:02x}"


def bad_bytes(row, prefix: str = "") -> tuple[str, str] | None:
    """(field, '0xNN') of the first key or string value of ``row`` (nested dicts/lists too) that
    holds bytes which were not UTF-8, or None."""
    if isinstance(row, str):
        byte = _escaped_byte(row)
        return (prefix or "(value)", byte) if byte else None
    if isinstance(row, dict):
        for key, value in row.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            byte = _escaped_byte(key) if isinstance(key, str) else None
            found = (name, byte) if byte else bad_bytes(value, name)
            if found:
                return found
    if isinstance(row, (list, tuple)):
        for i, value in enumerate(row):
            found = bad_bytes(value, f"{prefix}[{i}]")
            if found:
                return found
    return None


def _count_escaped(row) -> int:
    if isinstance(row, str):
        return len(_ESCAPED.findall(row))
    if isinstance(row, dict):
        return sum(_count_escaped(k) + _count_escaped(v) for k, v in row.items())
    if isinstance(row, (list, tuple)):
        return sum(_count_escaped(v) for v in row)
    return 0


def _decode(path: str, raw: bytes) -> str:
    for bom, name in _BOMS:
        if raw.startswith(bom):
            raise DataError("bad_encoding", path, "(file)", "(file)", f"the file is {name} "
                            "(byte-order mark at its start), not UTF-8", "re-save it as UTF-8")
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    return raw.decode("utf-8", "surrogateescape")


def read_jsonl(path: str) -> Iterator[Row | DataError]:
    """One JSON object per line; blank lines are allowed. A bad line (not JSON, not an object,
    bytes that are not UTF-8) yields a DataError naming it."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _decode(path, raw) if number == 1 else raw.decode("utf-8", "surrogateescape")
            if not line.strip():
                continue
            where = Where(path, f"line {number}")
            byte = _escaped_byte(line)
            if byte:
                column = len(line[:_ESCAPED.search(line).start()].encode("utf-8", "surrogateescape"))
                yield where.error("bad_encoding", "(whole line)", f"bytes that are not UTF-8 "
                                  f"({byte} at byte {column + 1} of the line)", _ENCODING_FIX)
                continue
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


class JsonText:
    """A JSON file's text, to name the line where an item's non-UTF-8 bytes are: items are parsed
    in file order, so the k-th escaped byte of the text belongs to the item that holds it."""

    def __init__(self, text: str):
        self.text = text
        self._positions = [m.start() for m in _ESCAPED.finditer(text)]
        self._used = 0

    def line_of_next(self, count: int) -> int | None:
        """Line of the next escaped byte, consuming ``count`` of them (one item's)."""
        if self._used >= len(self._positions):
            return None
        position = self._positions[self._used]
        self._used += count
        return self.text.count("\n", 0, position) + 1


def read_json(path: str) -> tuple[object, JsonText]:
    """Parse a JSON file (bytes that are not UTF-8 kept as escapes, see :func:`bad_bytes`)."""
    with open(path, "rb") as handle:
        text = _decode(path, handle.read())
    if not text.strip():
        raise DataError("empty_file", path, "(file)", "(file)", "the file is empty",
                        "check that the download or export finished, or remove the file")
    try:
        return json.loads(text), JsonText(text)
    except json.JSONDecodeError as exc:
        raise DataError("bad_value", path, f"line {exc.lineno}", "(file)",
                        f"not valid JSON ({exc.msg})", "fix the JSON syntax") from None


def load_json(path: str):
    """The parsed content of a JSON file (errors name the file and line)."""
    return read_json(path)[0]


def iter_items(path: str, items: list, id_key: str | None = None,
               text: JsonText | None = None) -> Iterator[Row | DataError]:
    """Number the items of a JSON/pickle list; prefer the record's own id in messages. An item
    holding bytes that are not UTF-8 yields a DataError naming it (and its line, from ``text``)."""
    for index, row in enumerate(items):
        label = f"item {index}"
        if isinstance(row, dict) and id_key and row.get(id_key) is not None:
            label += f" (id {row[id_key]!r})"
        if not isinstance(row, dict):
            row = {"__not_a_dict__": row}
        where = Where(path, label, index)
        found = bad_bytes(row)
        if found:
            line = text.line_of_next(_count_escaped(row)) if text is not None else None
            if line is not None:
                where.record += f" at line {line}"
            yield where.error("bad_encoding", found[0], f"bytes that are not UTF-8 ({found[1]})",
                              _ENCODING_FIX)
            continue
        yield where, row


def read_csv(path: str) -> Iterator[Row | DataError]:
    """CSV with a header row; line numbers count the header as line 1 (as editors show them).
    A row with bytes that are not UTF-8, or with more cells than the header, yields a DataError."""
    with open(path, "rb") as handle:
        _decode(path, handle.read(4))  # refuse UTF-16/32 with a clear message
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        found = bad_bytes(list(header))
        if found:
            raise DataError("bad_encoding", path, "line 1", "(header)", f"the header holds "
                            f"bytes that are not UTF-8 ({found[1]})", _ENCODING_FIX)
        for row in reader:
            where = Where(path, f"line {reader.line_num}")
            if None in row:
                yield where.error("bad_value", "(whole line)", f"{len(header) + len(row[None])} "
                                  f"cells but the header names {len(header)} columns",
                                  "quote cells that contain commas, or fix the header")
                continue
            found = bad_bytes(row)
            if found:
                yield where.error("bad_encoding", found[0], f"bytes that are not UTF-8 "
                                  f"({found[1]})", _ENCODING_FIX)
                continue
            yield where, row


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
        except Exception as exc:  # damaged pickles raise many kinds (EOF, Unicode, Value...)
            raise DataError("bad_value", path, "(file)", "(file)", f"cannot unpickle: "
                            f"{type(exc).__name__}: {exc}", "convert the file to JSON/JSONL "
                            "with plain fields") from None
    if isinstance(data, dict):  # some re-exports store {"train": [...]} or a column dict
        data = [row for rows in data.values() for row in rows] if all(
            isinstance(v, list) for v in data.values()) else [data]
    if not isinstance(data, list):
        raise DataError("bad_value", path, "(file)", "(top level)", f"expected a list of "
                        f"records, got {type(data).__name__}", "pickle a list of dicts with "
                        "'image', 'question' and 'answer'")
    return data


def _pyarrow_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("bad_value", path, "(file)", "(file)", "reading Parquet needs pyarrow, "
                        "which is not installed", "pip install 'grpo-vlm[data]' (or pyarrow), or "
                        "export the data to JSON/JSONL with image files") from None
    return pq


def parquet_columns(path: str) -> list[str]:
    """Column names of a Parquet file (its schema only; no rows are read)."""
    pq = _pyarrow_parquet(path)
    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise DataError("bad_value", path, "(file)", "(file)", f"not a readable Parquet file "
                        f"({type(exc).__name__}: {exc})", "re-download the file") from None


def read_parquet(path: str, batch_size: int = 256) -> Iterator[Row]:
    """Rows of a Parquet file as dicts, read ``batch_size`` rows at a time (a whole Hugging Face
    shard never sits in memory twice). Hugging Face exports (e.g. ``flaviagiammarino/path-vqa``)
    store each image as a ``{"bytes": ..., "path": ...}`` struct; it is passed on as it is and
    the layout writes the bytes to the image cache (:func:`write_image_bytes`). Rows are named
    ``row N`` (0-based, as ``datasets`` indexes them). Needs ``pyarrow``."""
    pq = _pyarrow_parquet(path)
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError("bad_value", path, "(file)", "(file)", f"not a readable Parquet file "
                        f"({type(exc).__name__}: {exc})", "re-download the file") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield Where(path, f"row {index}", index), row
            index += 1


def default_image_cache() -> str:
    """Where image bytes held inside data files are written: ``$GRPO_VLM_CACHE/images``, else
    ``~/.cache/grpo-vlm/images``."""
    base = os.environ.get("GRPO_VLM_CACHE") or os.path.join("~", ".cache", "grpo-vlm")
    return os.path.join(os.path.abspath(os.path.expanduser(base)), "images")


def write_image_bytes(data: bytes, name: str | None, image_dir: str) -> str:
    """Write embedded image bytes to ``image_dir`` under a content-hash name; return the path.
    The same bytes always give the same path, so they are written once; the write goes through a
    temporary file and a rename, so a reader (or another rank) never sees half an image."""
    ext = os.path.splitext(name or "")[1] or _sniff_ext(data)
    target = os.path.join(image_dir, sha256_hex(data)[:20] + ext)
    if not os.path.exists(target):
        os.makedirs(image_dir, exist_ok=True)
        temporary = f"{target}.{os.getpid()}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)
    return target


def _sniff_ext(data: bytes) -> str:
    try:
        return "." + (image_format(data) or "png").lower().replace("jpeg", "jpg")
    except OSError:
        return ".bin"
