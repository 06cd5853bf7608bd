"""The reward interface: one sample type, one base class, one method to override.

A reward has a ``name`` and a ``weight`` and maps each :class:`RewardSample` to a float or to
``None`` (abstain: "I cannot score this sample", e.g. the LLM judge was unreachable). Abstaining
is different from scoring 0 -- the trainer sees NaN and decides what to do (see docs/rewards.md).

Write a synchronous reward by subclassing :class:`Reward` and overriding ``score``; write one that
does I/O by subclassing :class:`AsyncReward` and overriding ``ascore``. The batch methods have
defaults built on those and are what :func:`rewards.score_all` calls.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

from rewards._loop import run_sync


class RewardError(RuntimeError):
    """A reward broke its contract (wrong count, NaN, out of range) or failed outright."""


@dataclass
class RewardSample:
    """Everything a reward may look at for one generated completion.

    ``options`` are the option texts in letter order (A, B, C, ...); ``images`` hold paths, PIL
    images or encoded bytes; ``criteria`` are the facts a sound reasoning chain should contain
    (the paper's evaluation criteria); ``extra`` carries any other dataset columns untouched.
    ``group`` optionally names the GRPO group (the prompt) the completion belongs to, e.g. its
    prompt index in the step; rewards that judge a whole group at once
    (``ProcessReward(group_judging=True)``) use it, and otherwise find groups as runs of
    consecutive samples with the same prompt (see :func:`rewards.process.find_groups`).
    """

    question: str
    completion: str
    answer: str
    options: list[str] | None = None
    images: list = field(default_factory=list)
    criteria: list[str] = field(default_factory=list)
    modality: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    group: Hashable | None = None


class Reward:
    """Base class of synchronous rewards. Override :meth:`score`.

    Class attributes give defaults that a subclass may override without writing ``__init__``:
    ``name`` (unique within a run; used as the metric key), ``weight`` (applied by the trainer)
    and ``range`` (the closed interval every non-``None`` score must lie in; checked by
    :func:`rewards.score_all`).
    """

    name: str = "reward"
    weight: float = 1.0
    range: tuple[float, float] = (0.0, 1.0)

    def __init__(self, name: str | None = None, weight: float | None = None):
        if name is not None:
            self.name = name
        if weight is not None:
            self.weight = weight
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{type(self).__name__}: name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(f"{type(self).__name__}: weight must be a finite number, got {self.weight!r}")

    def score(self, sample: RewardSample) -> float | None:
        """Score one sample: a float in ``self.range``, or ``None`` to abstain."""
        raise NotImplementedError(f"{type(self).__name__} must override score(self, sample)")

    def score_batch(self, samples: Sequence[RewardSample]) -> list[float | None]:
        """Score a batch; the default calls :meth:`score` once per sample."""
        return [self.score(s) for s in samples]

    async def ascore_batch(self, samples: Sequence[RewardSample]) -> list[float | None]:
        """Async form of :meth:`score_batch`; a sync reward simply computes it inline."""
        return self.score_batch(samples)

    @property
    def is_async(self) -> bool:
        """True when the reward does I/O and should run on the event loop."""
        return False

    def metrics(self) -> dict[str, float]:
        """Extra metrics to log (e.g. the judge ledger); keys are already namespaced."""
        return {}

    def preflight(self, sample: RewardSample) -> list:
        """The trainer's check before its first rollout: what ``score_batch([sample])`` returns.

        ``sample`` is built from the first dataset item with a placeholder completion in the
        ``<think>...</think><answer>...</answer>`` format. The trainer checks the result like a
        training batch's (one float or None, inside ``range``) and stops before any generation
        when it is wrong or when this raises. Override it in a reward that talks to a service,
        to check the service answers (see :meth:`rewards.ProcessReward.preflight`), and raise
        :class:`RewardError` with a message naming the setting to fix; or in a reward whose
        state changes with each call (a schedule), so that the check leaves it untouched."""
        return self.score_batch([sample])

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this reward (JSON-serialisable; never a secret), e.g. a
        judge's usage ledger. Default: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned, when a run resumes from a checkpoint."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight!r})"


class AsyncReward(Reward):
    """Base class of rewards that wait on I/O (an LLM judge, a verifier service).

    Override :meth:`ascore`. :meth:`ascore_batch` runs all samples concurrently; any throttling
    belongs in the client the reward uses (see :class:`rewards.JudgeClient`).
    """

    async def ascore(self, sample: RewardSample) -> float | None:
        """Score one sample asynchronously: a float in ``self.range``, or ``None``."""
        raise NotImplementedError(f"{type(self).__name__} must override ascore(self, sample)")

    async def ascore_batch(self, samples: Sequence[RewardSample]) -> list[float | None]:
        return list(await asyncio.gather(*(self.ascore(s) for s in samples)))

    def score(self, sample: RewardSample) -> float | None:
        return run_sync(self.ascore(sample))

    def score_batch(self, samples: Sequence[RewardSample]) -> list[float | None]:
        return run_sync(self.ascore_batch(samples))

    @property
    def is_async(self) -> bool:
        return True
