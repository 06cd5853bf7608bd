"""Row -> :class:`VQARecord` converters for each supported public layout.

Each :class:`Layout` lists the columns it understands: ``required`` ones must be present,
``known`` ones are copied into ``record.extra``; anything else is an ``unknown_column`` (a typo
guard) unless ``unknown_columns="extra"`` or ``"ignore"`` is passed to the loader.
Column names follow the files as the datasets distribute them (see docs/data.md).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

from .records import (LETTERS, VQARecord, Where, letter_index, lettered, normalize_modality,
                      option_index)

_LETTER_PREFIX = re.compile(r"^\s*\(?([A-J])\s*[:.)]\s*")  # "A:CT", "B) text", "(C) text"
_BARE_LETTER = re.compile(r"^\s*\(?([A-J])\)?\s*[.:]?\s*$")  # "B", "(B)", "B." as an answer


@dataclass(frozen=True)
class Context:
    """Where a row came from and how to resolve its image paths."""

    where: Where
    image_root: str
    source_name: str  # file stem, used in generated ids
    unknown_columns: str = "error"  # "error" | "extra" | "ignore"


@dataclass(frozen=True)
class Layout:
    name: str
    required: tuple[str, ...]
    known: tuple[str, ...]
    build: Callable[[dict, Context], VQARecord]


def check_columns(row: dict, layout: Layout, ctx: Context) -> dict:
    """Raise on missing required / unknown columns; return the extra (non-core) fields."""
    for column in layout.required:
        if column not in row or row[column] is None or str(row[column]).strip() == "":
            reason = "missing_answer" if column in ANSWER_COLUMNS else "missing_field"
            raise ctx.where.error(reason, column, f"required {layout.name} field is missing "
                                  "or empty", f"add '{column}' to this record")
    unknown = [c for c in row if c not in layout.required and c not in layout.known]
    if unknown and ctx.unknown_columns == "error":
        raise ctx.where.error("unknown_column", unknown[0], f"field not part of the "
                              f"{layout.name} layout (known: {', '.join(layout.required + layout.known)})",
                              "rename it if it is a typo, or pass unknown_columns='extra' to keep "
                              "it in record.extra ('ignore' to drop it)")
    keep = [c for c in row if c not in layout.required and
            (c in layout.known or ctx.unknown_columns == "extra")]
    return {c: row[c] for c in keep if row[c] not in (None, "")}


ANSWER_COLUMNS = ("answer", "Answer", "gt_answer", "Answer_label")


def resolve_image(name: str, root: str, subdirs: tuple[str, ...] = ("",),
                  exts: tuple[str, ...] = ("",)) -> str:
    """Absolute path of an image given as relative name: the first candidate that exists among
    ``root/<subdir>/<name><ext>``, else the first candidate (so the error shows the main one)."""
    name = str(name).strip()
    if os.path.isabs(name):
        return name
    candidates = [os.path.normpath(os.path.join(root, sub, name + ext))
                  for sub in subdirs for ext in exts]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return os.path.abspath(candidates[0])


def answer_text(options: list[str] | None, answer) -> str:
    """For multiple choice, map a bare letter answer ("B", "(B)") to its option text."""
    answer = "" if answer is None else str(answer).strip()
    if options and option_index(options, answer) is None:
        match = _BARE_LETTER.match(answer)
        index = letter_index(match.group(1), len(options)) if match else None
        if index is not None:
            return options[index]
    return answer


def strip_letter(option, letter: str | None = None) -> str:
    """'A:CT scan' -> 'CT scan' (PMC-VQA and PathMMU prefix options with their letter). With
    ``letter`` only that letter is removed, so an option such as 'A. fumigatus' in position C
    keeps its text."""
    text = str(option)
    match = _LETTER_PREFIX.match(text)
    if match and (letter is None or match.group(1) == letter):
        text = text[match.end():]
    return text.strip()


# --- project JSONL -------------------------------------------------------------------------

def _build_jsonl(row: dict, ctx: Context) -> VQARecord:
    row = dict(row)
    if "image" in row and "images" not in row:  # accept a single "image" for convenience
        image = row.pop("image")
        row["images"] = image if isinstance(image, list) else [image]
    extra = check_columns(row, JSONL, ctx)
    images = row["images"] if isinstance(row["images"], list) else [row["images"]]
    options = row.get("options")
    if options is not None and not isinstance(options, list):
        raise ctx.where.error("bad_value", "options", f"expected a list, got {options!r}",
                              "write options as a JSON list of texts in letter order")
    return VQARecord(
        id=str(row["id"]), images=[resolve_image(p, ctx.image_root) for p in images],
        question=str(row["question"]), answer=answer_text(options, row["answer"]),
        options=[str(o) for o in options] if options else None,
        modality=normalize_modality(row.get("modality")), source=str(row.get("source", "")),
        split=row.get("split"), criteria=list(row.get("criteria") or []),
        extra={**dict(row.get("extra") or {}),
               **{k: v for k, v in extra.items() if k not in JSONL_CORE}})


JSONL_CORE = ("options", "modality", "source", "split", "criteria", "extra")
JSONL = Layout("jsonl", ("id", "images", "question", "answer"), JSONL_CORE, _build_jsonl)


# --- PathVQA (pickles qas/<split>/<split>_qa.pkl, HF parquet/JSON exports) -------------------

def _build_pathvqa(row: dict, ctx: Context) -> VQARecord:
    extra = check_columns(row, PATHVQA, ctx)
    image = row["image"]
    split = extra.get("split") or (str(image).split("_")[0] if "_" in str(image) else None)
    path = resolve_image(image, ctx.image_root, ("", "images", f"images/{split}"),
                         ("", ".jpg", ".png"))
    return VQARecord(id=str(extra.get("id", f"pathvqa-{ctx.source_name}-{ctx.where.record}")),
                     images=[path], question=str(row["question"]), answer=str(row["answer"]),
                     modality="pathology", source="PathVQA", split=split, extra=extra)


PATHVQA = Layout("pathvqa", ("image", "question", "answer"), ("id", "split"), _build_pathvqa)


# --- PMC-VQA (train.csv / test.csv / *_2.csv) -------------------------------------------------

def _build_pmcvqa(row: dict, ctx: Context) -> VQARecord:
    row = {k: v for k, v in row.items() if k}  # pandas writes an unnamed index column
    extra = check_columns(row, PMCVQA, ctx)
    options = [strip_letter(row[f"Choice {x}"], x) for x in "ABCD"
               if str(row.get(f"Choice {x}") or "").strip()]
    label = str(row.get("Answer_label") or "").strip()
    if label:
        if label not in LETTERS[:len(options)]:
            raise ctx.where.error("answer_not_in_options", "Answer_label", f"label {label!r} "
                                  f"names no option (there are {len(options)})",
                                  "use a letter A-D that has a non-empty 'Choice' column")
        answer = options[LETTERS.index(label)]
    else:
        answer = answer_text(options, strip_letter(row.get("Answer") or ""))
    return VQARecord(
        id=str(extra.get("index", f"pmcvqa-{ctx.source_name}-{ctx.where.record.split()[-1]}")),
        images=[resolve_image(row["Figure_path"], ctx.image_root, ("", "images", "figures"))],
        question=str(row["Question"]).strip(), options=options or None, answer=answer,
        modality=normalize_modality(extra.get("modality")), source="PMC-VQA",
        split=extra.get("split"), extra=extra)


PMCVQA = Layout("pmcvqa", ("Figure_path", "Question"),
                ("Answer", "Answer_label", "Choice A", "Choice B", "Choice C", "Choice D",
                 "Caption", "split", "index", "Unnamed: 0", "modality"), _build_pmcvqa)


# --- OmniMedVQA (QA_information/<access>/<dataset>.json) -------------------------------------

def _build_omnimedvqa(row: dict, ctx: Context) -> VQARecord:
    row = dict(row)
    if "modality" in row and "modality_type" not in row:  # one known entry uses this key
        row["modality_type"] = row.pop("modality")
    extra = check_columns(row, OMNIMEDVQA, ctx)
    options = [str(row[f"option_{x}"]).strip() for x in "ABCD"
               if str(row.get(f"option_{x}") or "").strip()]
    return VQARecord(
        id=str(row["question_id"]), images=[resolve_image(row["image_path"], ctx.image_root)],
        question=str(row["question"]).strip(), options=options or None,
        answer=answer_text(options, row["gt_answer"]),
        modality=normalize_modality(row.get("modality_type")), source=str(row["dataset"]),
        extra=extra)


OMNIMEDVQA = Layout("omnimedvqa", ("question_id", "dataset", "question", "gt_answer",
                                   "image_path"),
                    ("question_type", "modality_type", "option_A", "option_B", "option_C",
                     "option_D"), _build_omnimedvqa)


# --- PathMMU (data.json: {subset: {split: [items]}} or a flat list) ---------------------------

def _build_pathmmu(row: dict, ctx: Context) -> VQARecord:
    extra = check_columns(row, PATHMMU, ctx)
    raw = row["options"]
    if isinstance(raw, dict):  # {"A": "...", "B": "..."}
        raw = [raw[k] for k in sorted(raw)]
    if not isinstance(raw, list):
        raise ctx.where.error("bad_value", "options", f"expected a list or letter->text "
                              f"mapping, got {raw!r}", "write options as a list of texts")
    options = [strip_letter(o, letter) for letter, o in lettered(raw)]
    image = row.get("img") or row.get("image") or row.get("image_path") or ""
    explanation = str(extra.get("explanation") or "").strip()
    criteria = [s.strip() for s in re.split(r"(?<=[.!?])\s+", explanation) if s.strip()]
    subset, split = extra.pop("_subset", "PathMMU"), extra.pop("_split", None)
    number = extra.get("No", extra.get("id", ctx.where.record.split()[-1]))
    return VQARecord(
        id=f"pathmmu-{subset}-{split or 'all'}-{number}",
        images=[resolve_image(image, ctx.image_root, ("", "images"))] if image else [],
        question=str(row["question"]).strip(), options=options,
        answer=answer_text(options, strip_letter(row["answer"])
                           if not _BARE_LETTER.match(str(row["answer"])) else row["answer"]),
        modality="pathology", source=f"PathMMU/{subset}", split=split, criteria=criteria,
        extra=extra)


PATHMMU = Layout("pathmmu", ("question", "options", "answer"),
                 ("No", "id", "img", "image", "image_path", "img_path", "explanation", "subset",
                  "source", "category", "subcategory", "question_type", "difficulty", "_subset",
                  "_split"), _build_pathmmu)


# --- SLAKE (train.json / validate.json / test.json, images in imgs/) -------------------------

def _build_slake(row: dict, ctx: Context) -> VQARecord:
    extra = check_columns(row, SLAKE, ctx)
    return VQARecord(
        id=f"slake-{row.get('qid', ctx.where.record)}",
        images=[resolve_image(row["img_name"], ctx.image_root, ("", "imgs"))],
        question=str(row["question"]).strip(), answer=str(row["answer"]).strip(),
        modality=normalize_modality(row.get("modality")), source="SLAKE", extra=extra)


SLAKE = Layout("slake", ("img_name", "question", "answer"),
               ("img_id", "qid", "q_lang", "location", "modality", "answer_type", "base_type",
                "content_type", "triple"), _build_slake)


# --- VQA-RAD (original "VQA_RAD Dataset Public.json" or HF image/question/answer) ------------

def _build_vqarad(row: dict, ctx: Context) -> VQARecord:
    extra = check_columns({k: v for k, v in row.items() if k not in ("image", "image_name")},
                          VQARAD, ctx)
    image = row.get("image_name") or row.get("image")
    if not image:
        raise ctx.where.error("missing_field", "image_name", "required vqarad field is missing",
                              "add 'image_name' (original JSON) or 'image' (HF export)")
    qid = row.get("qid", ctx.where.record.split()[-1])
    return VQARecord(
        id=f"vqarad-{ctx.source_name}-{qid}",
        images=[resolve_image(image, ctx.image_root, ("", "images", "VQA_RAD Image Folder"))],
        question=str(row["question"]).strip(), answer=str(row["answer"]).strip(),
        modality=normalize_modality(row.get("modality")), source="VQA-RAD", extra=extra)


VQARAD = Layout("vqarad", ("question", "answer"),
                ("qid", "phrase_type", "qid_linked_id", "image_case_url", "image_organ",
                 "evaluation", "question_rephrase", "question_relation", "question_frame",
                 "question_type", "answer_type", "modality", "split"), _build_vqarad)

LAYOUTS = {layout.name: layout for layout in (JSONL, PATHVQA, PMCVQA, OMNIMEDVQA, PATHMMU,
                                              SLAKE, VQARAD)}
