"""Plain reward functions, written the way TRL's ``GRPOTrainer`` takes them.

A reward function is any callable ``f(prompts, completions, **columns) -> list[float | None]``,
``def`` or ``async def``: one value per completion, ``None`` to abstain (the sample is not scored by
this function; see docs/rewards.md). :class:`FunctionReward` adapts one to the :class:`Reward`
interface, so it runs beside the built-in rewards in :func:`rewards.score_all` and in the trainer,
which wraps plain callables in ``reward_funcs`` automatically (:func:`as_rewards`).

What the function receives for a batch of :class:`RewardSample` (all lists have one entry per
completion, in order):

* ``prompts``: the prompt the model saw, ``sample.extra["prompt"]`` (:data:`PROMPT`; the trainer
  fills it with the chat messages it encoded); without it, ``[{"role": "user", "content":
  question}]``;
* ``completions``: ``[{"role": "assistant", "content": text}]`` when the prompt is a conversation
  (a list of messages), the plain text when the prompt is a string (TRL's rule);
* ``completion_ids``: the completion's token ids (``sample.extra["completion_ids"]``, set by the
  trainer), when every sample has them;
* one keyword per column: the sample's ``question``, ``answer``, ``options``, ``criteria``,
  ``modality`` and ``images`` (a list), then every key of ``sample.extra`` (the dataset item's
  other columns, e.g. ``solution`` or ``image``, and the trainer's ``completion_tokens``,
  ``max_completion_length``, ``truncated``); a key some samples lack is ``None`` for those;
* ``trainer_state``: a :class:`TrainerState` (``global_step``, ``max_steps``), one per batch, when
  the trainer gave one;
* ``log_metric(name, value)``: logs ``reward/<function name>/<name>``, averaged over the calls of
  the batch.

A function without ``**kwargs`` receives only the parameters it names; a parameter it requires
that the batch cannot give raises :class:`RewardError` naming it.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rewards._loop import run_sync
from rewards.base import Reward, RewardError, RewardSample

PROMPT = "prompt"                  # RewardSample.extra key: the prompt (chat messages, or a string)
COMPLETION_IDS = "completion_ids"  # RewardSample.extra key: the completion's token ids
TRAINER_STATE = "trainer_state"    # RewardSample.extra key: a TrainerState, the same for the whole batch
_FIELDS = ("question", "answer", "options", "criteria", "modality", "images")
_NOT_COLUMNS = {PROMPT, COMPLETION_IDS, TRAINER_STATE, "prompts", "completions", "completion", "log_metric"}


@dataclass(frozen=True)
class TrainerState:
    """Where training stands when a batch is scored (the fields of TRL's ``TrainerState`` that a
    reward schedule reads): ``global_step`` optimizer steps done, of ``max_steps``."""
    global_step: int
    max_steps: int


def function_name(fn: Callable) -> str:
    """A callable's name: ``__name__``, that of a ``functools.partial``'s function, or its type's."""
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None)
    return name or type(fn).__name__


def _is_async(fn: Callable) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class FunctionReward(Reward):
    """A plain function as a :class:`Reward`.

    ``fn(prompts, completions, **columns) -> list[float | None]`` (sync or ``async def``; see the
    module's docstring for the arguments); ``name`` defaults to ``fn.__name__`` and keys the metrics
    (``reward/<name>/mean``); ``weight`` as for any reward (``GRPOConfig.reward_weights`` overrides
    it); ``range`` is the interval every value must lie in, by default any finite number (NaN and
    infinities are refused: return ``None`` to abstain). ``True``/``False`` count as 1.0/0.0, and an
    array or tensor of values is read as a list.
    """

    range = (-math.inf, math.inf)

    def __init__(self, fn: Callable, name: str | None = None, weight: float | None = None,
                 range: tuple[float, float] | None = None):
        if isinstance(fn, Reward):
            raise TypeError(f"{fn!r} is already a rewards.Reward; pass it as it is")
        if not callable(fn):
            raise TypeError(f"FunctionReward needs a callable f(prompts, completions, **columns), got {fn!r}")
        self.fn = fn
        super().__init__(name if name is not None else function_name(fn), weight)
        if range is not None:
            lo, hi = range
            if not (isinstance(lo, numbers.Real) and isinstance(hi, numbers.Real)) or math.isnan(lo) \
                    or math.isnan(hi) or lo > hi:
                raise ValueError(f"FunctionReward {self.name!r}: range must be (low, high) numbers with "
                                 f"low <= high, got {range!r}")
            self.range = (float(lo), float(hi))
        self._async = _is_async(fn)
        self._params, self._required, self._any_kwargs = self._signature(fn)
        self._logged: dict[str, list[float]] = {}

    @staticmethod
    def _signature(fn):
        """(named parameters, required ones, whether it takes **kwargs)."""
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature: give it everything
            return set(), set(), True
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        named = {p.name for p in params if p.kind in kinds}
        required = {p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty}
        return named, required, any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    @property
    def is_async(self) -> bool:
        return self._async

    # ---------------------------------------------------------------- the call
    def arguments(self, samples: Sequence[RewardSample]) -> dict[str, Any]:
        """The keyword arguments the function is called with for ``samples`` (all of them, before
        keeping only the parameters a function without ``**kwargs`` names)."""
        prompts, completions = [], []
        for s in samples:
            prompt = s.extra.get(PROMPT)
            if prompt is None:
                prompt = [{"role": "user", "content": s.question}]
            prompts.append(prompt)
            completions.append(s.completion if isinstance(prompt, str)
                               else [{"role": "assistant", "content": s.completion}])
        out: dict[str, Any] = {"prompts": prompts, "completions": completions}
        if samples and all(COMPLETION_IDS in s.extra for s in samples):
            out[COMPLETION_IDS] = [list(s.extra[COMPLETION_IDS]) for s in samples]
        rows = [{**{f: getattr(s, f) for f in _FIELDS}, **s.extra} for s in samples]
        keys = list(dict.fromkeys(k for row in rows for k in row if k not in _NOT_COLUMNS))
        out.update({k: [row.get(k) for row in rows] for k in keys})
        state = next((s.extra[TRAINER_STATE] for s in samples if TRAINER_STATE in s.extra), None)
        if state is not None:
            out[TRAINER_STATE] = state
        out["log_metric"] = self._log_metric
        return out

    def _call_arguments(self, samples: Sequence[RewardSample]) -> dict[str, Any]:
        given = self.arguments(samples)
        missing = sorted(self._required - set(given))
        if missing:
            raise RewardError(f"reward function {self.name!r} requires the argument(s) {missing}, which this "
                              f"batch does not have (it has {sorted(given)}); add the column(s) to the dataset "
                              "items or give the parameter(s) a default")
        return given if self._any_kwargs else {k: v for k, v in given.items() if k in self._params}

    def _log_metric(self, name: str, value: float) -> None:
        self._logged.setdefault(str(name), []).append(float(value))

    @staticmethod
    def _values(values):
        """A list of the function's values: arrays and tensors read as lists, bools as 0/1."""
        if not isinstance(values, (list, tuple)) and callable(getattr(values, "tolist", None)):
            values = values.tolist()
        if not isinstance(values, (list, tuple)):
            return values  # score_all reports the type
        out = []
        for v in values:
            if v is not None and not isinstance(v, numbers.Real) and callable(getattr(v, "item", None)):
                v = v.item()  # a 0-d tensor or array
            out.append(float(v) if isinstance(v, bool) else v)
        return out

    def score_batch(self, samples: Sequence[RewardSample]) -> list[float | None]:
        if self._async:
            return run_sync(self.ascore_batch(samples))
        return self._values(self.fn(**self._call_arguments(samples)))

    async def ascore_batch(self, samples: Sequence[RewardSample]) -> list[float | None]:
        if not self._async:
            return self.score_batch(samples)
        return self._values(await self.fn(**self._call_arguments(samples)))

    def score(self, sample: RewardSample) -> float | None:
        values = self.score_batch([sample])
        return values[0] if isinstance(values, list) and len(values) == 1 else values

    def metrics(self) -> dict[str, float]:
        """What the function logged with ``log_metric`` since the last call, averaged."""
        out = {f"reward/{self.name}/{k}": sum(v) / len(v) for k, v in self._logged.items() if v}
        self._logged = {}
        return out

    def __repr__(self) -> str:
        return f"FunctionReward({function_name(self.fn)}, name={self.name!r}, weight={self.weight!r})"


def as_reward(obj) -> Reward:
    """``obj`` as a :class:`Reward`: a Reward passes unchanged, a plain callable is wrapped in a
    :class:`FunctionReward`. Reward model ids and ``torch.nn.Module`` reward models (which TRL
    also accepts) are refused, as is a Reward class given instead of an instance."""
    if isinstance(obj, Reward):
        return obj
    if isinstance(obj, type):
        raise TypeError(f"reward_funcs holds the class {obj.__name__}; pass an instance, e.g. {obj.__name__}()")
    if isinstance(obj, (str, bytes)) or hasattr(obj, "parameters") and hasattr(obj, "forward"):
        raise TypeError(f"reward_funcs holds {obj!r:.80}: reward models are not supported; pass a function "
                        "f(prompts, completions, **columns) -> list[float | None] or a rewards.Reward")
    if callable(obj):
        return FunctionReward(obj)
    raise TypeError(f"reward_funcs holds {obj!r:.80} ({type(obj).__name__}); pass a function "
                    "f(prompts, completions, **columns) -> list[float | None] or a rewards.Reward")


def as_rewards(reward_funcs) -> list[Reward]:
    """TRL's ``reward_funcs`` (one reward or function, or a list of them) as a list of Rewards."""
    if isinstance(reward_funcs, Reward) or callable(reward_funcs) or isinstance(reward_funcs, (str, bytes)):
        reward_funcs = [reward_funcs]
    return [as_reward(r) for r in reward_funcs]
