"""Record validation with errors that say where and how to fix, and the skip/count collector.

Checks (each raises :class:`data.records.DataError` with a ``reason`` key):

==========================  ==================================================================
reason                      when
==========================  ==================================================================
``missing_field``           a required field/column (question, image) is absent or empty
``missing_answer``          the reference answer is absent or empty
``answer_not_in_options``   a multiple-choice answer (text or letter) matches no option
``missing_image``           an image path does not exist
``unreadable_image``        an image exists but Pillow cannot decode it
``duplicate_id``            two records share an id (also across the files of a folder)
``unknown_column``          a field the layout does not know (typo guard); see
                            ``unknown_columns=`` in :func:`data.load_dataset`
``bad_value``               a value has the wrong type (e.g. options not a list)
``bad_encoding``            a line or record holds bytes that are not UTF-8
``image_outside_root``      a relative image path climbs out of ``image_root`` (``../x.png``)
``answer_label_mismatch``   PMC-VQA: ``Answer`` and ``Answer_label`` name different options
``multiple_answer_labels``  PMC-VQA: ``Answer_label`` names several options ("AB")
``option_gap``              PMC-VQA: an empty choice before a filled one (letters would shift)
``unresolved_answer``       R1: the solution resolves to none of the options parsed from the
                            problem (or is a letter when the problem lists no options)
==========================  ==================================================================

A file with no record at all raises ``empty_file``, and a load that keeps no record raises
``empty_dataset`` (both even with ``skip_invalid=True``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from PIL import UnidentifiedImageError

from .readers import image_format
from .records import DataError, LoadReport, VQADataset, VQARecord, Where, option_index

CHECK_IMAGES = ("open", "exists", "none")


def check_image(path: str, where: Where, field_name: str, mode: str = "open") -> None:
    """Raise if ``path`` is missing (mode exists/open) or not decodable by Pillow (mode open)."""
    if mode == "none":
        return
    if not os.path.isfile(path):
        raise where.error("missing_image", field_name, f"image file not found: {path}",
                          "check the path, or pass image_root= pointing at the folder the "
                          "relative image paths start from")
    if mode == "open":
        try:
            image_format(path, verify=True)  # headers and checksums, not all pixels
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise where.error("unreadable_image", field_name,
                              f"Pillow cannot read image {path} ({exc.__class__.__name__}: "
                              f"{exc})", "re-download or re-encode the file (PNG/JPEG/TIFF), "
                              "or remove the record") from None


def validate_record(record: VQARecord, where: Where, check_images: str = "open") -> VQARecord:
    """Check one record in place; returns it so calls can be chained."""
    if not str(record.question).strip():
        raise where.error("missing_field", "question", "the question is empty",
                          "write the question text in this field")
    if record.answer is None or not str(record.answer).strip():
        raise where.error("missing_answer", "answer", "the reference answer is missing or empty",
                          "give the reference answer (for multiple choice, the correct option "
                          "text or its letter)")
    if record.options is not None:
        if not isinstance(record.options, list) or len(record.options) < 2:
            raise where.error("bad_value", "options", f"expected a list of at least 2 option "
                              f"texts, got {record.options!r}", "list the options in letter order "
                              "A, B, ... or set options to null for an open question")
        if option_index(record.options, record.answer) is None:
            raise where.error("answer_not_in_options", "answer",
                              f"answer {record.answer!r} is not among the options "
                              f"{record.options!r}", "make the answer exactly one of the option "
                              "texts (or its letter), or fix the options")
    if not record.images:
        raise where.error("missing_field", "image", "the record has no image",
                          "give the image path (relative to image_root or absolute)")
    for path in record.images:
        check_image(path, where, "image", check_images)
    return record


@dataclass
class Collector:
    """Builds a :class:`VQADataset`: validates, rejects duplicate ids, skips or raises.

    With ``skip_invalid=False`` the first :class:`DataError` propagates. With ``True`` each bad
    record is counted under its reason in ``report.skipped`` (first messages kept verbatim in
    ``report.examples``); nothing is dropped without being counted.
    """

    source: str
    skip_invalid: bool = False
    check_images: str = "open"
    keep: Callable[[VQARecord], str | None] | None = None  # returns a filter name to drop
    report: LoadReport = field(default_factory=LoadReport)
    records: list[VQARecord] = field(default_factory=list)
    # id -> (file, record) of its first use; pass one dict to the collectors of several files to
    # reject ids repeated across them (the files of an OmniMedVQA folder)
    seen: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self):
        if self.check_images not in CHECK_IMAGES:
            raise ValueError(f"check_images must be one of {CHECK_IMAGES}, "
                             f"got {self.check_images!r}")
        self.report.source = self.source

    def add(self, where: Where, build: Callable[[], VQARecord]) -> None:
        """Build a record with ``build()`` (which may raise DataError) and keep it if valid."""
        self.report.n_read += 1
        try:
            record = build()
            dropped_by = self.keep(record) if self.keep else None
            if dropped_by:
                self.report.filtered[dropped_by] += 1
                return
            validate_record(record, where, self.check_images)
            if record.id in self.seen:
                file, first = self.seen[record.id]
                used_by = first if file == where.file else f"{file} {first}"
                raise where.error("duplicate_id", "id", f"id {record.id!r} already used by "
                                  f"{used_by}", "give every record a unique id (or remove the "
                                  "duplicate record; load the files separately if they are "
                                  "different datasets)")
        except DataError as error:
            if not self.skip_invalid:
                raise
            self.report.skip(error)
            return
        self.seen[record.id] = (where.file, where.record)
        self.records.append(record)
        self.report.n_kept += 1

    def skip_or_raise(self, error: DataError) -> None:
        """For errors found before a record can be built (e.g. an unparsable JSONL line)."""
        self.report.n_read += 1
        if not self.skip_invalid:
            raise error
        self.report.skip(error)

    def dataset(self) -> VQADataset:
        return VQADataset(self.records, self.report)
