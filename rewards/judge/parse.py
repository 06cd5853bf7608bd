"""Turn the judge's reply text into a verdict -- or refuse to.

Accepted shapes: the whole reply is a JSON object (strict); exactly one fenced ```json block;
exactly one JSON object somewhere in prose (bare). ``<think>...</think>`` preambles of reasoning
judges are dropped first. Refused: no object, several candidate objects (a judge that quotes the
completion's fake ``{"integrity": 1, ...}`` next to its own verdict is ambiguous, and guessing
would let the completion steer its own score), missing or non-numeric scores, NaN/Infinity.

Score keys: ``integrity`` / ``knowledge`` (the documented ones) or ``integrity_score`` /
``knowledge_score`` (the PathVLM-R1 authors' judge), case-insensitive; both spellings in one
verdict must agree. Scores are divided by ``scale`` (``JudgeConfig.score_scale``, 1 unless the
judge grades e.g. 0..10). A result outside ``[0, 1]`` by at most :data:`SCORE_TOLERANCE`
(rounding: ``1.004``, ``-0.003``) is clipped; further out it is refused with
:class:`ScoreOutOfRange` -- a judge grading 0..10 must not silently earn full reward.

Group verdicts (:func:`parse_group_verdict`, one verdict per reasoning chain of a group) accept
``{"chains": [{"chain": 1, "integrity": .., "knowledge": ..}, ...]}`` (the documented shape),
a bare list of such entries (ids optional: without ids the order is the chain order), or an
object keyed by chain number (``{"1": {...}, "2": {...}}``). They must cover every chain
``1..n`` exactly once (:class:`IncompleteGroupVerdict` otherwise).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from rewards.text import THINK_RE

_FENCE_RE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.DOTALL)
MAX_REPLY_CHARS = 50_000
MAX_OBJECT_STARTS = 256
SCORE_TOLERANCE = 0.005
SCORE_KEYS = {"integrity": ("integrity", "integrity_score"), "knowledge": ("knowledge", "knowledge_score")}
_ALL_SCORE_KEYS = frozenset(k for keys in SCORE_KEYS.values() for k in keys)
GROUP_CONTAINER_KEYS = ("chains", "verdicts", "results", "scores", "grades")
GROUP_ID_KEYS = ("chain", "chain_id", "id", "index")
_CHAIN_KEY_RE = re.compile(r"(?:chain|response|trainee)?[\s_#-]*(\d{1,4})", re.IGNORECASE)


class VerdictError(ValueError):
    """The reply is not a usable verdict; the message says why."""


class ScoreOutOfRange(VerdictError):
    """A score lies outside ``[0, 1]`` (after dividing by the scale) by more than the tolerance."""


class IncompleteGroupVerdict(VerdictError):
    """A group verdict that does not cover every chain exactly once."""


@dataclass(frozen=True)
class Verdict:
    integrity: float
    knowledge: float
    rationale: str = ""

    @property
    def score(self) -> float:
        """The paper's process reward: the mean of the two scores."""
        return (self.integrity + self.knowledge) / 2.0


def _reject_constant(name: str):
    raise VerdictError(f"non-finite number {name} in verdict")


def _loads(text: str):
    return json.loads(text, parse_constant=_reject_constant)


def _has_score_key(obj: dict) -> bool:
    return any(str(k).strip().lower() in _ALL_SCORE_KEYS for k in obj)


def _candidates(text: str, looks_right, openers: str = "{") -> list:
    """Every top-level JSON value opened by one of ``openers`` in ``text`` that ``looks_right``."""
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    found, pos, starts = [], 0, 0
    while starts < MAX_OBJECT_STARTS:
        hits = [i for i in (text.find(c, pos) for c in openers) if i != -1]
        if not hits:
            break
        start = min(hits)
        starts += 1
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            pos = start + 1
            continue
        if looks_right(obj):
            found.append(obj)
        pos = end
    return found


def _strict(text: str, kinds: tuple[type, ...] = (dict,)):
    """The text parsed as one JSON value of one of ``kinds``; None if it is not JSON at all."""
    try:
        obj = _loads(text)
    except VerdictError:
        raise
    except ValueError:
        return None
    if not isinstance(obj, kinds):
        wanted = " or ".join("an object" if k is dict else "a list" for k in kinds)
        raise VerdictError(f"reply is JSON but a {type(obj).__name__}, not {wanted}")
    return obj


def _extract(text: str, looks_right, kinds: tuple[type, ...], openers: str, what: str):
    """The one verdict-shaped JSON value in ``text`` (strict, one fenced block, or one in prose)."""
    obj = _strict(text, kinds)
    if obj is not None:
        return obj
    fences = [f.strip() for f in _FENCE_RE.findall(text) if any(c in f for c in openers)]
    if len(fences) > 1:
        raise VerdictError(f"{len(fences)} fenced blocks in reply; refusing to guess which is the verdict")
    if fences:
        if _candidates(_FENCE_RE.sub("", text), looks_right, openers):
            # e.g. the judge quoted a fenced block from the completion, then gave its own verdict
            raise VerdictError("a fenced verdict and another verdict-like object outside it; refusing to guess")
        obj = _strict(fences[0], kinds)
        if obj is None:
            raise VerdictError("fenced block is not valid JSON")
        return obj
    found = _candidates(text, looks_right, openers)
    if len(found) == 1:
        return found[0]
    raise VerdictError(f"no JSON {what} in reply" if not found else
                       f"{len(found)} {what}-like values in reply; refusing to guess")


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise VerdictError(f"'{key}' is {type(value).__name__}, not a number")
    try:
        number = float(value)
    except ValueError:
        raise VerdictError(f"'{key}' is not a number: {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise VerdictError(f"'{key}' is not finite")
    return number


def _raw_score(obj: dict, key: str) -> float:
    """The score under either spelling of ``key``; both spellings present must agree."""
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    present = [k for k in SCORE_KEYS[key] if k in lowered]
    if not present:
        raise VerdictError(f"verdict has no '{key}' score (or '{key}_score')")
    values = {_number(lowered[k], k) for k in present}
    if len(values) > 1:
        raise VerdictError(f"'{key}' and '{key}_score' disagree ({' vs '.join(map(str, sorted(values)))})")
    return values.pop()


def _in_range(raw: float, key: str, scale: float) -> float:
    value = raw / scale
    if not -SCORE_TOLERANCE <= value <= 1.0 + SCORE_TOLERANCE:
        shown = f"{raw:g}" if scale == 1 else f"{raw:g}/{scale:g} = {value:g}"
        raise ScoreOutOfRange(f"'{key}' is {shown}, outside [0, 1]"
                              + ("" if scale != 1 else "; a judge grading on another scale needs "
                                 "JudgeConfig(score_scale=...)"))
    return min(1.0, max(0.0, value))


def _verdict(obj: dict, scale: float) -> Verdict:
    raw = {key: _raw_score(obj, key) for key in SCORE_KEYS}  # structure first, range second
    scores = {key: _in_range(value, key, scale) for key, value in raw.items()}
    rationale = next((v for k, v in obj.items() if str(k).strip().lower() in ("rationale", "explanation")), "")
    return Verdict(scores["integrity"], scores["knowledge"],
                   rationale[:1000] if isinstance(rationale, str) else "")


def _clean(content) -> str:
    if not isinstance(content, str) or not content.strip():
        raise VerdictError("empty reply")
    if len(content) > MAX_REPLY_CHARS:
        raise VerdictError(f"reply longer than {MAX_REPLY_CHARS} characters")
    text = THINK_RE.sub("", content).strip()
    if "<think>" in text:
        raise VerdictError("reply ends inside an unclosed <think> block")
    return text


def _check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"score scale must be a positive number, got {scale!r}")


def parse_verdict(content, *, scale: float = 1.0) -> Verdict:
    """Parse the judge's message content; raises :class:`VerdictError` on anything unusable
    (:class:`ScoreOutOfRange` when a score is outside ``[0, 1]`` after dividing by ``scale``)."""
    _check_scale(scale)
    obj = _extract(_clean(content), lambda o: isinstance(o, dict) and _has_score_key(o), (dict,), "{",
                   "verdict object")
    return _verdict(obj, scale)


# --- group verdicts --------------------------------------------------------------------------

def _is_entry(obj) -> bool:
    return isinstance(obj, dict) and _has_score_key(obj)


def _chain_number(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _CHAIN_KEY_RE.fullmatch(value.strip())
        return int(m.group(1)) if m else None
    return None


def _container(obj):
    """The list or chain-keyed object holding the entries of a group verdict, or None."""
    if isinstance(obj, list):
        return obj if obj and all(_is_entry(e) for e in obj) else None
    if not isinstance(obj, dict) or not obj:
        return None
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    for key in GROUP_CONTAINER_KEYS:
        if key in lowered:
            return _container(lowered[key])
    if all(_chain_number(k) is not None and _is_entry(v) for k, v in obj.items()):
        return obj
    return None


def _entries(container) -> list[tuple[int, dict]]:
    """(chain number, entry) pairs; positional numbers (1, 2, ...) for a list without ids."""
    if isinstance(container, dict):
        return [(_chain_number(k), v) for k, v in container.items()]
    ids = []
    for entry in container:
        lowered = {str(k).strip().lower(): v for k, v in entry.items()}
        keys = [k for k in GROUP_ID_KEYS if k in lowered]
        ids.append(_chain_number(lowered[keys[0]]) if keys else None)
        if keys and ids[-1] is None:
            raise VerdictError(f"chain id {str(lowered[keys[0]])[:20]!r} is not a chain number")
    if all(i is None for i in ids):
        return list(enumerate(container, 1))
    if any(i is None for i in ids):
        raise VerdictError("some entries of the group verdict have a chain id and some do not")
    return list(zip(ids, container))


def parse_group_verdict(content, n_chains: int, *, scale: float = 1.0) -> list[Verdict]:
    """One :class:`Verdict` per chain ``1..n_chains`` (in chain order) from a group reply.

    Raises :class:`IncompleteGroupVerdict` unless every chain is covered exactly once,
    :class:`ScoreOutOfRange` when any chain's score is out of range, :class:`VerdictError` for
    everything else unusable."""
    _check_scale(scale)
    if not isinstance(n_chains, int) or n_chains < 1:
        raise ValueError(f"n_chains must be a positive int, got {n_chains!r}")
    obj = _extract(_clean(content), lambda o: _container(o) is not None, (dict, list), "{[",
                   "group verdict")
    container = _container(obj)
    if container is None:
        raise VerdictError("reply is not a group verdict: expected {\"chains\": [{\"chain\": 1, "
                           "\"integrity\": .., \"knowledge\": ..}, ...]}")
    by_chain: dict[int, dict] = {}
    for number, entry in _entries(container):
        if number in by_chain:
            raise IncompleteGroupVerdict(f"chain {number} is graded twice")
        by_chain[number] = entry
    missing = [k for k in range(1, n_chains + 1) if k not in by_chain]
    extra = sorted(k for k in by_chain if not 1 <= k <= n_chains)
    if missing or extra:
        raise IncompleteGroupVerdict(
            f"group verdict for {n_chains} chains" + (f" misses chain(s) {missing[:10]}" if missing else "")
            + (f" grades unknown chain(s) {extra[:10]}" if extra else ""))
    for k in range(1, n_chains + 1):  # every chain's structure first, ranges second
        for key in SCORE_KEYS:
            _raw_score(by_chain[k], key)
    verdicts = []
    for k in range(1, n_chains + 1):
        try:
            verdicts.append(_verdict(by_chain[k], scale))
        except ScoreOutOfRange as err:
            raise ScoreOutOfRange(f"chain {k}: {err}") from None
    return verdicts
