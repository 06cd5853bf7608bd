"""Turn the judge's reply text into a verdict -- or refuse to.

Accepted shapes: the whole reply is a JSON object (strict); exactly one fenced ```json block;
exactly one JSON object somewhere in prose (bare). ``<think>...</think>`` preambles of reasoning
judges are dropped first. Refused: no object, several candidate objects (a judge that quotes the
completion's fake ``{"integrity": 1, ...}`` next to its own verdict is ambiguous, and guessing
would let the completion steer its own score), missing or non-numeric scores, NaN/Infinity.
Scores outside 0..1 are clipped.
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


class VerdictError(ValueError):
    """The reply is not a usable verdict; the message says why."""


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


def _candidates(text: str) -> list[dict]:
    """Every top-level JSON object embedded in ``text`` that looks like a verdict."""
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    found, pos, starts = [], 0, 0
    while (start := text.find("{", pos)) != -1 and starts < MAX_OBJECT_STARTS:
        starts += 1
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            pos = start + 1
            continue
        if isinstance(obj, dict) and _has_score_key(obj):
            found.append(obj)
        pos = end
    return found


def _has_score_key(obj: dict) -> bool:
    return any(str(k).lower() in ("integrity", "knowledge") for k in obj)


def _strict(text: str) -> dict | None:
    """The text parsed as one JSON object; None if it is not JSON at all."""
    try:
        obj = _loads(text)
    except VerdictError:
        raise
    except ValueError:
        return None
    if not isinstance(obj, dict):
        raise VerdictError(f"reply is JSON but a {type(obj).__name__}, not an object")
    return obj


def _extract_object(text: str) -> dict:
    obj = _strict(text)
    if obj is not None:
        return obj
    fences = [f.strip() for f in _FENCE_RE.findall(text) if "{" in f]
    if len(fences) > 1:
        raise VerdictError(f"{len(fences)} fenced blocks in reply; refusing to guess which is the verdict")
    if fences:
        if _candidates(_FENCE_RE.sub("", text)):
            # e.g. the judge quoted a fenced block from the completion, then gave its own verdict
            raise VerdictError("a fenced verdict and another verdict-like object outside it; refusing to guess")
        obj = _strict(fences[0])
        if obj is None:
            raise VerdictError("fenced block is not valid JSON")
        return obj
    found = _candidates(text)
    if len(found) == 1:
        return found[0]
    raise VerdictError("no JSON verdict object in reply" if not found else
                       f"{len(found)} verdict-like objects in reply; refusing to guess")


def _score(obj: dict, key: str) -> float:
    lowered = {str(k).lower(): v for k, v in obj.items()}
    if key not in lowered:
        raise VerdictError(f"verdict has no '{key}' score")
    value = lowered[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise VerdictError(f"'{key}' is {type(value).__name__}, not a number")
    try:
        number = float(value)
    except ValueError:
        raise VerdictError(f"'{key}' is not a number: {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise VerdictError(f"'{key}' is not finite")
    return min(1.0, max(0.0, number))


def parse_verdict(content) -> Verdict:
    """Parse the judge's message content; raises :class:`VerdictError` on anything unusable."""
    if not isinstance(content, str) or not content.strip():
        raise VerdictError("empty reply")
    if len(content) > MAX_REPLY_CHARS:
        raise VerdictError(f"reply longer than {MAX_REPLY_CHARS} characters")
    text = THINK_RE.sub("", content).strip()
    if "<think>" in text:
        raise VerdictError("reply ends inside an unclosed <think> block")
    obj = _extract_object(text)
    rationale = obj.get("rationale", "")
    return Verdict(_score(obj, "integrity"), _score(obj, "knowledge"),
                   rationale[:1000] if isinstance(rationale, str) else "")
