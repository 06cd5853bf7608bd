"""AccuracyReward: 1.0 when the last ``<answer>`` block matches the reference, else 0.0.

An answer is resolved to the *set of choices it commits to*: option letters for multiple
choice, ``{"yes"}``/``{"no"}`` for yes/no, the normalised text for open questions. It scores 1
only if that set is exactly the reference's single choice. This makes the usual reward hacks
score 0 by construction:

* an empty answer resolves to nothing;
* "A or C", "B, D", "B) adenoma C) carcinoma" resolve to several choices;
* a letter whose text names another option ("B) <text of C>") resolves to both;
* an earlier answer block, or text outside the tags ("... so the answer is C"), that commits
  to a different choice is a contradiction.

Reasoning inside ``<think>`` may discuss any option (elimination is what we want), so it is
never checked for contradictions here; that is the process reward's job.
"""
from __future__ import annotations

import math
import re
import string

from rewards.base import Reward, RewardSample
from rewards.text import answer_blocks, contains_phrase, normalize, outside_tags

LETTERS = string.ascii_uppercase
_PREFIX_RE = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)\s*(?:is|:|=)?\s*)+", re.IGNORECASE)
_SINGLE_LETTER_RE = re.compile(r"\(?([A-Za-z])\)?[.):]?")
_MULTI_LETTER_RE = re.compile(r"\(?[A-Z]\)?(?:\s*(?:,|/|&|\+|(?i:\band\b|\bor\b))\s*\(?[A-Z]\)?)+\.?")
_LETTER_TEXT_RE = re.compile(r"(?:\(([A-Z])\)|([A-Z])\s?[).:\-])\s*(\S.*)", re.DOTALL)
_OTHER_MARKER_RE = re.compile(r"(?:^|\s)\(?([A-Z])[).:](?:\s|$)")
ASSERT_RE = re.compile(
    r"(?:final answer|correct answer|correct option|answer)\s*(?:is|:|=)\s*(?:option\s*)?"
    r"((?-i:\(?[A-Z]\)?)(?![A-Za-z])|yes\b|no\b)", re.IGNORECASE)
_BOTH_POLARITIES_RE = re.compile(r"\b(?:yes\s*(?:or|/|and)\s*no|no\s*(?:or|/|and)\s*yes)\b")
_YES = {"yes", "true", "correct"}
_NO = {"no", "false", "incorrect"}


def _clean(text: str) -> str:
    """Strip markup, quotes and "the answer is" lead-ins around an answer."""
    text = text.strip().strip("*`\"' \n\t")
    text = _PREFIX_RE.sub("", text).strip().strip("*`\"' ")
    return text


def _text_matches(text: str, options: list[str]) -> set[str]:
    """Letters of the options that ``text`` names (exact text first, then whole-phrase)."""
    norm = normalize(text)
    exact = {LETTERS[i] for i, o in enumerate(options[:26]) if normalize(o) and normalize(o) == norm}
    if exact:
        return exact
    found = {i for i, o in enumerate(options[:26]) if contains_phrase(text, o)}
    # "carcinoma in situ" also contains "carcinoma": keep only the longest matches.
    keep = {i for i in found
            if not any(j != i and contains_phrase(options[j], options[i]) and
                       normalize(options[j]) != normalize(options[i]) for j in found)}
    return {LETTERS[i] for i in keep}


def resolve_option(text: str, options: list[str]) -> set[str]:
    """The option letters an answer commits to (empty set: unreadable or empty)."""
    valid = set(LETTERS[:len(options)])
    t = _clean(text)
    if not t:
        return set()
    m = _SINGLE_LETTER_RE.fullmatch(t)
    if m:
        letter = m.group(1).upper()
        return {letter} if letter in valid else set()
    if _MULTI_LETTER_RE.fullmatch(t):
        return set(re.findall(r"(?<![a-z])[A-Z]", t))  # several letters: never one valid choice
    m = _LETTER_TEXT_RE.fullmatch(t)
    if m and (m.group(1) or m.group(2)) in valid:
        letter, rest = m.group(1) or m.group(2), m.group(3)
        chosen = {letter} | {x for x in _OTHER_MARKER_RE.findall(rest) if x in valid}
        named = _text_matches(rest, options)
        if named and letter not in named:
            chosen |= named  # "B) <text of option C>" commits to both: contradiction
        return chosen
    return _text_matches(t, options)


def resolve_yes_no(text: str) -> set[str]:
    """``{"yes"}``, ``{"no"}``, both (hedging), or empty."""
    norm = normalize(_clean(text))
    if _BOTH_POLARITIES_RE.search(norm):
        return {"yes", "no"}
    first = norm.split()[:1]
    if first and first[0] in _YES:
        return {"yes"}
    if first and first[0] in _NO:
        return {"no"}
    return set()


def _as_number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _open_key(text: str) -> str:
    """Comparison key of an open answer: the number if it is one ("3.0" == "3"), else normalised text."""
    cleaned = _clean(text).rstrip(".")
    number = _as_number(cleaned)
    return f"#{number!r}" if number is not None else normalize(cleaned)


class AccuracyReward(Reward):
    """Exact-match accuracy on the last ``<answer>`` block (multiple choice, yes/no, short open).

    Args:
        check_outside_text: treat "the answer is X" outside the tags, and earlier answer blocks,
            that commit to a different choice as a contradiction (score 0).
    """

    name = "accuracy"

    def __init__(self, name: str | None = None, weight: float | None = None,
                 check_outside_text: bool = True):
        super().__init__(name, weight)
        self.check_outside_text = check_outside_text

    def score(self, sample: RewardSample) -> float:
        blocks = answer_blocks(sample.completion)
        if not blocks:
            return 0.0
        kind, resolve = self._resolver(sample)
        chosen = resolve(blocks[-1])
        if len(chosen) != 1:
            return 0.0
        if self.check_outside_text and self._contradicted(sample.completion, blocks, chosen, resolve, kind):
            return 0.0
        return 1.0 if self._matches_reference(chosen, sample, resolve, kind) else 0.0

    def _resolver(self, sample: RewardSample):
        """Pick the answer kind from the sample: options, yes/no reference, or open text."""
        if sample.options:
            return "option", lambda t: resolve_option(t, sample.options)
        if resolve_yes_no(sample.answer) and len(normalize(sample.answer).split()) <= 2:
            return "yesno", resolve_yes_no
        return "open", lambda t: {_open_key(t)} - {""}

    def _matches_reference(self, chosen: set[str], sample: RewardSample, resolve, kind: str) -> bool:
        ref = resolve(sample.answer)
        if len(ref) == 1:
            return chosen == ref
        # Reference not resolvable to an option (free-text reference): compare option text.
        if kind == "option":
            letter = next(iter(chosen))
            idx = LETTERS.index(letter)
            return normalize(sample.options[idx]) == normalize(sample.answer) != ""
        return False

    def _contradicted(self, completion: str, blocks: list[str], chosen: set[str], resolve, kind) -> bool:
        """An earlier answer block or an outside-tags assertion commits to something else."""
        for block in blocks[:-1]:
            other = resolve(block)
            if other and other != chosen:
                return True
        if kind == "open":
            return False
        for claim in ASSERT_RE.findall(outside_tags(completion)):
            other = resolve(claim)
            if other and other != chosen:
                return True
        return False
