"""Row -> :class:`VQARecord` converters for each supported public layout.

Each :class:`Layout` lists the columns it understands: ``required`` ones must be present,
``known`` ones are copied into ``record.extra``; anything else is an ``unknown_column`` (a typo
guard) unless ``unknown_columns="extra"`` or ``"ignore"`` is passed to the loader.
Column names follow the files as the datasets distribute them (see docs/data.md).
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import Callable

from PIL import Image

from .readers import default_image_cache, write_image_bytes
from .records import (LETTERS, VQARecord, Where, letter_index, lettered, normalize_modality,
                      normalize_text, option_index)

_LETTER_PREFIX = re.compile(r"^\s*\(?([A-J])\s*[:.)]\s*")  # "A:CT", "B) text", "(C) text"
_BARE_LETTER = re.compile(r"^\s*\(?([A-J])\)?\s*[.:]?\s*$")  # "B", "(B)", "B." as an answer


@dataclass(frozen=True)
class Context:
    """Where a row came from and how to resolve its images."""

    where: Where
    image_root: str
    source_name: str  # file stem, used in generated ids
    unknown_columns: str = "error"  # "error" | "extra" | "ignore"
    allow_outside_root: bool = False  # follow relative image paths that climb out of image_root
    image_cache: str | None = None  # where image bytes held in the data are written

    def image(self, value, field_name: str = "image", subdirs: tuple[str, ...] = ("",),
              exts: tuple[str, ...] = ("",)) -> str:
        """Path of one image given as a path (relative to ``image_root``), a Hugging Face
        ``{"bytes", "path"}`` struct, raw encoded bytes or a PIL image. Bytes and PIL images are
        written once to the content-addressed image cache."""
        if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
            if value.get("bytes"):
                return write_image_bytes(bytes(value["bytes"]), value.get("path"), self.cache())
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)) and value:
            return write_image_bytes(bytes(value), None, self.cache())
        if isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            return write_image_bytes(buffer.getvalue(), "image.png", self.cache())
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            raise self.where.error("missing_field" if not value else "bad_value", field_name,
                                   f"expected an image path, got {value!r}", "give the image "
                                   "path (relative to image_root or absolute) or its bytes")
        return resolve_image(value, self.image_root, subdirs, exts, where=self.where,
                             field_name=field_name, allow_outside=self.allow_outside_root)

    def images(self, value, field_name: str = "image", subdirs: tuple[str, ...] = ("",),
               exts: tuple[str, ...] = ("",)) -> list[str]:
        """:meth:`image` of each element when ``value`` is a list, else of ``value`` itself."""
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return [self.image(v, f"{field_name}[{i}]" if len(values) > 1 else field_name, subdirs,
                           exts) for i, v in enumerate(values)]

    def cache(self) -> str:
        return self.image_cache or default_image_cache()


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


ANSWER_COLUMNS = ("answer", "Answer", "gt_answer", "Answer_label", "solution")


def resolve_image(name, root: str, subdirs: tuple[str, ...] = ("",),
                  exts: tuple[str, ...] = ("",), *, where: Where | None = None,
                  field_name: str = "image", allow_outside: bool = False) -> str:
    """Absolute path of an image given as relative name: the first candidate that exists among
    ``root/<subdir>/<name><ext>``, else the first candidate (so the error shows the main one).

    An absolute path is used as it is (it is the data's author's explicit choice, and the
    project's own JSONL stores absolute paths). A relative path that climbs out of ``root``
    (``../../x.png``) raises ``DataError`` (reason ``image_outside_root``) unless
    ``allow_outside`` is set; ``sub/../x.png`` stays inside. The check is on the path's text:
    links inside ``root`` are followed."""
    name = str(name).strip()
    if os.path.isabs(name):
        return name
    outside = os.path.abspath(os.path.join(root, name))
    if not allow_outside and os.path.relpath(outside, os.path.abspath(root)).split(
            os.sep)[0] == os.pardir:
        raise (where or Where(root, "(unknown)")).error(
            "image_outside_root", field_name, f"relative image path {name!r} leads outside "
            f"image_root {os.path.abspath(root)} (to {outside})", "fix the path, or pass "
            "image_root= the folder the paths start from, or allow_outside_root=True to follow "
            "paths that leave image_root")
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
    options = row.get("options")
    if options is not None and not isinstance(options, list):
        raise ctx.where.error("bad_value", "options", f"expected a list, got {options!r}",
                              "write options as a JSON list of texts in letter order")
    return VQARecord(
        id=str(row["id"]), images=ctx.images(row["images"], "images"),
        question=str(row["question"]), answer=answer_text(options, row["answer"]),
        options=[str(o) for o in options] if options else None,
        modality=normalize_modality(row.get("modality")), source=str(row.get("source", "")),
        split=row.get("split"), criteria=list(row.get("criteria") or []),
        extra={**dict(row.get("extra") or {}),
               **{k: v for k, v in extra.items() if k not in JSONL_CORE}})


JSONL_CORE = ("options", "modality", "source", "split", "criteria", "extra")
JSONL = Layout("jsonl", ("id", "images", "question", "answer"), JSONL_CORE, _build_jsonl)


# --- PathVQA (pickles qas/<split>/<split>_qa.pkl, HF parquet/JSON exports) -------------------

_PATHVQA_NAME = re.compile(r"^(train|val|test)_")          # image names: train_0422, val_0001
_SPLIT_STEM = re.compile(r"^(train|val|validation|valid|test)(?=[-_.]|$)")  # train-00000-of-00002
_SPLIT_NAMES = {"validation": "val", "valid": "val"}


def pathvqa_split(image_name, source_name: str) -> str | None:
    """PathVQA's split of a record: from the image's file name (``train_0422``, also inside a
    path such as ``images/train/train_0422.jpg``), else from a folder of the path named
    train/val/test, else from the data file's name (``train_qa.pkl``, Hugging Face shards
    ``validation-00000-of-00001.parquet``); ``validation`` is PathVQA's ``val``."""
    path = str(image_name or "").replace("\\", "/")
    match = _PATHVQA_NAME.match(os.path.basename(path))
    if match:
        return match.group(1)
    folders = [part for part in path.split("/")[:-1] if part in ("train", "val", "test")]
    if folders:
        return folders[-1]
    match = _SPLIT_STEM.match(source_name)
    return _SPLIT_NAMES.get(match.group(1), match.group(1)) if match else None


def _build_pathvqa(row: dict, ctx: Context) -> VQARecord:
    extra = check_columns(row, PATHVQA, ctx)
    image = row["image"]
    name = image.get("path") if isinstance(image, dict) else image
    split = extra.get("split") or pathvqa_split(name if isinstance(name, str) else None,
                                                ctx.source_name)
    path = ctx.image(image, "image", ("", "images", f"images/{split}"), ("", ".jpg", ".png"))
    return VQARecord(id=str(extra.get("id", f"pathvqa-{ctx.source_name}-{ctx.where.number}")),
                     images=[path], question=str(row["question"]), answer=str(row["answer"]),
                     modality="pathology", source="PathVQA", split=split, extra=extra)


PATHVQA = Layout("pathvqa", ("image", "question", "answer"), ("id", "split"), _build_pathvqa)


# --- PMC-VQA (train.csv / test.csv / *_2.csv) -------------------------------------------------

def _same_text(a: str, b: str) -> bool:
    """Equal after normalize_text and without trailing punctuation ("MRI." == "mri")."""
    return normalize_text(a).rstrip(".;, ") == normalize_text(b).rstrip(".;, ")


def _pmc_options(row: dict, ctx: Context) -> list[str]:
    """Choice A..D without their letter prefixes; empty trailing choices are dropped. An empty
    choice before a filled one would shift the letters of the later ones (and make
    Answer_label name the wrong option), so it raises ``option_gap``."""
    texts = [strip_letter(row.get(f"Choice {x}") or "", x) for x in "ABCD"]
    filled = [i for i, text in enumerate(texts) if text]
    if filled and filled[-1] + 1 != len(filled):
        gap = next(i for i, text in enumerate(texts) if not text)
        raise ctx.where.error("option_gap", f"Choice {LETTERS[gap]}", f"choice {LETTERS[gap]} "
                              f"is empty but choice {LETTERS[filled[-1]]} is not: the later "
                              "choices would change letters", "fill in the empty choice, or "
                              "remove the row")
    return texts[:len(filled)]


def _pmc_label(label: str, options: list[str], ctx: Context) -> int:
    """Index of the option Answer_label names; a multi-letter label ("AB", "A,C") raises
    ``multiple_answer_labels``: this library scores one correct option per question."""
    if re.fullmatch(r"[A-J]{2,}", re.sub(r"[\s,;/&()]|and", "", label)):
        raise ctx.where.error("multiple_answer_labels", "Answer_label", f"label {label!r} names "
                              "several options; one correct option is expected",
                              "keep one letter, or remove the row")
    match = _BARE_LETTER.match(label)
    if not match:
        raise ctx.where.error("bad_value", "Answer_label", f"label {label!r} is not an option "
                              "letter", "write the letter of the correct choice (A-D)")
    index = letter_index(match.group(1), len(options))
    if index is None:
        raise ctx.where.error("answer_not_in_options", "Answer_label", f"label {label!r} "
                              f"names no option (there are {len(options)})",
                              "use a letter A-D that has a non-empty 'Choice' column")
    return index


def _pmc_agrees(given: str, index: int, options: list[str]) -> bool:
    """Whether the Answer column (a letter, "B:MRI" or the text) names option ``index``."""
    bare = _BARE_LETTER.match(given)
    if bare:
        return bare.group(1) == LETTERS[index]
    if _same_text(given, options[index]):
        return True
    prefix = _LETTER_PREFIX.match(given)
    return bool(prefix) and prefix.group(1) == LETTERS[index] and \
        _same_text(given[prefix.end():], options[index])


def _build_pmcvqa(row: dict, ctx: Context) -> VQARecord:
    row = {k: v for k, v in row.items() if k}  # pandas writes an unnamed index column
    extra = check_columns(row, PMCVQA, ctx)
    options = _pmc_options(row, ctx)
    label = str(row.get("Answer_label") or "").strip()
    given = str(row.get("Answer") or "").strip()
    if label:
        index = _pmc_label(label, options, ctx)
        # PMC-VQA gives the answer twice (text and letter); when they disagree nobody can say
        # which is right, so the row is refused rather than silently trusting the letter.
        if given and not _pmc_agrees(given, index, options):
            raise ctx.where.error("answer_label_mismatch", "Answer", f"Answer {given!r} "
                                  f"disagrees with Answer_label {label!r} (option "
                                  f"{LETTERS[index]} is {options[index]!r})",
                                  "correct one of the two columns, or remove the row")
        answer = options[index]
    else:
        answer = answer_text(options, strip_letter(given))
    return VQARecord(
        id=str(extra.get("index", f"pmcvqa-{ctx.source_name}-{ctx.where.number}")),
        images=[ctx.image(row["Figure_path"], "Figure_path", ("", "images", "figures"))],
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
        id=str(row["question_id"]), images=[ctx.image(row["image_path"], "image_path")],
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
    key = next((k for k in ("img", "image", "image_path") if row.get(k)), None)
    explanation = str(extra.get("explanation") or "").strip()
    criteria = [s.strip() for s in re.split(r"(?<=[.!?])\s+", explanation) if s.strip()]
    subset, split = extra.pop("_subset", "PathMMU"), extra.pop("_split", None)
    number = extra.get("No", extra.get("id", ctx.where.number))
    return VQARecord(
        id=f"pathmmu-{subset}-{split or 'all'}-{number}",
        images=[ctx.image(row[key], key, ("", "images"))] if key else [],
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
        id=f"slake-{row.get('qid', ctx.where.number)}",
        images=[ctx.image(row["img_name"], "img_name", ("", "imgs"))],
        question=str(row["question"]).strip(), answer=str(row["answer"]).strip(),
        modality=normalize_modality(row.get("modality")), source="SLAKE", extra=extra)


SLAKE = Layout("slake", ("img_name", "question", "answer"),
               ("img_id", "qid", "q_lang", "location", "modality", "answer_type", "base_type",
                "content_type", "triple"), _build_slake)


# --- VQA-RAD (original "VQA_RAD Dataset Public.json" or HF image/question/answer) ------------

def _build_vqarad(row: dict, ctx: Context) -> VQARecord:
    extra = check_columns({k: v for k, v in row.items() if k not in ("image", "image_name")},
                          VQARAD, ctx)
    key = "image_name" if row.get("image_name") else "image"
    if not row.get(key):
        raise ctx.where.error("missing_field", "image_name", "required vqarad field is missing",
                              "add 'image_name' (original JSON) or 'image' (HF export)")
    qid = row.get("qid", ctx.where.number)
    return VQARecord(
        id=f"vqarad-{ctx.source_name}-{qid}",
        images=[ctx.image(row[key], key, ("", "images", "VQA_RAD Image Folder"))],
        question=str(row["question"]).strip(), answer=str(row["answer"]).strip(),
        modality=normalize_modality(row.get("modality")), source="VQA-RAD", extra=extra)


VQARAD = Layout("vqarad", ("question", "answer"),
                ("qid", "phrase_type", "qid_linked_id", "image_case_url", "image_organ",
                 "evaluation", "question_rephrase", "question_relation", "question_frame",
                 "question_type", "answer_type", "modality", "split"), _build_vqarad)


# --- R1 (VLM-R1, R1-V, Med-R1, PathVLM-R1: {"image", "problem", "solution"}) ----------------

# An option marker: "A)", "A.", "A:", "(A)", at the start or after a space or separator.
_OPTION_MARK = re.compile(r"(?<![^\s,;:(])\(?([A-J])(?:\)|\.(?!\w\.)|:)[ \t]*")
_OPTIONS_LABEL = re.compile(r"\s*(?:options|choices|answer choices)\s*:?\s*$", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_IMAGE_TOKEN = re.compile(r"<image>\s*")
_TRAILING_JOINER = re.compile(r"[\s,;]+(?:or|and)$")  # "A) benign or B) malignant"


def _chains(marks: list) -> list[list]:
    """Runs of markers lettered A, B, C, ... in order (markers of other letters in between are
    taken as text), one run per marker "A"."""
    chains = []
    for start, mark in enumerate(marks):
        if mark.group(1) != "A":
            continue
        chain = [mark]
        for later in marks[start + 1:]:
            if later.group(1) == LETTERS[len(chain)]:
                chain.append(later)
        chains.append(chain)
    return chains


def parse_problem(problem: str) -> tuple[str, list[str] | None]:
    """Split an R1 ``problem`` into (question, options).

    Options are written inline (``"What is shown? A) CT, B) MRI"``, also ``A.``, ``A:``,
    ``(A)``, with or without a space after the marker) or one per line. The longest run of
    markers lettered A, B, C... is taken (the latest one on a tie); at least two are needed, else
    the question is open (options None). Options written one per line end at their line; the last
    inline option ends at its line too, so an instruction on a later line ("Answer with the
    letter.") is not part of it. The question is the text before the first marker, without a
    trailing "Options:" label."""
    text = _IMAGE_TOKEN.sub("", str(problem)).strip()
    chains = [c for c in _chains(list(_OPTION_MARK.finditer(text))) if len(c) >= 2]
    if not chains:
        return text, None
    chain = max(reversed(chains), key=len)
    options = []
    for mark, following in zip(chain, chain[1:] + [None]):
        end = following.start() if following is not None else len(text)
        body = text[mark.end():end]
        if following is None or "\n" in body.strip():
            body = body.strip().split("\n")[0]
        options.append(_TRAILING_JOINER.sub("", body.strip().rstrip(",;")).strip())
    question = _OPTIONS_LABEL.sub("", text[:chain[0].start()]).strip()
    return question, options


def parse_solution(solution: str, options: list[str] | None) -> tuple[str | None, str]:
    """(answer text, or None when it cannot be resolved; why not). ``solution`` is
    ``"<answer> B </answer>"`` (the last answer tag counts), the letter with its option text
    (``"B) MRI"``), or the text alone. With options the answer must resolve to one of them."""
    tags = _ANSWER_TAG.findall(str(solution))
    given = (tags[-1] if tags else str(solution)).strip()
    if not given:
        return None, "the solution holds an empty answer"
    if not options:
        if _BARE_LETTER.match(given):
            return None, (f"the answer is the letter {given!r} but no options were found in "
                          "the problem")
        return given, ""
    index = option_index(options, given)
    if index is not None:
        return options[index], ""
    bare = _BARE_LETTER.match(given)
    prefixed = _LETTER_PREFIX.match(given)
    letter = bare.group(1) if bare else prefixed.group(1) if prefixed else None
    if letter is None:
        return None, f"answer {given!r} is none of the options {options!r}"
    index = letter_index(letter, len(options))
    if index is None:
        return None, f"letter {letter} names no option (there are {len(options)})"
    text = given[prefixed.end():].strip() if prefixed and not bare else ""
    if text and not _same_text(text, options[index]):
        return None, (f"answer {given!r} gives letter {letter} but its option is "
                      f"{options[index]!r}")
    return options[index], ""


def _build_r1(row: dict, ctx: Context) -> VQARecord:
    row = dict(row)
    key = next((k for k in ("image", "images", "image_path") if k in row), None)
    extra = check_columns({k: v for k, v in row.items() if k != key}, R1, ctx)
    if key is None or row[key] in (None, "", []):
        raise ctx.where.error("missing_field", key or "image", "the record has no image",
                              "add 'image': a path or a list of paths")
    question, options = parse_problem(row["problem"])
    answer, why = parse_solution(row["solution"], options)
    if answer is None:
        raise ctx.where.error("unresolved_answer", "solution", why, "write the solution as "
                              "'<answer> B </answer>' with the options in the problem as "
                              "'A) x, B) y', or as the answer text")
    source = extra.get("source") or extra.get("dataset_name") or extra.get("dataset") or "R1"
    return VQARecord(
        id=str(extra.pop("id", f"r1-{ctx.source_name}-{ctx.where.number}")),
        images=ctx.images(row[key], key), question=question, options=options, answer=answer,
        modality=normalize_modality(extra.get("modality")), source=str(source),
        split=extra.get("split"), extra={**extra, "problem": row["problem"],
                                         "solution": row["solution"]})


R1 = Layout("r1", ("problem", "solution"),
            ("id", "modality", "source", "dataset", "dataset_name", "split",
             "accu_reward_method", "question_type", "answer_type", "data_type", "difficulty"),
            _build_r1)

LAYOUTS = {layout.name: layout for layout in (JSONL, PATHVQA, PMCVQA, OMNIMEDVQA, PATHMMU,
                                              SLAKE, VQARAD, R1)}

# Auto-detection: the first signature (set of keys) a record's keys contain names its layout.
SIGNATURES = (("omnimedvqa", {"question_id", "gt_answer"}), ("slake", {"img_name", "q_lang"}),
              ("r1", {"problem", "solution"}), ("jsonl", {"id", "images"}),
              ("pmcvqa", {"Figure_path", "Question"}), ("vqarad", {"image_name"}),
              ("pathmmu", {"options", "question"}), ("pathvqa", {"image", "question", "answer"}))
_IMAGE_SOURCE = ((re.compile(r"synpic\d"), "vqarad"),            # MedPix names: VQA-RAD
                 (re.compile(r"^(?:train|val|test)_\d"), "pathvqa"))  # train_0422: PathVQA
_NAME_SOURCE = re.compile(r"(path[-_ ]?vqa)|(vqa[-_ ]?rad)", re.IGNORECASE)


def pathvqa_or_vqarad(where: str = "", image_name: str = "") -> tuple[str, bool]:
    """Whose Hugging Face export an ``image, question, answer`` table is: (layout, decided).
    The first image's name decides first (``synpicNNNNN`` VQA-RAD, ``train_0422`` PathVQA),
    then the last of ``path-vqa`` / ``vqa-rad`` (any spelling with ``-``, ``_``, space or
    nothing) in ``where``, the file's path or the dataset's name, the nearest to the file
    winning. Undecided: PathVQA (``decided`` False: the caller should say so)."""
    base = os.path.basename(str(image_name or "").replace("\\", "/"))
    for pattern, layout in _IMAGE_SOURCE:
        if pattern.search(base):
            return layout, True
    matches = list(_NAME_SOURCE.finditer(where or ""))
    if matches:
        return ("vqarad" if matches[-1].group(2) else "pathvqa"), True
    return "pathvqa", False


def layout_from_keys(keys, where: str = "", image_name: str = "") -> str | None:
    """The layout whose signature ``keys`` (a record's or a table's column names) contain, or
    None. ``image, question, answer`` is PathVQA's and VQA-RAD's Hugging Face export alike:
    :func:`pathvqa_or_vqarad` tells them apart from ``where`` (the file's path or the dataset's
    name) and the first record's ``image_name``."""
    keys = set(keys)
    for layout, signature in SIGNATURES:
        if signature <= keys:
            return pathvqa_or_vqarad(where, image_name)[0] if layout == "pathvqa" else layout
    return None
