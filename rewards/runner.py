"""score_all: run every reward on a batch and check each one kept its contract."""
from __future__ import annotations

import asyncio
import math
import numbers
import reprlib
from typing import TYPE_CHECKING, Sequence

from rewards._loop import background_loop
from rewards.base import Reward, RewardError, RewardSample

if TYPE_CHECKING:
    import torch


def contract_problem(reward: Reward, values, n: int) -> str | None:
    """Why ``values`` breaks the reward contract for ``n`` samples (exactly ``n`` values, each None
    or a finite real number inside ``reward.range``), or None when it keeps it."""
    if not isinstance(values, (list, tuple)):
        return (f"reward {reward.name!r} returned {type(values).__name__}; "
                "score_batch must return a list with one float or None per sample")
    if len(values) != n:
        return (f"reward {reward.name!r} returned {len(values)} values for {n} samples; "
                "score_batch must return one float or None per sample")
    lo, hi = reward.range
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return (f"reward {reward.name!r} returned {type(v).__name__} for sample {i}; "
                    "return a float, or None to abstain")
        if not math.isfinite(v) or not lo <= v <= hi:
            return (f"reward {reward.name!r} returned {v!r} for sample {i}, outside its declared "
                    f"range [{lo}, {hi}]; fix the reward or set its `range` attribute "
                    "(return None to abstain instead of NaN)")
    return None


def _check(reward: Reward, values, n: int) -> list[float | None]:
    """Exactly ``n`` values, each None or a finite real number inside ``reward.range``."""
    problem = contract_problem(reward, values, n)
    if problem is not None:
        raise RewardError(problem)
    return [None if v is None else float(v) for v in values]


async def _run_async(rewards: list[Reward], samples: list[RewardSample]) -> list:
    async def one(reward: Reward):
        try:
            return await reward.ascore_batch(samples)
        except RewardError:
            raise
        except Exception as err:
            raise RewardError(f"reward {reward.name!r} raised {type(err).__name__}: {err}") from err
    return await asyncio.gather(*(one(r) for r in rewards))


def _summaries(rewards: Sequence[Reward], scores) -> dict[str, float]:
    out: dict[str, float] = {}
    for j, reward in enumerate(rewards):
        col = scores[:, j]
        kept = col[~col.isnan()]
        out[f"reward/{reward.name}/mean"] = float(kept.mean()) if len(kept) else float("nan")
        out[f"reward/{reward.name}/abstain_rate"] = 1.0 - len(kept) / max(1, len(col))
        out.update(reward.metrics())
    return out


def score_all(rewards: Sequence[Reward], samples: Sequence[RewardSample]) -> tuple["torch.Tensor", dict[str, float]]:
    """Score ``samples`` with every reward.

    Returns ``(scores, metrics)``: ``scores`` is float32 ``[N, R]`` (column ``j`` is
    ``rewards[j]``, NaN where it abstained); ``metrics`` has ``reward/<name>/mean`` (over
    non-abstained values), ``reward/<name>/abstain_rate`` and each reward's own metrics (the
    judge ledger as ``judge/...``). Async rewards run concurrently on one background event loop,
    so this is a plain blocking call, usable from any synchronous code.
    """
    import torch  # imported here so the judge server process starts without loading torch

    rewards, samples = list(rewards), list(samples)
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise RewardError(f"reward names must be unique (they key the metrics), got {names}; "
                          "pass name=... to tell them apart")
    async_rewards = [r for r in rewards if r.is_async]
    pending = None
    if async_rewards and samples:
        # Start the judges first, then compute the cheap sync rewards on this thread meanwhile.
        pending = asyncio.run_coroutine_threadsafe(_run_async(async_rewards, samples), background_loop())
    results: dict[int, list] = {}
    for j, reward in enumerate(rewards):
        if not reward.is_async:
            results[j] = _sync_batch(reward, samples)
    if pending is not None:
        for reward, values in zip(async_rewards, pending.result()):
            results[rewards.index(reward)] = values
    columns = [_check(r, results.get(j, []), len(samples)) for j, r in enumerate(rewards)]
    scores = torch.tensor([[math.nan if v is None else v for v in row] for row in zip(*columns)],
                          dtype=torch.float32).reshape(len(samples), len(rewards))
    return scores, _summaries(rewards, scores)


def _sync_batch(reward: Reward, samples: list[RewardSample]) -> list:
    try:
        return reward.score_batch(samples)
    except RewardError:
        raise
    except Exception as err:
        raise RewardError(f"reward {reward.name!r} raised {type(err).__name__}: {err}") from err


def preflight_problems(rewards: Sequence[Reward], sample: RewardSample) -> list[str]:
    """Each reward's :meth:`~rewards.Reward.preflight` on one sample: the problems found (a
    reward that raised, or broke the contract of :func:`score_all` on a one-sample batch), each
    naming the reward and what it returned or raised. An empty list: every reward is usable."""
    problems = []
    for reward in rewards:
        label = f"reward {reward.name!r} ({type(reward).__name__})"
        try:
            values = reward.preflight(sample)
        except RewardError as err:
            problems.append(f"{label}: {err}")
            continue
        except Exception as err:
            problems.append(f"{label} raised {type(err).__name__} on a one-sample batch: {err}")
            continue
        problem = contract_problem(reward, values, 1)
        if problem is not None:
            problems.append(f"{label} returned {reprlib.repr(values)} for a one-sample batch: {problem}")
    return problems
