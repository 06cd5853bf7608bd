"""``load_dataset``: read any supported layout into a validated :class:`VQADataset`.

Layouts (details and example records in docs/data.md): ``jsonl`` (this project's own),
``pathvqa``, ``pmcvqa``, ``omnimedvqa``, ``pathmmu``, ``slake``, ``vqarad``, ``r1`` (VLM-R1,
R1-V, Med-R1); ``auto`` picks one from the file extension and the first record's keys (a Parquet
file's or an in-memory dataset's column names). Files may be JSON, JSONL, CSV, PathVQA pickles or
Parquet; a Hugging Face ``datasets.Dataset`` goes through the same layouts
(:func:`data.convert.from_hf_dataset`).
"""
from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from typing import Iterable, Iterator

from .layouts import LAYOUTS, Context, layout_from_keys, pathvqa_or_vqarad
from .readers import (iter_items, parquet_columns, read_csv, read_json, read_jsonl,
                      read_parquet, read_pickle)
from .records import DataError, LoadReport, VQADataset, normalize_modality
from .validation import Collector

log = logging.getLogger(__name__)


def load_dataset(path_or_name, layout: str = "auto", image_root: str | None = None,
                 skip_invalid: bool = False, *, modality: str | Iterable[str] | None = None,
                 source: str | Iterable[str] | None = None, split: str | None = None,
                 language: str | None = "en", check_images: str = "open",
                 unknown_columns: str = "error", allow_outside_root: bool = False,
                 image_cache: str | None = None, allow_empty: bool = False) -> VQADataset:
    """Load VQA records from a file or folder (or ``"embedded"``/``"embedded:<part>"``, or a
    Hugging Face ``datasets.Dataset``).

    Args:
        path_or_name: a data file (``.json``, ``.jsonl``, ``.csv``, ``.pkl``, ``.parquet``), an
            OmniMedVQA root (with ``QA_information/``) or a folder of its JSON files,
            ``"embedded"`` for the built-in dataset, or a ``datasets.Dataset``.
        layout: one of ``auto``, ``jsonl``, ``pathvqa``, ``pmcvqa``, ``omnimedvqa``,
            ``pathmmu``, ``slake``, ``vqarad``, ``r1``.
        image_root: folder relative image paths start from (default: the layout's usual root,
            e.g. the data file's folder, or the OmniMedVQA root).
        skip_invalid: skip bad records, counting them by reason in ``dataset.report.skipped``;
            when False (default) the first bad record raises :class:`DataError`.
        modality, source: keep only these canonical modalities (``"ct"``, ``"fundus"``...) or
            source datasets (OmniMedVQA ``dataset`` names such as ``"Chest CT Scan"``); records
            left out are counted in ``report.filtered``.
        split: keep only records whose ``split`` equals this.
        language: SLAKE ``q_lang`` to keep (``None`` keeps all).
        check_images: ``"open"`` (exists and decodable), ``"exists"`` or ``"none"``.
        unknown_columns: ``"error"`` (default), ``"extra"`` (keep in ``record.extra``) or
            ``"ignore"``.
        allow_outside_root: follow relative image paths that climb out of ``image_root``
            (``../../x.png``); by default such a record is invalid (``image_outside_root``).
        image_cache: folder that image bytes held in the data (Parquet, ``datasets``) are
            written to, once, under a content hash (default ``$GRPO_VLM_CACHE/images``, else
            ``~/.cache/grpo-vlm/images``).
        allow_empty: return an empty dataset instead of raising when no record is kept.

    Raises:
        DataError: a bad record (without ``skip_invalid``), a file that cannot be read or holds
            no record (``empty_file``), or no record kept (``empty_dataset``); every message
            names the file and the record.
    """
    from .convert import from_hf_dataset, is_hf_dataset
    options = dict(skip_invalid=skip_invalid, modality=modality, source=source, split=split,
                   language=language, check_images=check_images, unknown_columns=unknown_columns,
                   allow_outside_root=allow_outside_root, image_cache=image_cache,
                   allow_empty=allow_empty)
    if is_hf_dataset(path_or_name):
        return from_hf_dataset(path_or_name, layout=layout, image_root=image_root, **options)
    if str(path_or_name).startswith("embedded"):
        from .embedded import load_embedded
        part = str(path_or_name).partition(":")[2] or "pathology"
        return load_embedded(part=part)
    path = os.path.abspath(os.path.expanduser(str(path_or_name)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder. Give a data file, an "
                                "OmniMedVQA root, or 'embedded'.")
    files = _expand(path)
    layout = detect_layout(files[0]) if layout == "auto" else layout
    check_layout(layout)
    sources = ((file, _rows(file, layout), image_root or _default_root(file, layout),
                os.path.splitext(os.path.basename(file))[0]) for file in files)
    return load_rows(sources, layout, path, **options)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)} or 'auto'")


def load_rows(sources: Iterable[tuple], layout: str, name: str, *, skip_invalid: bool = False,
              modality=None, source=None, split=None, language: str | None = "en",
              check_images: str = "open", unknown_columns: str = "error",
              allow_outside_root: bool = False, image_cache: str | None = None,
              allow_empty: bool = False) -> VQADataset:
    """Build, validate and filter the rows of ``sources``: ``(file, rows, image_root, stem)``
    with ``rows`` yielding ``(Where, dict)`` or ``DataError`` (see :mod:`data.readers`). Ids must
    be unique across all sources. The options are :func:`load_dataset`'s."""
    if unknown_columns not in ("error", "extra", "ignore"):
        raise ValueError(f"unknown_columns must be 'error', 'extra' or 'ignore', got "
                         f"{unknown_columns!r}")
    check_layout(layout)
    keep = _filters(modality, source, split, language if layout == "slake" else None)
    report = LoadReport(source=name)
    records, seen = [], {}
    for file, rows, root, stem in sources:
        collector = Collector(file, skip_invalid, check_images, keep, seen=seen)
        count = 0
        for item in rows:
            count += 1
            if isinstance(item, DataError):
                collector.skip_or_raise(item)
                continue
            where, row = item
            ctx = Context(where, root, stem, unknown_columns, allow_outside_root, image_cache)
            collector.add(where, lambda row=row, ctx=ctx: LAYOUTS[layout].build(row, ctx))
        if count == 0:
            raise DataError("empty_file", file, "(file)", "(file)", "the file holds no records",
                            "check that the download or export finished, or leave the file out")
        records.extend(collector.records)
        report.merge(collector.report)
    if report.skipped or report.filtered:
        log.warning("%s", report.summary())
    if not records and not allow_empty:
        raise DataError("empty_dataset", name, "(all records)", "(all)",
                        f"no record is left ({report.summary()}){_why_empty(report, keep)}",
                        "fix the records named above, or the filters (split=, modality=, "
                        "source=, language=); data.check FILE prints the full report")
    return VQADataset(records, report)


def _why_empty(report: LoadReport, keep) -> str:
    parts = []
    if report.skipped:
        first = next(iter(report.examples_by_reason.values()))[0]
        parts.append(f"; first skipped: {first}")
    for name, values in (getattr(keep, "seen", None) or {}).items():
        if report.filtered.get(name):
            parts.append(f"; {name} values present: "
                         + ", ".join(f"{v!r}={n}" for v, n in values.most_common(10)))
    return "".join(parts)


def _expand(path: str) -> list[str]:
    """A file, or the JSON files of an OmniMedVQA root / folder (sorted for determinism)."""
    if os.path.isfile(path):
        return [path]
    qa = os.path.join(path, "QA_information")
    pattern = os.path.join(qa if os.path.isdir(qa) else path, "**", "*.json")
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise FileNotFoundError(f"{path}: folder holds no JSON files (looked for {pattern}); "
                                "pass the data file itself")
    return files


def detect_layout(file: str) -> str:
    """Guess the layout from the extension and the first record's keys (a CSV's header, a
    Parquet file's columns)."""
    ext = os.path.splitext(file)[1].lower()
    if ext in (".pkl", ".pickle"):
        return "pathvqa"
    if ext == ".csv":
        return layout_from_keys(_csv_header(file), file) or "pmcvqa"
    if ext == ".parquet":
        keys = parquet_columns(file)
    elif ext == ".jsonl":
        keys = _first_jsonl_keys(file)
        if keys is None:  # no readable line: the loader names the bad lines
            return "jsonl"
    elif ext == ".json":
        data = read_json(file)[0]
        if not isinstance(data, (list, dict)):
            raise DataError("bad_value", file, "(file)", "(top level)", f"expected a JSON list "
                            f"of records, got {type(data).__name__}", "check the file")
        first = _first_record(data)
        keys = set(first) if isinstance(first, dict) else set()
    else:
        raise DataError("unknown_layout", file, "(file)", "(extension)", f"cannot guess the "
                        f"layout from extension {ext!r}", f"pass layout= one of {sorted(LAYOUTS)}")
    image_name = _first_image_name(file, ext)
    layout = layout_from_keys(keys, file, image_name)
    if layout is None:
        raise DataError("unknown_layout", file, "(first record)", "(keys)", f"cannot guess the "
                        f"layout from the first record's keys {sorted(keys)}",
                        f"pass layout= one of {sorted(LAYOUTS)}")
    if layout == "pathvqa" and not pathvqa_or_vqarad(file, image_name)[1]:
        log.warning("%s: columns 'image, question, answer' and nothing in the path or image "
                    "names says which dataset: read as PathVQA (modality pathology); pass "
                    "layout='vqarad' for a VQA-RAD export", file)
    return layout



def _first_image_name(file: str, ext: str) -> str:
    """The first record's image name (VQA-RAD's are MedPix ``synpicNNNNN.jpg``), to tell the
    Hugging Face exports of PathVQA and VQA-RAD apart; "" when there is none."""
    try:
        if ext == ".parquet":
            row = next(read_parquet(file, batch_size=1), (None, {}))[1]
        elif ext == ".json":
            row = _first_record(read_json(file)[0])
        else:
            return ""
    except DataError:
        return ""
    image = row.get("image") if isinstance(row, dict) else None
    return str(image.get("path") or "") if isinstance(image, dict) else str(image or "")


def _csv_header(file: str) -> list[str]:
    with open(file, encoding="utf-8-sig", errors="replace", newline="") as handle:
        return handle.readline().strip().split(",")


def _first_jsonl_keys(file: str, max_lines: int = 50) -> set | None:
    with open(file, "rb") as handle:
        for _, raw in zip(range(max_lines), handle):
            try:
                row = json.loads(raw.decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(row, dict):
                return set(row)
    return None


def _first_record(data):
    if isinstance(data, list):
        return data[0] if data else {}
    if isinstance(data, dict):  # PathMMU nests {subset: {split: [...]}}
        for value in data.values():
            if isinstance(value, (list, dict)):
                return _first_record(value)
    return {}


def _default_root(file: str, layout: str) -> str:
    folder = os.path.dirname(file)
    if layout == "omnimedvqa":  # image_path is relative to the root holding QA_information/
        parts = file.split(os.sep)
        if "QA_information" in parts:
            return os.sep.join(parts[:len(parts) - 1 - parts[::-1].index("QA_information")])
    if layout == "pathvqa" and os.path.basename(os.path.dirname(folder)) == "qas":
        return os.path.dirname(os.path.dirname(folder))  # <root>/qas/<split>/<split>_qa.pkl
    return folder


def _rows(file: str, layout: str) -> Iterator:
    ext = os.path.splitext(file)[1].lower()
    if ext == ".jsonl":
        yield from read_jsonl(file)
    elif ext == ".csv":
        yield from read_csv(file)
    elif ext in (".pkl", ".pickle"):
        yield from iter_items(file, read_pickle(file))
    elif ext == ".parquet":
        yield from read_parquet(file)
    else:
        data, text = read_json(file)
        if layout == "pathmmu" and isinstance(data, dict):
            yield from _pathmmu_items(file, data, text)
        elif isinstance(data, list):
            yield from iter_items(file, data, id_key=_ID_KEYS.get(layout), text=text)
        else:
            raise DataError("bad_value", file, "(file)", "(top level)", "expected a JSON list "
                            "of records", f"check that this is a {layout} file")


_ID_KEYS = {"omnimedvqa": "question_id", "slake": "qid", "vqarad": "qid", "jsonl": "id",
            "pathmmu": "No", "r1": "id"}


def _pathmmu_items(file: str, data: dict, text) -> Iterator:
    """PathMMU's data.json: {subset: {split: [items]}} (also accepts {subset: [items]})."""
    for subset, value in data.items():
        groups = value.items() if isinstance(value, dict) else [(None, value)]
        for split, items in groups:
            for item in iter_items(file, items or [], id_key="No", text=text):
                if isinstance(item, DataError):
                    item.record = f"{subset}/{split or '-'} {item.record}"
                    yield DataError(item.reason, item.file, item.record, item.field,
                                    item.problem, item.fix)
                    continue
                where, row = item
                where.record = f"{subset}/{split or '-'} {where.record}"
                yield where, {**row, "_subset": subset, "_split": split}


def _filters(modality, source, split, language):
    """A keep() callback returning the name of the filter that drops a record, or None. It
    counts the values it saw per filter in ``keep.seen`` (to say why a load came out empty)."""
    def as_set(value, normalize):
        if value is None:
            return None
        values = [value] if isinstance(value, str) else list(value)
        return {normalize(v) for v in values}

    modalities = as_set(modality, normalize_modality)
    sources = as_set(source, str.casefold)
    seen = {"language": Counter(), "modality": Counter(), "source": Counter(),
            "split": Counter()}

    def keep(record):
        seen["language"][str(record.extra.get("q_lang", language))] += 1
        seen["modality"][record.modality] += 1
        seen["source"][record.source] += 1
        seen["split"][record.split] += 1
        if language and str(record.extra.get("q_lang", language)) != language:
            return "language"
        if modalities is not None and record.modality not in modalities:
            return "modality"
        if sources is not None and record.source.casefold() not in sources:
            return "source"
        if split is not None and record.split != split:
            return "split"
        return None

    keep.seen = seen
    return keep if any(x is not None for x in (modalities, sources, split, language)) else None
