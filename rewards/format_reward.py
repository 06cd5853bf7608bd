"""FormatReward: one ``<think>...</think>`` followed by one ``<answer>...</answer>``.

Whitespace (spaces, newlines) around and between the blocks is always allowed. Strictness:

* ``"strict"`` (default, the paper's format): nothing but whitespace outside the two blocks.
* ``"lenient"``: any text may surround the blocks, but there must still be exactly one block of
  each, the think block first.

In both modes a block nested in the other, a repeated or unclosed tag, or (with
``require_nonempty``) an empty block scores 0.
"""
from __future__ import annotations

from rewards.base import Reward, RewardSample
from rewards.text import LENIENT_FORMAT_RE, STRICT_FORMAT_RE, TAGS

MODES = ("strict", "lenient")


class FormatReward(Reward):
    """1.0 when the completion has the think-then-answer layout, else 0.0.

    Args:
        mode: ``"strict"`` or ``"lenient"`` (see module docstring).
        require_nonempty: an all-whitespace think or answer block scores 0.
    """

    name = "format"

    def __init__(self, name: str | None = None, weight: float | None = None,
                 mode: str = "strict", require_nonempty: bool = True):
        super().__init__(name, weight)
        if mode not in MODES:
            raise ValueError(f"FormatReward: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.require_nonempty = require_nonempty

    def score(self, sample: RewardSample) -> float:
        text = sample.completion
        if any(text.count(tag) != 1 for tag in TAGS):
            return 0.0  # exactly one of each tag: rules out nesting, repeats and stray tags
        pattern = STRICT_FORMAT_RE if self.mode == "strict" else LENIENT_FORMAT_RE
        m = pattern.fullmatch(text)
        if m is None:
            return 0.0
        if self.require_nonempty and not (m.group(1).strip() and m.group(2).strip()):
            return 0.0
        return 1.0
