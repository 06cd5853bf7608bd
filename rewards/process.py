"""ProcessReward: the paper's cross-modal process reward, scored by an LLM judge.

The judge sees the question, the image(s), the full completion, the reference answer and the
evaluation criteria, and returns *integrity* (are the required reasoning steps there) and
*knowledge* (are its claims correct), scored as the PathVLM-R1 authors' judge does: each starts
at 1 and loses 0.4 per missing step or per error, clipped to [0, 1]. The reward is their mean.

With ``group_judging=True`` the judge sees all reasoning chains of a GRPO group in one request
and returns one verdict per chain (relative judging, as OpenPipe's RULER does): GRPO only uses
differences within a group, and the number of requests falls G-fold. How a batch is cut into
groups is :func:`find_groups`.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Sequence

from rewards._loop import run_sync
from rewards.base import AsyncReward, RewardError, RewardSample
from rewards.judge.client import RETRYABLE_STATUS, JudgeClient, JudgeError
from rewards.judge.config import JudgeConfig
from rewards.judge.prompt import PromptTemplate, default_group_template, default_template

DEFAULT_MAX_GROUP_SIZE = 16


def _image_identity(image):
    """Equal for the same picture as the trainer passes it: a path by value, bytes by value, any
    other object (a PIL image) by identity -- the trainer hands every completion of a prompt the
    same objects."""
    if isinstance(image, (str, Path)):
        return ("path", str(image))
    if isinstance(image, (bytes, bytearray)):
        return ("bytes", bytes(image))
    return ("object", id(image))


def prompt_identity(sample: RewardSample) -> tuple:
    """What the completions of one group share: question, options, reference, criteria, images."""
    return (sample.question, None if sample.options is None else tuple(sample.options), sample.answer,
            tuple(sample.criteria), tuple(_image_identity(im) for im in sample.images))


def _split(indices: list[int], max_size: int | None) -> list[list[int]]:
    """``indices`` in consecutive chunks of near-equal size, none larger than ``max_size``."""
    if not max_size or len(indices) <= max_size:
        return [indices]
    parts = -(-len(indices) // max_size)
    base, extra = divmod(len(indices), parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (p < extra)
        out.append(indices[start:start + size])
        start += size
    return out


def find_groups(samples: Sequence[RewardSample], max_group_size: int | None = DEFAULT_MAX_GROUP_SIZE) -> list[list[int]]:
    """Cut a batch into GRPO groups: lists of sample indices, in order of first appearance.

    * Samples whose ``group`` is set are grouped by it (they need not be adjacent).
    * Samples without ``group`` form groups of *consecutive* samples with the same prompt
      (:func:`prompt_identity`) -- the layout the trainer scores a step in: B prompts, each
      repeated G times, group after group. (The same prompt drawn twice in a row in one step
      makes one larger group; judging stays per chain, so this only changes which chains the
      judge sees side by side.)
    * Samples of one ``group`` with different prompts are split by prompt: a group judgment
      never mixes questions.
    * A group larger than ``max_group_size`` samples is cut into consecutive near-equal parts
      (None: no limit).
    """
    buckets: dict = {}
    run, previous = -1, None
    for i, sample in enumerate(samples):
        ident = prompt_identity(sample)
        if sample.group is not None:
            key = ("group", sample.group, ident)
            previous = None
        else:
            if previous is None or ident != previous:
                run += 1
            key = ("run", run, ident)
            previous = ident
        buckets.setdefault(key, []).append(i)
    return [part for indices in buckets.values() for part in _split(indices, max_group_size)]


class ProcessReward(AsyncReward):
    """Mean of the judge's integrity and knowledge scores.

    Args:
        judge: a :class:`JudgeConfig` (a client is created) or a shared :class:`JudgeClient`.
        template: the judge prompt; defaults to ``process-v2`` (rewards/judge/prompts/process_v2.txt),
            or ``process-group-v1`` (process_group_v1.txt) with ``group_judging``.
        group_judging: judge every GRPO group in one request (see :func:`find_groups`); the
            cache, ledger, retry and failure rules are the same, per group: a reply that does not
            grade every chain (after ``parse_retries`` re-asks) fails the whole group.
        max_group_size: with ``group_judging``, larger groups are judged in near-equal parts.

    A judgment that fails after retries follows ``judge.config.on_failure``: ``None`` (abstain),
    ``0.0``, or :class:`JudgeError` is raised.
    """

    name = "process"

    def __init__(self, judge: JudgeConfig | JudgeClient | None = None, template: PromptTemplate | None = None,
                 name: str | None = None, weight: float | None = None, *, group_judging: bool = False,
                 max_group_size: int | None = DEFAULT_MAX_GROUP_SIZE):
        super().__init__(name, weight)
        if judge is None:
            judge = JudgeConfig()
        self.client = judge if isinstance(judge, JudgeClient) else JudgeClient(judge)
        self.group_judging = bool(group_judging)
        self.template = template or (default_group_template() if self.group_judging else default_template())
        if self.template.is_group != self.group_judging:
            raise ValueError(
                f"ProcessReward: template {self.template.version!r} is a "
                f"{'group' if self.template.is_group else 'single-completion'} template but group_judging="
                f"{self.group_judging}; a group template has $chains, a single one $completion")
        if max_group_size is not None and (not isinstance(max_group_size, int) or max_group_size < 1):
            raise ValueError(f"ProcessReward: max_group_size must be None or a positive int, got {max_group_size!r}")
        self.max_group_size = max_group_size

    def _on_failure(self, err: JudgeError, n: int) -> list[float | None]:
        policy = self.client.config.on_failure
        if policy == "raise":
            raise err
        return [0.0 if policy == "zero" else None] * n

    async def ascore(self, sample: RewardSample) -> float | None:
        if self.group_judging:
            return (await self._score_group([sample]))[0]
        try:
            verdict = await self.client.judge(sample, self.template)
        except JudgeError as err:
            return self._on_failure(err, 1)[0]
        return verdict.score

    async def ascore_batch(self, samples: Sequence[RewardSample]) -> list[float | None]:
        if not self.group_judging:
            return await super().ascore_batch(samples)
        samples = list(samples)
        groups = find_groups(samples, self.max_group_size)
        results = await asyncio.gather(*(self._score_group([samples[i] for i in g]) for g in groups))
        out: list[float | None] = [None] * len(samples)
        for indices, scores in zip(groups, results):
            for i, value in zip(indices, scores):
                out[i] = value
        return out

    async def _score_group(self, group: list[RewardSample]) -> list[float | None]:
        try:
            verdicts = await self.client.judge_group(group, self.template)
        except JudgeError as err:
            return self._on_failure(err, len(group))
        return [v.score for v in verdicts]

    def metrics(self) -> dict[str, float]:
        return self.client.ledger.snapshot("judge/")

    # -- trainer hooks ----------------------------------------------------------------------

    def preflight(self, sample: RewardSample) -> list[float | None]:
        """Send one real judge request for ``sample`` (past the cache; see
        :meth:`JudgeClient.probe`) and return its score. Raises :class:`RewardError` naming the
        judge's settings (``base_url``, ``model``, the API key's environment variable -- never
        the key) and the cause: connection refused, timeout, 401, an unusable reply..."""
        try:
            result = run_sync(self.client.probe(sample, self.template))
        except JudgeError as err:
            raise RewardError(f"{self._judge_label()} did not pass the pre-flight request: "
                              f"{self._preflight_hint(err)} (cause: {err})") from None
        return [(result[0] if isinstance(result, list) else result).score]

    def state_dict(self) -> dict:
        """The judge's usage ledger (the run's totals), so ``judge/*`` stays cumulative across a resume."""
        return {"ledger": self.client.ledger.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "ledger" in state:
            self.client.ledger.load_state_dict(state["ledger"])

    def _judge_label(self) -> str:
        c = self.client.config
        return (f"{type(self).__name__}(judge=JudgeConfig(base_url={c.base_url!r}, model={c.model!r}, "
                f"api_key_env={c.api_key_env!r}))")

    def _preflight_hint(self, err: JudgeError) -> str:
        c, reason = self.client.config, err.reason
        code = int(reason[5:]) if reason.startswith("http_") and reason[5:].isdigit() else None
        if reason == "connect_error":
            return f"connection refused or host unreachable at base_url={c.base_url!r}; start the judge or fix base_url"
        if reason == "timeout":
            return (f"no reply within timeout={c.timeout}s at base_url={c.base_url!r}; check that the judge is up, "
                    f"or raise JudgeConfig.timeout for a slow judge")
        if code in (401, 403):
            env = f"${c.api_key_env}" + (f" (or ${c.api_key_fallback_env} for api.openai.com)"
                                         if c.api_key_fallback_env else "")
            state = "a key is set" if self.client.has_api_key else "no key is set"
            return f"authentication refused (HTTP {code}); check the API key in {env}: {state} (api_key_env)"
        if code == 404:
            return (f"HTTP 404 from {c.chat_url}; base_url should end in /v1, and model={c.model!r} must be "
                    f"served there")
        if code in RETRYABLE_STATUS:
            return f"HTTP {code} after {c.max_retries + 1} attempt(s); the judge is overloaded or failing"
        if code is not None:
            return (f"the judge refused the request with HTTP {code}; check model={c.model!r}"
                    + (" and json_mode=True (some servers reject response_format)" if c.json_mode else ""))
        if reason == "retry_after_too_long":
            return f"the judge is rate-limiting for longer than max_retry_after={c.max_retry_after}s"
        if reason == "out_of_range":
            return (f"the judge's score is outside [0, 1] after dividing by score_scale={c.score_scale}; set "
                    f"score_scale to the scale the judge grades on")
        if reason == "unparseable_verdict":
            return (f"the judge answered, but none of {c.parse_retries + 1} replies was a usable verdict; check "
                    f"model={c.model!r} (a chat model that follows the judge prompt) and max_tokens={c.max_tokens}")
        if reason in ("protocol_error", "malformed_body"):
            return f"unreadable reply from base_url={c.base_url!r}; is it an OpenAI-compatible chat-completions server?"
        if reason == "body_too_large":
            return f"the reply is larger than max_response_bytes={c.max_response_bytes}"
        if reason == "image_error":
            return "the first dataset item's images could not be encoded for the judge"
        return f"the request failed ({reason})"

    def __repr__(self) -> str:
        return (f"ProcessReward(name={self.name!r}, weight={self.weight!r}, client={self.client!r}, "
                f"template={self.template.version!r}, group_judging={self.group_judging!r})")
