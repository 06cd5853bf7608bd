"""The deterministic rubric judge behind ``python -m rewards.judge.server --backend rubric``.

It reads the delimited sections of the judge prompt (see :mod:`rewards.judge.prompt`) and
scores a completion with the PathVLM-R1 authors' rule:

    integrity = clip(1 - 0.4 * missing required steps, 0, 1)
    knowledge = clip(1 - 0.4 * errors, 0, 1)        (0 when nothing checkable is stated correctly)
    reward    = (integrity + knowledge) / 2

**Required steps** are every evaluation criterion plus one *conclusion* step. Without criteria
three generic steps stand in for them (image features described, options eliminated, medical
knowledge invoked; found by cue words) plus the conclusion.

**Checkable criteria** have the form ``<subject> is|are <value>, not <alt>[ or <alt>...]``
("nuclear size is small, not large", "the grade is intermediate, not low or high",
"nuclear staining is dark (hyperchromatic), not pale (vesicular)").

* *Clauses.* The reasoning is split into sentences (``. ! ? ;`` and newlines) and clauses
  (``,`` and the words *and*, *but*). A clause speaks about a criterion when it contains one of
  the subject's words (first 4 letters agree: "nuclei" ~ "nuclear", "mitoses" ~ "mitotic"); a
  clause naming no subject of any criterion inherits the subjects of the previous clause ("the
  nuclei are small and dark", "... the nuclei. They are small"). Values outside a clause about
  their subject count for nothing, so a bare list of value words asserts nothing.
* *Values* are matched by their distinguishing words: the value's words minus stop words and
  minus words it shares with the criterion's other values. A parenthesised synonym is another
  form of the same value ("dark (hyperchromatic)": either word). A value word of n >= 5 letters
  matches words starting with its first max(5, n - 3) letters ("hyperchromatic" ~
  "hyperchromasia", "absent" ~ "absence"); a shorter one matches itself plus
  -s/-es/-r/-er/-st/-est/-ly/-ness ("dark" ~ "darkly", "low" ~ "lower").
* *Negation.* A value is negated when "not / no / without / rather than / instead of / neither
  / nor / excluding ..." stands within 3 words before it, or "excluded / ruled out / eliminated
  / unlikely / absent / not seen|present|identified|..." within 3 words after it -- with no word
  of a *different* value in between ("large not small": only "small" is negated), except that
  "not low or high" negates both. After "whether / if / could / might / perhaps / possibly"
  (within 3 words) a value is hypothetical and ignored. Otherwise it is *asserted*.
* *Existence* criteria (values present / absent) also read a negated subject with no value word
  ("no mitotic figures") as asserting absence, "a nodule is seen" / "there is a nodule" as
  asserting presence, and negating one value as asserting the other.
* The step is **satisfied** when the true value is asserted somewhere, no alternative is
  asserted anywhere, and the true value is negated nowhere.
* **Errors**: each distinct alternative asserted is one error (so "both values" is an error and
  a missing step); negating the true value without asserting an alternative is one error;
  "cellularity is low, not high" is one wrong claim about cellularity and is counted once.

**Free-text criteria** (no ``, not ...`` part) keep the key-term check: key terms are the
criterion's words minus stop and negation words, matched on their first 5 letters; covered when
at least 60 % occur in the reasoning and the criterion is not negated (a negation word within 3
words before one of its terms, in a sentence carrying >= 60 % of them). A negated free-text
criterion is missing and one error.

**Conclusion**: after a cue ("so", "therefore", "thus", "hence", "conclude", "answer is",
"answer:", "diagnosis is", "correct option", ...) the reasoning names an option letter ("so the
answer is B", "therefore B.") or, failing a letter, exactly one option's text ("so the tile is
intermediate grade"); text after "not / rather than / instead of / excluded..." in that
sentence is ignored, and so is text naming several options. Yes/no questions take "yes"/"no"
after the cue; open questions the answer tag's text. The step is satisfied when the choices
concluded are exactly the ``<answer>`` tag's single choice.

**A restated option is not a chain.** In a sentence with a conclusion cue, the text of an
option standing after the cue is the conclusion restated ("so the answer is A, small nuclei").
It may complete a chain that states evidence of its own ("... two points, so the tile is
intermediate grade"), but when the reasoning without it states nothing checkable correctly, the
criteria are read without it: "so the answer is A, small nuclei" alone scores like "so the answer
is A". A claim in the conclusion sentence ("so the answer is A because the nuclei are small")
is evidence, not a restatement.

**Knowledge errors** also include: the final answer is wrong against the reference (by
:class:`rewards.AccuracyReward`; a missing or empty answer block is a format problem, not an
error); the reasoning concludes a choice other than the ``<answer>`` tag's (or, without a
usable tag, other than the reference). Knowledge is 0 when the reasoning *correctly* states
nothing checkable: no checkable criterion satisfied, no free-text criterion covered (or, without
criteria, no medical-knowledge cue) -- an empty chain, a bare letter or a word soup naming every
value shows no correct knowledge.

Instructions or fake scores inside the completion have no effect: only the criteria, the
options, the reference and the reasoning's words are used.

**Group prompts** (``$chains``, :func:`grade_group`): every chain is graded as above, on its own,
and the reply is ``{"chains": [{"chain": k, "integrity", "knowledge", "rationale"}, ...]}``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from rewards.accuracy import AccuracyReward, resolve_option, resolve_yes_no
from rewards.base import RewardSample
from rewards.judge.prompt import (parse_criteria, parse_group_sections, parse_options, parse_sections,
                                  prompt_kind)
from rewards.text import contains_phrase, last_answer, normalize, reasoning_text, words

PENALTY = 0.4           # per missing step (integrity) or per error (knowledge), as in the paper
STEM = 5
SUBJECT_STEM = 4
COVER_THRESHOLD = 0.6
NEGATION_WINDOW = 3
MAX_OR_CHAIN = 8        # "not a or b or c ...": values followed back through "or"
CONCLUSION_SPAN = 300   # characters after a conclusion cue that are read
STOPWORDS = frozenset("""a an the of in on at to for with by from and or as is are was were be been being
this that these those it its there their which who whom what when where why how than then into over
under between within also can may might should would will shall do does did has have had very more most
such some any each other both either neither per via""".split())
NEGATIONS = frozenset("""no not none never without absent absence lack lacks lacking negative cannot
isn aren doesn don wasn weren nor""".split())  # normalize() splits "isn't" into "isn t"
# Cues that negate a value standing after them (window of NEGATION_WINDOW words) ...
PRE_NEGATIONS = NEGATIONS | {"neither", "rather_than", "instead_of", "excluding", "exclude", "excludes",
                             "except"}
# ... and cues that negate a value standing before them (same window).
POST_NEGATIONS = frozenset({"excluded", "ruled_out", "eliminated", "unlikely", "absent", "absence",
                            "lacking"})
# Cues that make a value hypothetical (neither asserted nor negated): "whether the nuclei are large".
HYPOTHETICALS = frozenset({"whether", "if", "unless", "could", "might", "maybe", "perhaps", "possibly"})
OBSERVED = frozenset({"seen", "present", "identified", "visible", "observed", "found", "evident",
                      "noted", "detected", "shown"})
# Words that state existence in a clause naming the subject ("a nodule is seen", "there is a nodule").
EXISTENCE_CUES = OBSERVED | {"show", "shows", "showing", "contains", "contain", "containing", "there"}
_VALUE_SUFFIXES = ("", "s", "es", "r", "er", "st", "est", "ly", "ness")
_BIGRAMS = ((re.compile(r"\brather than\b"), "rather_than"), (re.compile(r"\binstead of\b"), "instead_of"),
            (re.compile(r"\brul(?:e|ed|es|ing) out\b"), "ruled_out"))
_SENTENCE_RE = re.compile(r"[.!?;\n]+")
_CLAUSE_RE = re.compile(r",|\band\b|\bbut\b", re.IGNORECASE)
_CHECKABLE_RE = re.compile(r"\s*(?P<subject>\S.*?)\s+(?P<verb>is|are)\s+(?P<value>[^,]*?\S)\s*,\s*not\s+"
                           r"(?P<alts>\S.*?)[\s.]*", re.IGNORECASE | re.DOTALL)
_ALT_SPLIT_RE = re.compile(r"\s*,\s*(?:or\s+|nor\s+)?|\s+(?:or|nor)\s+", re.IGNORECASE)
_PAREN_RE = re.compile(r"\(([^()]*)\)")
_CUE_RE = re.compile(r"\b(?:so|therefore|thus|hence|consequently|conclud\w*)\b|"
                     r"\b(?:answer|diagnosis|conclusion)\s*(?:is\b|:|=|(?:would|must|should)\s+be\b)|"
                     r"\b(?:correct|best|right|final)\s+(?:option|choice)\b", re.IGNORECASE)
_CUT_RE = re.compile(r"\b(?:not|rather\s+than|instead\s+of|never|nor|excluding|except|excluded|unlikely|"
                     r"rul(?:e|ed|es)\s+out)\b|n't\b", re.IGNORECASE)
_LETTER_RE = re.compile(
    r"(?i:[\s,:]*(?:(?:the|my|our)\s+)?(?:(?:final|correct|best|right|most\s+likely)\s+)?"
    r"(?:answer|option|choice)?\s*(?:is|would\s+be|must\s+be|should\s+be|:|=)?\s*(?:option\s+|choice\s+)?)"
    r"\(?([A-Z])\)?(?=\s*(?:[.,;:!?()\-]|$)|\s+(?i:because|since|as|given|which|here)\b)")
_YES_NO_RE = re.compile(r"(?i:[\s,:]*(?:(?:the|my)\s+)?(?:(?:final|correct)\s+)?(?:answer\s*)?"
                        r"(?:is|would\s+be|:|=)?\s*)(yes|no)\b", re.IGNORECASE)
_GENERIC_STEPS = {
    "image features": ("image", "shows", "seen", "visible", "stain", "staining", "cells", "tissue",
                       "microscop", "magnif", "appear", "morpholog", "section"),
    "option elimination": ("rule out", "ruled out", "exclude", "unlikely", "eliminat", "not consistent",
                           "less likely", "instead of"),
    "medical knowledge": ("characteristic", "consistent with", "typical", "hallmark", "diagnos",
                          "associated with", "indicat", "because", "suggest"),
}


# --- criteria ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkable:
    """A criterion ``<subject> <verb> <value>, not <alternatives...>``; ``values[0]`` is true."""

    subject: str
    verb: str
    value: str
    alternatives: tuple[str, ...]

    @property
    def values(self) -> tuple[str, ...]:
        return (self.value,) + self.alternatives


def parse_checkable(criterion: str) -> Checkable | None:
    """The checkable form of ``criterion``, or None for a free-text criterion."""
    m = _CHECKABLE_RE.fullmatch(criterion)
    if m is None:
        return None
    alts = tuple(a.strip() for a in _ALT_SPLIT_RE.split(m.group("alts")) if a.strip())
    if not alts:
        return None
    return Checkable(m.group("subject").strip(), m.group("verb").lower(), m.group("value").strip(), alts)


def _vstem(word: str) -> str:
    return word[:max(STEM, len(word) - 3)] if len(word) >= STEM else word


def _value_match(token: str, word: str) -> bool:
    if len(word) >= STEM:
        return token.startswith(_vstem(word))
    return token.startswith(word) and token[len(word):] in _VALUE_SUFFIXES


def _forms(value: str) -> list[list[str]]:
    """A value's forms: the text outside parentheses and each parenthesised synonym."""
    texts = [_PAREN_RE.sub(" ", value)] + _PAREN_RE.findall(value)
    return [[w for w in words(t) if w not in STOPWORDS] for t in texts]


@dataclass
class _Matcher:
    """A checkable criterion compiled for matching: subject terms and each value's forms."""

    criterion: str
    check: Checkable
    subject_terms: frozenset[str]
    forms: list[list[list[str]]]   # forms[value][form] = distinguishing words
    present: int | None = None     # value indices of an existence criterion (present / absent)
    absent: int | None = None

    @classmethod
    def build(cls, criterion: str) -> "_Matcher | None":
        check = parse_checkable(criterion)
        if check is None:
            return None
        raw = [_forms(v) for v in check.values]
        stems = [{_vstem(w) for form in value for w in form} for value in raw]
        forms = []
        for i, value in enumerate(raw):
            others = set().union(*(s for j, s in enumerate(stems) if j != i))
            kept = [[w for w in form if _vstem(w) not in others] for form in value]
            kept = [f for f in kept if f]
            if not kept:
                return None  # a value with no distinguishing word cannot be checked
            forms.append(kept)
        terms = frozenset(w[:SUBJECT_STEM] for w in words(check.subject)
                          if w not in STOPWORDS and w not in NEGATIONS)
        matcher = cls(criterion, check, terms, forms)
        flat = [{w for form in value for w in form} for value in forms]
        if len(forms) == 2:
            for i, value_words in enumerate(flat):
                if any(_value_match("present", w) for w in value_words):
                    matcher.present = i
                elif any(_value_match("absent", w) for w in value_words):
                    matcher.absent = i
        if matcher.present is None or matcher.absent is None:
            matcher.present = matcher.absent = None
        return matcher

    @property
    def existence(self) -> bool:
        return self.present is not None

    def mentions_subject(self, tokens: list[str]) -> bool:
        return any(t[:SUBJECT_STEM] in self.subject_terms for t in tokens)

    def value_of(self, token: str) -> int | None:
        for i, value in enumerate(self.forms):
            if any(_value_match(token, w) for form in value for w in form):
                return i
        return None


@dataclass
class _Finding:
    """What the reasoning says about one checkable criterion."""

    asserted: list[bool]
    negated: list[bool]


def _clauses(reasoning: str) -> list[list[list[str]]]:
    """Sentences of clauses of tokens (bigram cues such as "rather than" joined into one token)."""
    out = []
    for sentence in _SENTENCE_RE.split(reasoning):
        clauses = []
        for clause in _CLAUSE_RE.split(sentence):
            text = normalize(clause)
            for pattern, joined in _BIGRAMS:
                text = pattern.sub(joined, text)
            if text:
                clauses.append(text.split())
        if clauses:
            out.append(clauses)
    return out


def _pre_negated(tokens: list[str], vals: list[int | None], pos: int, own: int | None,
                 cues: frozenset[str] = PRE_NEGATIONS) -> bool:
    """A cue within NEGATION_WINDOW words before ``pos`` and no other value between;
    "not low or high": a value joined by "or"/"nor" to a negated value is negated too (followed
    back at most MAX_OR_CHAIN values, so the cost stays linear)."""
    for _ in range(MAX_OR_CHAIN):
        for j in range(pos - 1, max(-1, pos - 1 - NEGATION_WINDOW), -1):
            if vals[j] is not None and vals[j] != own:
                if tokens[j + 1] not in ("or", "nor"):
                    return False  # "not small large": the negation belongs to "small"
                pos, own = j, vals[j]
                break
            if vals[j] is None and tokens[j] in cues:
                return True
        else:
            return False
    return False


def _post_negated(tokens: list[str], vals: list[int | None], pos: int, own: int) -> bool:
    """An exclusion cue ("excluded", "not seen", ...) within NEGATION_WINDOW words after ``pos``."""
    for j in range(pos + 1, min(len(tokens), pos + 1 + NEGATION_WINDOW)):
        if vals[j] is not None and vals[j] != own:
            return False
        if vals[j] is not None:
            continue
        if tokens[j] in POST_NEGATIONS:
            return True
        if tokens[j] in ("not", "no", "never") and j + 1 < len(tokens) and vals[j + 1] is None \
                and tokens[j + 1] in OBSERVED:
            return True
    return False


def _read_clause(m: _Matcher, tokens: list[str], found: _Finding) -> None:
    vals = [m.value_of(t) for t in tokens]
    if m.existence and all(v is None for v in vals):
        # "no mitotic figures (are seen)" asserts absence; "mitoses are (not) seen" one or the other
        if any(t[:SUBJECT_STEM] in m.subject_terms and _pre_negated(tokens, vals, i, None)
               for i, t in enumerate(tokens)):
            found.asserted[m.absent] = True
            return
        for i, t in enumerate(tokens):
            if t in EXISTENCE_CUES and m.mentions_subject(tokens):
                found.asserted[m.absent if _pre_negated(tokens, vals, i, None) else m.present] = True
        return
    for i, value in enumerate(m.forms):
        for form in value:
            positions = []
            for w in form:
                hits = [p for p, t in enumerate(tokens) if vals[p] == i and _value_match(t, w)]
                if not hits:
                    break
                positions.append(hits)
            else:
                first, last = min(h[0] for h in positions), max(h[0] for h in positions)
                if _pre_negated(tokens, vals, first, i, HYPOTHETICALS):
                    continue
                if _pre_negated(tokens, vals, first, i) or _post_negated(tokens, vals, last, i):
                    found.negated[i] = True
                else:
                    found.asserted[i] = True


def _read_checkables(matchers: list[_Matcher], reasoning: str) -> list[_Finding]:
    findings = [_Finding([False] * len(m.forms), [False] * len(m.forms)) for m in matchers]
    previous: list[int] = []
    for sentence in _clauses(reasoning):
        for tokens in sentence:
            about = [k for k, m in enumerate(matchers) if not m.subject_terms or m.mentions_subject(tokens)]
            if not any(m.mentions_subject(tokens) for m in matchers):
                about = sorted(set(about) | set(previous))  # "... and dark": same subject as before
            for k in about:
                _read_clause(matchers[k], tokens, findings[k])
            previous = about
    for m, f in zip(matchers, findings):
        if m.existence:  # "not present" asserts absence and vice versa
            for a, b in ((m.present, m.absent), (m.absent, m.present)):
                if f.negated[a]:
                    f.asserted[b] = True
    return findings


def _judge_checkable(m: _Matcher, f: _Finding) -> tuple[bool, list[str], str]:
    """(satisfied, one note per error, why the step is missing) for one checkable criterion."""
    wrong = [m.check.values[i] for i in range(1, len(f.asserted)) if f.asserted[i]]
    negated_true = f.negated[0] and not m.existence
    satisfied = f.asserted[0] and not wrong and not negated_true
    errors = [f"asserts {alt}" for alt in wrong] or ([f"negates {m.check.value}"] if negated_true else [])
    if wrong and f.asserted[0]:
        why = f"asserts both {m.check.value} and {' and '.join(wrong)}"
    else:
        why = "; ".join(errors) or "not stated"
    return satisfied, errors, why


def claims(criteria: list[str], reasoning: str) -> dict[str, tuple[str, str]]:
    """What ``reasoning`` claims about each checkable criterion, read as the rubric reads it:
    ``{subject: (true value, claim)}`` where the claim is the one value asserted, ``"both"`` when
    more than one is, and ``"none"`` when none is (a negated value alone asserts nothing, except
    for present/absent criteria). Free-text criteria are left out."""
    matchers = [m for m in (_Matcher.build(c) for c in criteria) if m is not None]
    out = {}
    for m, f in zip(matchers, _read_checkables(matchers, reasoning)):
        said = [m.check.values[i] for i, a in enumerate(f.asserted) if a]
        claim = said[0] if len(said) == 1 else "both" if said else "none"
        out[re.sub(r"^(the|a|an) ", "", m.check.subject.lower())] = (m.check.value, claim)
    return out


# --- free-text criteria ----------------------------------------------------------------------

def _stems(tokens) -> set[str]:
    return {t[:STEM] for t in tokens}


def key_terms(criterion: str) -> set[str]:
    return _stems(w for w in words(criterion) if w not in STOPWORDS and w not in NEGATIONS)


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_RE.split(text) if s.strip()]


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


def _generic_steps(reasoning: str) -> list[str]:
    low = " ".join(words(reasoning))
    return [step for step, cues in _GENERIC_STEPS.items() if any(c in low for c in cues)]


# --- conclusion ------------------------------------------------------------------------------

def evidence_text(reasoning: str, options: list[str] | None) -> str:
    """``reasoning`` with every option's text removed from the part of each sentence that follows
    a conclusion cue (the chosen option restated is the conclusion, not evidence for it)."""
    if not options:
        return reasoning
    phrases = sorted((words(o) for o in options if words(o)), key=len, reverse=True)  # longest first
    out = []
    for sentence in re.split(r"(?<=[.!?;\n])", reasoning):
        cue = _CUE_RE.search(sentence)
        if cue is None:
            out.append(sentence)
            continue
        tokens = words(sentence[cue.start():])
        for phrase in phrases:
            n, i, kept = len(phrase), 0, []
            while i < len(tokens):
                if tokens[i:i + n] == phrase:
                    i += n
                else:
                    kept.append(tokens[i])
                    i += 1
            tokens = kept
        out.append(sentence[:cue.start()] + " ".join(tokens) + ". ")
    return "".join(out)


def _kind(reference: str, options: list[str] | None) -> str:
    """The answer kind, as :class:`rewards.AccuracyReward` decides it."""
    if options:
        return "option"
    if resolve_yes_no(reference) and len(normalize(reference).split()) <= 2:
        return "yesno"
    return "open"


def _resolve(kind: str, text: str, options: list[str] | None) -> set[str]:
    if kind == "option":
        return resolve_option(text, options)
    if kind == "yesno":
        return resolve_yes_no(text)
    return {normalize(text)} - {""}


def concluded(reasoning: str, options: list[str] | None, kind: str, tag: str | None = None) -> set[str]:
    """The choices the reasoning concludes (option letters, "yes"/"no", or the tag's text)."""
    claims: set[str] = set()
    seen: dict[str, set[str]] = {}
    span = max([CONCLUSION_SPAN] + [2 * len(o) + 40 for o in options or []] + [2 * len(tag or "") + 40])
    for sentence in _SENTENCE_RE.split(reasoning):
        for cue in _CUE_RE.finditer(sentence):
            tail = sentence[cue.end():cue.end() + span]
            if kind == "yesno":
                m = _YES_NO_RE.match(tail)
                if m:
                    claims.add(m.group(1).lower())
                continue
            cut = _CUT_RE.search(tail)
            tail = tail[:cut.start()] if cut else tail
            if tail not in seen:
                seen[tail] = _tail_claims(tail, options, kind, tag)
            claims |= seen[tail]
    return claims


def _tail_claims(tail: str, options: list[str] | None, kind: str, tag: str | None) -> set[str]:
    if kind == "option":
        m = _LETTER_RE.match(tail)
        if m:
            return {m.group(1)} if ord(m.group(1)) - ord("A") < len(options) else set()
        named = resolve_option(tail, options) if tail.strip() else set()
        return named if len(named) == 1 else set()  # text naming several options commits to none
    return {normalize(tag)} if tag and contains_phrase(tail, tag) else set()


# --- grading ---------------------------------------------------------------------------------

def _read_criteria(criteria: list[str], reasoning: str) -> tuple[list[str], list[str], bool]:
    """(missing steps, errors, whether anything checkable is stated correctly) for the criteria."""
    missing: list[str] = []
    errors: list[str] = []
    substantive = False
    matchers = [_Matcher.build(c) for c in criteria]
    checkable = [m for m in matchers if m is not None]
    for m, f in zip(checkable, _read_checkables(checkable, reasoning)):
        ok, notes, why = _judge_checkable(m, f)
        substantive |= ok
        if not ok:
            missing.append(f"'{m.criterion}' ({why})")
        errors += [f"'{m.check.subject}' {note}" for note in notes]
    reasoning_stems = _stems(words(reasoning))
    for c, m in zip(criteria, matchers):
        if m is not None:
            continue
        terms = key_terms(c)
        if _negated(c, terms, reasoning):
            missing.append(f"'{c}' (negated)")
            errors.append(f"'{c}' negated")
        elif _overlap(terms, reasoning_stems) >= COVER_THRESHOLD:
            substantive = True
        else:
            missing.append(f"'{c}'")
    return missing, errors, substantive


def grade(question: str, options: list[str] | None, reference: str, criteria: list[str],
          completion: str) -> dict:
    """``{"integrity", "knowledge", "rationale"}`` for one completion (see module docstring)."""
    reasoning = reasoning_text(completion)
    criteria = [c for c in criteria if key_terms(c)]
    missing, errors, substantive = _read_criteria(criteria, reasoning)
    evidence = evidence_text(reasoning, options)
    if evidence != reasoning:  # the chosen option restated may complete a chain, never be all of it
        alone = _read_criteria(criteria, evidence)
        if not alone[2]:
            missing, errors, substantive = alone
    if not criteria:
        present = _generic_steps(reasoning)
        missing += [step for step in _GENERIC_STEPS if step not in present]
        substantive = "medical knowledge" in present

    kind = _kind(reference, options)
    tag_text = last_answer(completion)
    tag = _resolve(kind, tag_text, options) if tag_text is not None else set()
    claims = concluded(reasoning, options, kind, tag_text)
    if not (len(tag) == 1 and claims == tag):
        missing.append("conclusion")
    sample = RewardSample(question=question, completion=completion, answer=reference, options=options)
    if tag_text is not None and tag_text.strip() and AccuracyReward().score(sample) == 0.0:
        errors.append("final answer contradicts the reference")
    expected = tag if len(tag) == 1 else _resolve(kind, reference, options)
    if len(expected) == 1 and claims - expected:
        errors.append(f"reasoning concludes {'/'.join(sorted(claims - expected))}, "
                      f"not the answer {next(iter(expected))}")

    integrity = max(0.0, 1.0 - PENALTY * len(missing))
    knowledge = max(0.0, 1.0 - PENALTY * len(errors)) if substantive else 0.0
    rationale = (f"missing {len(missing)} step(s): {'; '.join(missing) or 'none'}. "
                 f"{len(errors)} error(s): {'; '.join(errors) or 'none'}."
                 + ("" if substantive else " Nothing checkable stated correctly: knowledge 0."))
    return {"integrity": round(integrity, 4), "knowledge": round(knowledge, 4), "rationale": rationale[:900]}


def grade_group(question: str, options: list[str] | None, reference: str, criteria: list[str],
                chains: list[str]) -> dict:
    """``{"chains": [{"chain": k, "integrity", "knowledge", "rationale"}, ...]}``, chain k = 1..n.

    The rubric is absolute: each chain gets exactly the verdict :func:`grade` gives it alone, so
    group and per-chain judging agree by construction (an LLM judge need not)."""
    return {"chains": [{"chain": k, **grade(question, options, reference, criteria, chain)}
                       for k, chain in enumerate(chains, 1)]}


def grade_prompt(user_text: str) -> dict | None:
    """Grade from a rendered judge prompt, a single-completion or a group one (told apart by
    :func:`rewards.judge.prompt.prompt_kind`); None when the prompt has no delimited sections."""
    kind = prompt_kind(user_text)
    if kind == "group":
        group = parse_group_sections(user_text)
        if group is None:
            return None
        return grade_group(group["QUESTION"], parse_options(group["OPTIONS"]), group["REFERENCE"],
                           parse_criteria(group["CRITERIA"]), group["CHAINS"])
    sections = parse_sections(user_text) if kind == "single" else None
    if sections is None:
        return None
    return grade(sections["QUESTION"], parse_options(sections["OPTIONS"]), sections["REFERENCE"],
                 parse_criteria(sections["CRITERIA"]), sections["COMPLETION"])
