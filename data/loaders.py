"""``load_dataset``: read any supported layout into a validated :class:`VQADataset`.

Layouts (details and example records in docs/data.md): ``jsonl`` (this project's own),
``pathvqa``, ``pmcvqa``, ``omnimedvqa``, ``pathmmu``, ``slake``, ``vqarad``; ``auto`` picks one
from the file extension and the first record's keys.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Iterable, Iterator

from .layouts import LAYOUTS, Context
from .readers import iter_items, load_json, read_csv, read_jsonl, read_parquet, read_pickle
from .records import DataError, LoadReport, VQADataset, normalize_modality
from .validation import Collector

log = logging.getLogger(__name__)


def load_dataset(path_or_name: str, layout: str = "auto", image_root: str | None = None,
                 skip_invalid: bool = False, *, modality: str | Iterable[str] | None = None,
                 source: str | Iterable[str] | None = None, split: str | None = None,
                 language: str | None = "en", check_images: str = "open",
                 unknown_columns: str = "error") -> VQADataset:
    """Load VQA records from a file or folder (or ``"embedded"``/``"embedded:<part>"``).

    Args:
        path_or_name: a data file, an OmniMedVQA root (with ``QA_information/``) or a folder of
            its JSON files, or ``"embedded"`` for the built-in dataset.
        layout: one of ``auto``, ``jsonl``, ``pathvqa``, ``pmcvqa``, ``omnimedvqa``,
            ``pathmmu``, ``slake``, ``vqarad``.
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
    """
    if str(path_or_name).startswith("embedded"):
        from .embedded import load_embedded
        part = str(path_or_name).partition(":")[2] or "pathology"
        return load_embedded(part=part)
    path = os.path.abspath(os.path.expanduser(str(path_or_name)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder. Give a data file, an "
                                "OmniMedVQA root, or 'embedded'.")
    if unknown_columns not in ("error", "extra", "ignore"):
        raise ValueError(f"unknown_columns must be 'error', 'extra' or 'ignore', got "
                         f"{unknown_columns!r}")
    files = _expand(path)
    layout = detect_layout(files[0]) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)} or 'auto'")
    keep = _filters(modality, source, split, language if layout == "slake" else None)
    report = LoadReport(source=path)
    records = []
    for file in files:
        collector = Collector(file, skip_invalid, check_images, keep)
        root = image_root or _default_root(file, layout)
        for item in _rows(file, layout, root):
            if isinstance(item, DataError):
                collector.skip_or_raise(item)
                continue
            where, row = item
            ctx = Context(where, root, os.path.splitext(os.path.basename(file))[0],
                          unknown_columns)
            collector.add(where, lambda row=row, ctx=ctx: LAYOUTS[layout].build(row, ctx))
        records.extend(collector.records)
        report.merge(collector.report)
    _check_cross_file_ids(records, files)
    if report.skipped or report.filtered:
        log.warning("%s", report.summary())
    return VQADataset(records, report)


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
    """Guess the layout from the extension and the first record's keys."""
    ext = os.path.splitext(file)[1].lower()
    if ext == ".csv":
        return "pmcvqa"
    if ext in (".pkl", ".pickle", ".parquet"):
        return "pathvqa"
    if ext == ".jsonl":
        return "jsonl"
    if ext != ".json":
        raise ValueError(f"{file}: cannot guess the layout from extension {ext!r}; pass "
                         f"layout= one of {sorted(LAYOUTS)}")
    data = load_json(file)
    first = _first_record(data)
    keys = set(first) if isinstance(first, dict) else set()
    for layout, signature in (("omnimedvqa", {"question_id", "gt_answer"}),
                              ("slake", {"img_name", "q_lang"}), ("jsonl", {"id", "images"}),
                              ("vqarad", {"image_name"}), ("pathmmu", {"options", "question"}),
                              ("pathvqa", {"image", "question", "answer"})):
        if signature <= keys:
            return layout
    raise ValueError(f"{file}: cannot guess the layout from the first record's keys "
                     f"{sorted(keys)}; pass layout= one of {sorted(LAYOUTS)}")


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


def _rows(file: str, layout: str, root: str) -> Iterator:
    ext = os.path.splitext(file)[1].lower()
    if ext == ".jsonl":
        yield from read_jsonl(file)
    elif ext == ".csv":
        yield from read_csv(file)
    elif ext in (".pkl", ".pickle"):
        yield from iter_items(file, read_pickle(file))
    elif ext == ".parquet":
        image_dir = os.path.join(root, os.path.splitext(os.path.basename(file))[0] + "_images")
        yield from iter_items(file, read_parquet(file, image_dir))
    else:
        data = load_json(file)
        if layout == "pathmmu" and isinstance(data, dict):
            yield from _pathmmu_items(file, data)
        elif isinstance(data, list):
            yield from iter_items(file, data, id_key=_ID_KEYS.get(layout))
        else:
            raise DataError("bad_value", file, "(file)", "(top level)", "expected a JSON list "
                            "of records", f"check that this is a {layout} file")


_ID_KEYS = {"omnimedvqa": "question_id", "slake": "qid", "vqarad": "qid", "jsonl": "id",
            "pathmmu": "No"}


def _pathmmu_items(file: str, data: dict) -> Iterator:
    """PathMMU's data.json: {subset: {split: [items]}} (also accepts {subset: [items]})."""
    for subset, value in data.items():
        groups = value.items() if isinstance(value, dict) else [(None, value)]
        for split, items in groups:
            for where, row in iter_items(file, items or [], id_key="No"):
                where.record = f"{subset}/{split or '-'} {where.record}"
                yield where, {**row, "_subset": subset, "_split": split}


def _filters(modality, source, split, language):
    """A keep() callback returning the name of the filter that drops a record, or None."""
    def as_set(value, normalize):
        if value is None:
            return None
        values = [value] if isinstance(value, str) else list(value)
        return {normalize(v) for v in values}

    modalities = as_set(modality, normalize_modality)
    sources = as_set(source, str.casefold)

    def keep(record):
        if language and str(record.extra.get("q_lang", language)) != language:
            return "language"
        if modalities is not None and record.modality not in modalities:
            return "modality"
        if sources is not None and record.source.casefold() not in sources:
            return "source"
        if split is not None and record.split != split:
            return "split"
        return None

    return keep if any(x is not None for x in (modalities, sources, split, language)) else None


def _check_cross_file_ids(records, files) -> None:
    """Ids must also be unique across the files of a folder (e.g. two OmniMedVQA JSONs)."""
    if len(files) < 2:
        return
    seen = {}
    for record in records:
        if record.id in seen:
            raise DataError("duplicate_id", ", ".join(files[:3]), f"id {record.id!r}", "id",
                            "the same id occurs in two files", "load the files separately or "
                            "make the ids unique")
        seen[record.id] = True
