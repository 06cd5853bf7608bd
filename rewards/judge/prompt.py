"""The versioned judge prompt and its delimited sections.

The template (``rewards/judge/prompts/process_v2.txt``, the default; ``process_v1.txt`` is kept
for reproducing older runs) holds the instructions; the renderer turns each field of a sample
into a *section*::

    <<<COMPLETION 3f9c0a1b2c4d5e6f>>>
    ...the policy's text...
    <<<END COMPLETION 3f9c0a1b2c4d5e6f>>>

The id is a hash of the whole request, so text inside the completion cannot forge a marker with
the right id (it would have to contain its own hash). The rubric judge reads the id from the
*last* ``END COMPLETION`` marker, which is always the real one because any forged marker sits
inside the real completion section.

A *group* template (``process_group_v1.txt``, :func:`default_group_template`) has ``$chains``
instead of ``$completion``: every reasoning chain of a GRPO group in its own section
``<<<CHAIN k id>>>`` ... ``<<<END CHAIN k id>>>`` (k = 1..n, one id for the whole request), and
``$n_chains`` is replaced by n. :func:`prompt_kind` tells the two apart by the *last* end marker
of either kind, which is always real for the same reason: a forged marker of either kind sits
inside a real completion or chain section, before that section's real end marker.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from data.readers import sha256_hex
from data.records import lettered

PROMPT_DIR = Path(__file__).parent / "prompts"
SECTIONS = ("QUESTION", "OPTIONS", "REFERENCE", "CRITERIA", "COMPLETION")
REQUIRED_PLACEHOLDERS = ("question", "reference", "criteria", "completion")
GROUP_PLACEHOLDER = "chains"
_END_RE = re.compile(r"<<<END (COMPLETION|CHAIN \d{1,4}) ([0-9a-f]{16})>>>")


@dataclass(frozen=True)
class PromptTemplate:
    """A judge prompt: ``version`` (goes into the cache key), a system and a user message.

    The user message uses ``$question``, ``$options``, ``$reference``, ``$criteria`` and
    ``$completion`` placeholders, each replaced by a delimited section.
    """

    version: str
    system: str
    user: str

    def __post_init__(self) -> None:
        if not self.version.strip():
            raise ValueError("PromptTemplate.version must be non-empty (it keys the judgment cache)")
        names = self._placeholders()
        if "completion" in names and GROUP_PLACEHOLDER in names:
            raise ValueError("PromptTemplate.user has both $completion and $chains; a template grades one "
                             "completion ($completion) or a whole group ($chains), not both")
        needed = REQUIRED_PLACEHOLDERS if GROUP_PLACEHOLDER not in names else REQUIRED_PLACEHOLDERS[:-1]
        missing = [p for p in needed if p not in names]
        if missing:
            hint = " (or $chains, for a group template)" if missing[-1] == "completion" else ""
            raise ValueError(f"PromptTemplate.user is missing placeholder(s) {', '.join('$' + p for p in missing)}"
                             f"{hint}; the judge cannot grade without them")

    def _placeholders(self) -> set[str]:
        return {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(self.user)}

    @property
    def is_group(self) -> bool:
        """True for a group template (``$chains``: all chains of a group in one request)."""
        return GROUP_PLACEHOLDER in self._placeholders()

    @property
    def fingerprint(self) -> str:
        """Hash of the full template text, so an edited template never reuses stale judgments."""
        blob = json.dumps([self.version, self.system, self.user]).encode()
        return sha256_hex(blob)[:16]

    @classmethod
    def from_file(cls, path: str | Path) -> "PromptTemplate":
        """Read the ``version:`` / ``=== system ===`` / ``=== user ===`` file format."""
        text = Path(path).read_text(encoding="utf-8")
        m = re.fullmatch(r"version:\s*(\S+)\s*\n=== system ===\n(.*?)\n=== user ===\n(.*)", text, re.DOTALL)
        if m is None:
            raise ValueError(f"{path}: expected 'version: X', '=== system ===' and '=== user ===' sections")
        return cls(version=m.group(1), system=m.group(2).strip(), user=m.group(3).strip())


def default_template() -> PromptTemplate:
    """The paper's cross-modal process prompt with its scoring rule, version ``process-v2``:
    integrity and knowledge start at 1, lose 0.4 per missing required step / per error, and are
    clipped to 0..1 (``process-v1``, the older fraction-of-criteria wording, is
    ``PromptTemplate.from_file(PROMPT_DIR / "process_v1.txt")``)."""
    return PromptTemplate.from_file(PROMPT_DIR / "process_v2.txt")


def default_group_template() -> PromptTemplate:
    """The group-wise judge prompt, version ``process-group-v1``: the same scoring rule as
    ``process-v2``, applied to every chain of a group in one request; the reply is one verdict per
    chain (``rewards/judge/prompts/process_group_v1.txt``)."""
    return PromptTemplate.from_file(PROMPT_DIR / "process_group_v1.txt")


def section(name: str, body: str, nonce: str) -> str:
    return f"<<<{name} {nonce}>>>\n{body}\n<<<END {name} {nonce}>>>"


def format_options(options: list[str] | None) -> str:
    if not options:
        return "(none: open question)"
    return "\n".join(f"{letter}) {text}" for letter, text in lettered(options[:26]))


def format_criteria(criteria: list[str]) -> str:
    return "\n".join(f"- {c}" for c in criteria) if criteria else "(none given)"


def render_user_text(template: PromptTemplate, *, question: str, options: list[str] | None,
                     reference: str, criteria: list[str], completion: str) -> str:
    """The user message text with every field in its own delimited section."""
    fields = {"QUESTION": question, "OPTIONS": format_options(options), "REFERENCE": reference,
              "CRITERIA": format_criteria(criteria), "COMPLETION": completion}
    nonce = sha256_hex(json.dumps([template.fingerprint, fields]))[:16]
    values = {name.lower(): section(name, body, nonce) for name, body in fields.items()}
    return string.Template(template.user).safe_substitute(values)


def render_group_text(template: PromptTemplate, *, question: str, options: list[str] | None,
                      reference: str, criteria: list[str], chains: list[str]) -> str:
    """The user message of a group template: shared fields once, then chain 1..n, each in its own
    delimited section ``<<<CHAIN k id>>>``."""
    if not template.is_group:
        raise ValueError(f"template {template.version!r} has no $chains placeholder; use a group template")
    if not chains:
        raise ValueError("a group needs at least one chain")
    fields = {"QUESTION": question, "OPTIONS": format_options(options), "REFERENCE": reference,
              "CRITERIA": format_criteria(criteria)}
    nonce = sha256_hex(json.dumps([template.fingerprint, fields, list(chains)]))[:16]
    values = {name.lower(): section(name, body, nonce) for name, body in fields.items()}
    values[GROUP_PLACEHOLDER] = "\n\n".join(section(f"CHAIN {k}", body, nonce) for k, body in enumerate(chains, 1))
    values["n_chains"] = str(len(chains))
    return string.Template(template.user).safe_substitute(values)


def prompt_kind(text: str) -> str | None:
    """``"single"`` or ``"group"``, by the last end marker of either kind (always a real one); None
    when there is none."""
    ends = list(_END_RE.finditer(text))
    if not ends:
        return None
    return "single" if ends[-1].group(1) == "COMPLETION" else "group"


def parse_group_sections(text: str) -> dict | None:
    """Inverse of :func:`render_group_text`: the shared sections and ``"CHAINS"``, the list of
    chain texts in order; None if malformed (chains not numbered 1..n, a section missing)."""
    ends = [m for m in _END_RE.finditer(text) if m.group(1) != "COMPLETION"]
    if not ends:
        return None
    nonce = ends[-1].group(2)
    out: dict = {}
    for name in SECTIONS[:-1]:
        m = re.search(rf"<<<{name} {nonce}>>>\n(.*?)\n<<<END {name} {nonce}>>>", text, re.DOTALL)
        if m is None and name != "OPTIONS":
            return None
        out[name] = m.group(1) if m else ""
    found = re.findall(rf"<<<CHAIN (\d{{1,4}}) {nonce}>>>\n(.*?)\n<<<END CHAIN \1 {nonce}>>>", text, re.DOTALL)
    if not found or [int(k) for k, _ in found] != list(range(1, len(found) + 1)):
        return None
    out["CHAINS"] = [body for _, body in found]
    return out


def parse_sections(text: str) -> dict[str, str] | None:
    """Inverse of :func:`render_user_text` (used by the rubric judge); None if malformed."""
    ends = list(re.finditer(r"<<<END COMPLETION ([0-9a-f]{16})>>>", text))
    if not ends:
        return None
    nonce = ends[-1].group(1)
    out = {}
    for name in SECTIONS:
        m = re.search(rf"<<<{name} {nonce}>>>\n(.*?)\n<<<END {name} {nonce}>>>", text, re.DOTALL)
        if m is None and name != "OPTIONS":
            return None
        out[name] = m.group(1) if m else ""
    return out


def parse_options(body: str) -> list[str] | None:
    """Option texts back from an OPTIONS section (None for an open question)."""
    if body.startswith("(none"):
        return None
    opts = [re.sub(r"^[A-Z]\) ", "", line) for line in body.split("\n") if line.strip()]
    return opts or None


def parse_criteria(body: str) -> list[str]:
    if body.startswith("(none"):
        return []
    return [line[2:].strip() for line in body.split("\n") if line.startswith("- ") and line[2:].strip()]
