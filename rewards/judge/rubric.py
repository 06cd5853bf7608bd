"""The deterministic rubric judge behind ``python -m rewards.judge.server --backend rubric``.

It reads the delimited sections of the judge prompt (see :mod:`rewards.judge.prompt`) and scores:

* **integrity** -- the fraction of evaluation criteria the reasoning establishes. A criterion's
  *key terms* are its normalised words minus stop words and negation words; a word matches a
  reasoning word when their first 5 letters agree ("nuclei" ~ "nucleus"). A criterion is
  covered when at least 60 % of its key terms occur in the reasoning and it is not negated.
  With no criteria, three generic steps are checked instead (image features described, options
  eliminated, medical knowledge invoked) and integrity is the fraction present.
* **knowledge** -- ``1 - 0.5 * contradicts_reference - 0.5 * negated_fraction`` when the
  reasoning states something checkable (at least one criterion covered, or, without criteria,
  a medical-knowledge cue), else 0: a chain that asserts nothing shows no correct knowledge
  (without this, an empty or off-topic ``<think>`` would earn half the process reward). Here
  *contradicts_reference* is 1 when the final answer is present and wrong (by
  :class:`rewards.AccuracyReward`) or the reasoning asserts "the answer is X" for another choice,
  and *negated_fraction* is the fraction of criteria stated with a negation ("no", "not",
  "absent", "without", ...) in a sentence that carries the criterion's key terms, when the
  criterion itself has no negation.

Instructions or fake scores inside the completion have no effect: only the criteria, the
reference and the reasoning's words are used.
"""
from __future__ import annotations

import re

from rewards.accuracy import ASSERT_RE, AccuracyReward, resolve_option, resolve_yes_no
from rewards.base import RewardSample
from rewards.judge.prompt import parse_criteria, parse_options, parse_sections
from rewards.text import last_answer, normalize, reasoning_text, words

STEM = 5
COVER_THRESHOLD = 0.6
NEGATION_WINDOW = 3
STOPWORDS = frozenset("""a an the of in on at to for with by from and or as is are was were be been being
this that these those it its there their which who whom what when where why how than then into over
under between within also can may might should would will shall do does did has have had very more most
such some any each other both either neither per via""".split())
NEGATIONS = frozenset("""no not none never without absent absence lack lacks lacking negative cannot
isn aren doesn don wasn weren nor""".split())  # normalize() splits "isn't" into "isn t"
_GENERIC_STEPS = {
    "image features": ("image", "shows", "seen", "visible", "stain", "staining", "cells", "tissue",
                       "microscop", "magnif", "appear", "morpholog", "section"),
    "option elimination": ("rule out", "ruled out", "exclude", "unlikely", "eliminat", "not consistent",
                           "less likely", "instead of"),
    "medical knowledge": ("characteristic", "consistent with", "typical", "hallmark", "diagnos",
                          "associated with", "indicat", "because", "suggest"),
}


def _stems(tokens) -> set[str]:
    return {t[:STEM] for t in tokens}


def key_terms(criterion: str) -> set[str]:
    return _stems(w for w in words(criterion) if w not in STOPWORDS and w not in NEGATIONS)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"[.!?;\n]+", text) if s.strip()]


def _overlap(terms: set[str], text_stems: set[str]) -> float:
    return len(terms & text_stems) / len(terms) if terms else 0.0


def _negated(criterion: str, terms: set[str], reasoning: str) -> bool:
    """A sentence carrying the criterion puts a negation within 3 words before one of its terms."""
    if set(words(criterion)) & NEGATIONS:
        return False  # "no necrosis" as a criterion: negation is the expected content
    for sentence in _sentences(reasoning):
        toks = words(sentence)
        if _overlap(terms, _stems(toks)) < COVER_THRESHOLD:
            continue
        if any(t[:STEM] in terms and set(toks[max(0, i - NEGATION_WINDOW):i]) & NEGATIONS
               for i, t in enumerate(toks)):
            return True
    return False


def _generic_integrity(reasoning: str) -> tuple[float, str]:
    low = " ".join(words(reasoning))
    found = [step for step, cues in _GENERIC_STEPS.items() if any(c in low for c in cues)]
    return len(found) / len(_GENERIC_STEPS), f"no criteria given; generic steps present: {found}"


def _asserts_other(reasoning: str, reference: str, options: list[str] | None) -> bool:
    resolve = (lambda t: resolve_option(t, options)) if options else resolve_yes_no
    ref = resolve(reference)
    if len(ref) != 1:
        return False
    return any(resolve(claim) and resolve(claim) != ref for claim in ASSERT_RE.findall(reasoning))


def grade(question: str, options: list[str] | None, reference: str, criteria: list[str],
          completion: str) -> dict:
    """``{"integrity", "knowledge", "rationale"}`` for one completion (see module docstring)."""
    reasoning = reasoning_text(completion)
    reasoning_stems = _stems(words(reasoning))
    scored = [(c, key_terms(c)) for c in criteria if key_terms(c)]
    negated = [c for c, t in scored if _negated(c, t, reasoning)]
    if scored:
        covered = [c for c, t in scored if c not in negated and _overlap(t, reasoning_stems) >= COVER_THRESHOLD]
        integrity, note = len(covered) / len(scored), f"{len(covered)}/{len(scored)} criteria covered"
        substantive = bool(covered)
    else:
        integrity, note = _generic_integrity(reasoning)
        substantive = "medical knowledge" in note
    sample = RewardSample(question=question, completion=completion, answer=reference, options=options)
    wrong_answer = last_answer(completion) is not None and normalize(last_answer(completion)) != "" \
        and AccuracyReward().score(sample) == 0.0
    contradicts = wrong_answer or _asserts_other(reasoning, reference, options)
    negated_fraction = len(negated) / len(scored) if scored else 0.0
    knowledge = max(0.0, 1.0 - 0.5 * contradicts - 0.5 * negated_fraction) if substantive else 0.0
    rationale = (f"{note}; {len(negated)} criteria negated; "
                 f"{'contradicts' if contradicts else 'consistent with'} the reference answer")
    return {"integrity": round(integrity, 4), "knowledge": round(knowledge, 4), "rationale": rationale}


def grade_prompt(user_text: str) -> dict | None:
    """Grade from a rendered judge prompt; None when the prompt has no delimited sections."""
    sections = parse_sections(user_text)
    if sections is None:
        return None
    return grade(sections["QUESTION"], parse_options(sections["OPTIONS"]), sections["REFERENCE"],
                 parse_criteria(sections["CRITERIA"]), sections["COMPLETION"])
