"""OverlongPenalty: DAPO's soft overlong punishment, a length-shaping reward.

DAPO (Yu et al., arXiv 2503.14476, Sec. 3.4 "Overlong Reward Shaping"), with L_max the
completion-length limit and L_cache the buffer: for a completion of |y| tokens,

    R(y) = 0                                     |y| <= L_max - L_cache
    R(y) = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
    R(y) = -1                                    |y| > L_max

so the penalty falls linearly from 0 to -1 over the last ``buffer`` tokens. It is added to the
other rewards (a reward like any other, weight 1 by default), so an answer that runs into the
limit scores less than the same answer finished earlier.

It counts tokens, not characters: the GRPO trainer writes each completion's token count into
``RewardSample.extra`` (:data:`COMPLETION_TOKENS`: tokens up to and including the first EOS, i.e.
``max_completion_length`` for a truncated completion), with ``max_completion_length``
(:data:`MAX_COMPLETION_LENGTH`) and whether it was truncated (:data:`TRUNCATED`). Outside the
trainer, put those keys in ``extra`` yourself.

Its sibling, *overlong filtering* (DAPO Sec. 3.4: truncated samples leave the loss), is
``GRPOConfig.mask_truncated_completions``.
"""
from __future__ import annotations

from rewards.base import Reward, RewardSample

COMPLETION_TOKENS = "completion_tokens"          # RewardSample.extra key: tokens of the completion (incl. EOS)
MAX_COMPLETION_LENGTH = "max_completion_length"  # RewardSample.extra key: the sampling limit L_max
TRUNCATED = "truncated"                          # RewardSample.extra key: True when no EOS was emitted


def soft_overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to ``max_length - buffer`` tokens, then linearly down to -1 at
    ``max_length``, -1 beyond it."""
    if buffer < 1 or max_length < buffer:
        raise ValueError(f"need 1 <= buffer <= max_length, got buffer={buffer}, max_length={max_length}")
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length > max_length:
        return -1.0
    return (start - length) / buffer


class OverlongPenalty(Reward):
    """Soft overlong punishment (DAPO): in [-1, 0], 0 for completions of at most
    ``max_length - buffer`` tokens.

    Args:
        buffer: L_cache, the tokens before the limit over which the penalty falls from 0 to -1
            (DAPO: 4,096 of 20,480).
        max_length: L_max; ``None`` (default) uses ``extra["max_completion_length"]``, which the
            GRPO trainer sets to ``GRPOConfig.max_completion_length``.
        name, weight: as for every reward (``name`` defaults to ``"overlong"``).

    Raises ``KeyError`` naming the missing key when a sample carries no token count.
    """

    name = "overlong"
    range = (-1.0, 0.0)

    def __init__(self, buffer: int, max_length: int | None = None, name: str | None = None,
                 weight: float | None = None):
        super().__init__(name, weight)
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"OverlongPenalty: buffer must be an integer >= 1, got {buffer!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < buffer):
            raise ValueError(f"OverlongPenalty: max_length must be an integer >= buffer={buffer}, or None, "
                             f"got {max_length!r}")
        self.buffer, self.max_length = buffer, max_length

    def score(self, sample: RewardSample) -> float:
        if COMPLETION_TOKENS not in sample.extra:
            raise KeyError(f"OverlongPenalty needs the completion's token count in RewardSample.extra"
                           f"[{COMPLETION_TOKENS!r}] (the GRPO trainer sets it; set it yourself elsewhere)")
        limit = self.max_length
        if limit is None:
            if MAX_COMPLETION_LENGTH not in sample.extra:
                raise KeyError(f"OverlongPenalty(max_length=None) reads the limit from RewardSample.extra"
                               f"[{MAX_COMPLETION_LENGTH!r}]; pass max_length= or set that key")
            limit = int(sample.extra[MAX_COMPLETION_LENGTH])
        if limit < self.buffer:
            raise ValueError(f"OverlongPenalty: buffer={self.buffer} exceeds max_completion_length={limit}")
        return soft_overlong_penalty(int(sample.extra[COMPLETION_TOKENS]), limit, self.buffer)

    def __repr__(self) -> str:
        return (f"OverlongPenalty(name={self.name!r}, weight={self.weight!r}, buffer={self.buffer}, "
                f"max_length={self.max_length})")
