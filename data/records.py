"""The VQA record type, the error raised for bad input (and where it was found), option letters,
and the dataset container with its report.

Every loader in :mod:`data.loaders` turns a public layout into :class:`VQARecord` objects; the
rest of the library (prompts, rewards, trainers) only ever sees this one type.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

LETTERS = "ABCDEFGHIJ"

# Canonical modality names. Public datasets spell modalities many ways ("CT(Computed Tomography)",
# "MR (Mag-netic Resonance Imaging)" in OmniMedVQA, "X-Ray" in SLAKE); the keyword table below maps
# them onto these names so that out-of-domain sets can be selected uniformly.
MODALITIES = ("pathology", "ct", "mri", "xray", "ultrasound", "dermoscopy", "fundus", "oct",
              "microscopy", "other")
_MODALITY_KEYWORDS = (  # first match wins; order matters ("oct" before "ct")
    ("optical coherence", "oct"), ("oct", "oct"), ("dermo", "dermoscopy"), ("skin", "dermoscopy"),
    ("fundus", "fundus"), ("retina", "fundus"), ("computed tomography", "ct"), ("ct", "ct"),
    ("magnetic", "mri"), ("mri", "mri"), ("mr", "mri"), ("x-ray", "xray"), ("x_ray", "xray"),
    ("xray", "xray"), ("radiograph", "xray"), ("ultrasound", "ultrasound"), ("us", "ultrasound"),
    ("patholog", "pathology"), ("histo", "pathology"), ("h&e", "pathology"),
    ("microscop", "microscopy"),
)


def normalize_modality(raw: str | None) -> str:
    """Map a dataset's modality spelling onto one of :data:`MODALITIES` ("other" if unknown)."""
    text = (raw or "").strip().lower()
    if text in MODALITIES:
        return text
    words = set(text.replace("(", " ").replace(")", " ").replace("/", " ").split())
    for key, name in _MODALITY_KEYWORDS:
        # Short keys must be whole words: "ct" inside "dermoscopy-like" text must not match.
        if (len(key) <= 3 and key in words) or (len(key) > 3 and key in text):
            return name
    return "other"


class DataError(ValueError):
    """Bad input: names the file, the record (line number or id), the field, and how to fix it.

    ``reason`` is a short machine-readable key (e.g. ``"missing_image"``) used to count skipped
    records when a loader runs with ``skip_invalid=True``.
    """

    def __init__(self, reason: str, file: str, record: str, field_name: str, problem: str,
                 fix: str):
        self.reason, self.file, self.record, self.field = reason, file, record, field_name
        self.problem, self.fix = problem, fix
        super().__init__(f"{file}: record {record}: field '{field_name}': {problem}. "
                         f"How to fix: {fix}")


@dataclass
class Where:
    """Location of a raw record, used to build error messages."""

    file: str
    record: str  # "line 12" or "id 'abc'" or "item 3" or "row 3"
    index: int | None = None  # 0-based position of the row in its file (for generated ids)

    @property
    def number(self) -> str:
        """The row's number for a generated id: ``index`` when known, else the last word of
        ``record`` ("line 12" -> "12")."""
        return str(self.index) if self.index is not None else self.record.split()[-1]

    def error(self, reason: str, field_name: str, problem: str, fix: str) -> DataError:
        return DataError(reason, self.file, self.record, field_name, problem, fix)


@dataclass
class VQARecord:
    """One visual question with its reference answer.

    ``answer`` always holds the answer *text*; for multiple choice it is one of ``options`` and
    :attr:`answer_letter` gives its letter (A, B, ...). Storing the text keeps records readable
    and lets option order be changed without touching the answer.
    ``criteria`` are short factual phrases a sound reasoning chain should contain (used by the
    process reward's rubric judge and by :func:`data.prompts.build_sft_target`).
    """

    id: str
    images: list[str]
    question: str
    answer: str
    options: list[str] | None = None
    modality: str = "other"
    source: str = ""
    split: str | None = None
    criteria: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)

    @property
    def answer_letter(self) -> str | None:
        """Letter of the correct option (None for open questions or an answer not in options)."""
        index = option_index(self.options or [], self.answer)
        return None if index is None else LETTERS[index]

    def to_json(self) -> str:
        """One-line JSON, the project's own JSONL layout (``layout="jsonl"``)."""
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "VQARecord":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise KeyError(f"unknown VQARecord field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "VQARecord":
        return cls.from_dict(json.loads(text))


def normalize_text(text: Any) -> str:
    """Comparison key for answers: trimmed, case-folded, inner whitespace collapsed."""
    return " ".join(str(text).split()).casefold()


def lettered(options: list[str]) -> list[tuple[str, str]]:
    """``[("A", first option), ("B", second), ...]``: the one place options get their letters."""
    return [(LETTERS[i], text) for i, text in enumerate(options)]


def letter_index(letter: str, n_options: int) -> int | None:
    """Index of the option named by ``letter`` (``"B"`` -> 1), or None if it names none of
    ``n_options`` options."""
    index = LETTERS.find(letter) if len(letter) == 1 else -1
    return index if 0 <= index < n_options else None


def option_index(options: list[str], answer: str) -> int | None:
    """Index of ``answer`` among ``options`` (exact first, then after :func:`normalize_text`)."""
    if answer in options:
        return options.index(answer)
    keys = [normalize_text(o) for o in options]
    key = normalize_text(answer)
    return keys.index(key) if key in keys else None


@dataclass
class LoadReport:
    """What a loader read, kept, skipped (by reason) and filtered out (by filter)."""

    source: str = ""
    n_read: int = 0
    n_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # first few skip messages, verbatim
    examples_by_reason: dict = field(default_factory=dict)  # reason -> its first messages

    MAX_EXAMPLES = 5
    MAX_EXAMPLES_PER_REASON = 3

    def skip(self, error: DataError) -> None:
        self.skipped[error.reason] += 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(str(error))
        kept = self.examples_by_reason.setdefault(error.reason, [])
        if len(kept) < self.MAX_EXAMPLES_PER_REASON:
            kept.append(str(error))

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "LoadReport") -> None:
        self.n_read += other.n_read
        self.n_kept += other.n_kept
        self.skipped.update(other.skipped)
        self.filtered.update(other.filtered)
        room = self.MAX_EXAMPLES - len(self.examples)
        self.examples.extend(other.examples[:max(room, 0)])
        for reason, messages in other.examples_by_reason.items():
            kept = self.examples_by_reason.setdefault(reason, [])
            kept.extend(messages[:max(self.MAX_EXAMPLES_PER_REASON - len(kept), 0)])

    def summary(self) -> str:
        text = f"{self.source}: read {self.n_read}, kept {self.n_kept}"
        if self.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            text += f", skipped {self.n_skipped} invalid ({reasons})"
        if self.filtered:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.filtered.items()))
            text += f", filtered out {sum(self.filtered.values())} ({reasons})"
        return text


class VQADataset(list):
    """A list of :class:`VQARecord` with the :class:`LoadReport` of how it was loaded."""

    def __init__(self, records: Iterable[VQARecord] = (), report: LoadReport | None = None):
        super().__init__(records)
        self.report = report or LoadReport(n_read=len(self), n_kept=len(self))

    def by_modality(self) -> dict[str, "VQADataset"]:
        groups: dict[str, list[VQARecord]] = {}
        for record in self:
            groups.setdefault(record.modality, []).append(record)
        return {k: VQADataset(v) for k, v in sorted(groups.items())}

    def write_jsonl(self, path: str) -> None:
        """Write the records in the project's own JSONL layout (one :meth:`VQARecord.to_json`
        per line)."""
        with open(path, "w", encoding="utf-8") as handle:
            for record in self:
                handle.write(record.to_json() + "\n")
