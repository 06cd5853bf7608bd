"""Text helpers shared by the rewards and the judge: tag blocks and normalisation.

This module is the one definition of the ``<think>``/``<answer>`` block patterns in ``rewards``:
the format reward, the accuracy reward, the verdict parser and the rubric judge all import them
from here.

Every regex here is linear-time on arbitrary input (no nested quantifiers) because rewards run
on raw policy samples, which can be anything.
"""
from __future__ import annotations

import re
import string
import unicodedata

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_THINK = r"<think>(.*?)</think>"
_ANSWER = r"<answer>(.*?)</answer>"
THINK_RE = re.compile(_THINK, re.DOTALL)
ANSWER_RE = re.compile(_ANSWER, re.DOTALL)
# The whole completion as one think block then one answer block (group 1: think, group 2: answer);
# use with fullmatch. Strict: only whitespace around and between; lenient: any text around.
STRICT_FORMAT_RE = re.compile(r"\s*" + _THINK + r"\s*" + _ANSWER + r"\s*", re.DOTALL)
LENIENT_FORMAT_RE = re.compile(r".*?" + _THINK + r"\s*" + _ANSWER + r".*", re.DOTALL)
_ANY_TAG_RE = re.compile(r"</?(?:think|answer)>")
_ARTICLES = {"a", "an", "the"}
_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def answer_blocks(text: str) -> list[str]:
    """Contents of every closed ``<answer>...</answer>`` block, in order."""
    return ANSWER_RE.findall(text)


def last_answer(text: str) -> str | None:
    """Content of the last closed answer block, or None if there is none."""
    blocks = answer_blocks(text)
    return blocks[-1] if blocks else None


def reasoning_text(text: str) -> str:
    """The reasoning of a completion: its think blocks, or everything but the answer blocks."""
    thinks = THINK_RE.findall(text)
    if thinks:
        return "\n".join(thinks)
    return ANSWER_RE.sub(" ", text)


def outside_tags(text: str) -> str:
    """Text outside all think/answer blocks (stray tags removed)."""
    text = THINK_RE.sub(" ", text)
    text = ANSWER_RE.sub(" ", text)
    return _ANY_TAG_RE.sub(" ", text)


def normalize(text: str) -> str:
    """Lower-case, NFKC, drop punctuation and articles, collapse whitespace ("The  Nucleus." -> "nucleus")."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("*", " ").replace("`", " ").translate(_PUNCT_TABLE)
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def words(text: str) -> list[str]:
    """Normalised word tokens."""
    return normalize(text).split()


def contains_phrase(haystack: str, phrase: str) -> bool:
    """Whole-word containment of normalised ``phrase`` in normalised ``haystack``."""
    h, p = f" {normalize(haystack)} ", normalize(phrase)
    return bool(p) and f" {p} " in h
