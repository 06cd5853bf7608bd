"""Hugging Face ``datasets`` objects wherever a record list is accepted, without importing
``datasets``: a dataset is recognised by its attributes (duck typing), and its rows go through
the same layouts as files (:func:`data.load_dataset`).

* :func:`from_hf_dataset` - a ``datasets.Dataset`` (or ``IterableDataset``) -> :class:`VQADataset`;
* :func:`as_records` - what the trainers, :func:`grpo.evaluate.evaluate` and
  :func:`data.split_records` call on what they are given: lists pass through unchanged.

Rows are read in Arrow form (``with_format("arrow")``), so an ``Image`` column arrives as its
stored ``{"bytes", "path"}`` struct and the bytes are written once to the content-addressed image
cache, never decoded and re-encoded. Rows of an iterable dataset come decoded (PIL images); those
are written to the cache as PNG.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Iterator

from .layouts import layout_from_keys
from .loaders import check_layout, load_rows
from .records import VQADataset, Where

BATCH_ROWS = 256


def is_hf_dataset(obj) -> bool:
    """Whether ``obj`` looks like a ``datasets.Dataset`` / ``IterableDataset`` (it has
    ``column_names`` and ``features``); a ``DatasetDict`` raises, naming its splits."""
    if isinstance(getattr(obj, "column_names", None), dict):  # a DatasetDict (a dict subclass)
        raise ValueError(f"got a DatasetDict with splits {sorted(obj.column_names)}; pass one "
                         "split, e.g. dataset['train']")
    if isinstance(obj, (str, bytes, os.PathLike, list, tuple, dict)):
        return False
    return hasattr(obj, "column_names") and hasattr(obj, "features")


def dataset_label(dataset) -> str:
    """How errors name an in-memory dataset: ``datasets.Dataset 'path-vqa' split 'train'``,
    or ``datasets.Dataset (in memory)`` when it has neither name nor split (pass ``name=``)."""
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "config_name", None)
    split = getattr(dataset, "split", None)
    kind = f"{type(dataset).__module__.split('.')[0]}.{type(dataset).__name__}"
    label = kind + (f" {name!r}" if name else "") + (f" split {str(split)!r}" if split else "")
    return label if (name or split) else f"{kind} (in memory)"


def _stem(dataset) -> str:
    """The part of generated ids that names the source: the split's name (like a file
    ``train-00000-of-00001.parquet``), else the dataset's name, else ``dataset``."""
    info = getattr(dataset, "info", None)
    name = str(getattr(dataset, "split", None) or getattr(info, "dataset_name", None)
               or "dataset")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def hf_rows(dataset, label: str) -> Iterator:
    """``(Where, row)`` for each row, ``row N`` 0-based as ``dataset[N]`` indexes it."""
    if callable(getattr(dataset, "with_format", None)) and hasattr(dataset, "__len__"):
        arrow = dataset.with_format("arrow")
        for start in range(0, len(dataset), BATCH_ROWS):
            for offset, row in enumerate(arrow[start:start + BATCH_ROWS].to_pylist()):
                yield Where(label, f"row {start + offset}", start + offset), row
        return
    for index, row in enumerate(dataset):  # an IterableDataset: decoded rows
        yield Where(label, f"row {index}", index), dict(row)


def from_hf_dataset(dataset, layout: str = "auto", image_root: str | None = None, *,
                    name: str | None = None, **options) -> VQADataset:
    """Records of a Hugging Face dataset, through the layouts of :func:`data.load_dataset`
    (same options). ``layout="auto"`` reads the column names (``image, question, answer`` is
    PathVQA's export unless the dataset's name says VQA-RAD). Relative image paths start from
    ``image_root`` (default: the working folder); image bytes go to the image cache. Errors
    name the dataset (``name``, default its ``info.dataset_name`` and split) and the row."""
    label = name or dataset_label(dataset)
    if layout == "auto":
        columns = list(dataset.column_names or [])
        if not columns:  # an IterableDataset may not know its columns: look at the first row
            first = next(iter(dataset), None)
            columns = list(first) if isinstance(first, dict) else []
        first = next(hf_rows(dataset, label), (None, {}))[1]
        image = first.get("image") if isinstance(first, dict) else None
        name = image.get("path") if isinstance(image, dict) else image
        layout = layout_from_keys(columns, label, name if isinstance(name, str) else "")
        if layout is None:
            raise ValueError(f"{label}: cannot guess the layout from the columns "
                             f"{sorted(columns)}; pass layout=")
    check_layout(layout)
    root = os.path.abspath(image_root or os.getcwd())
    return load_rows([(label, hf_rows(dataset, label), root, _stem(dataset))], layout, label,
                     **options)


class RowView(Sequence):
    """A dataset of chat-format rows (a ``messages`` column, or TRL's ``prompt``) as a read-only
    sequence of dicts, decoded one row at a time by ``datasets`` (images become PIL images) rather
    than all at once."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [dict(self.dataset[i]) for i in range(*index.indices(len(self)))]
        return dict(self.dataset[index])


def as_records(items, **options):
    """``items`` as the trainers, evaluation and splitting take them. A list (or any sequence
    that is not a ``datasets`` object) is returned as it is. A ``datasets.Dataset`` with a
    ``messages`` column holds ready chat items, one with a ``prompt`` column rows in TRL's format:
    either is returned as a :class:`RowView` of dict items (see ``grpo.samples``). Any other
    dataset is converted through the layouts by :func:`from_hf_dataset` (``options`` are its
    keyword arguments) into a :class:`VQADataset`."""
    if not is_hf_dataset(items):
        return items
    if {"messages", "prompt"} & set(items.column_names or []):  # chat items, or TRL's prompt format
        if not hasattr(items, "__len__"):
            return [dict(row) for row in items]
        return RowView(items)
    return from_hf_dataset(items, **options)
