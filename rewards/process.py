"""ProcessReward: the paper's cross-modal process reward, scored by an LLM judge.

The judge sees the question, the image(s), the full completion, the reference answer and the
evaluation criteria, and returns *integrity* (are the required reasoning steps there) and
*knowledge* (are its claims correct), scored as the PathVLM-R1 authors' judge does: each starts
at 1 and loses 0.4 per missing step or per error, clipped to [0, 1]. The reward is their mean.
"""
from __future__ import annotations

from rewards.base import AsyncReward, RewardSample
from rewards.judge.client import JudgeClient, JudgeError
from rewards.judge.config import JudgeConfig
from rewards.judge.prompt import PromptTemplate, default_template


class ProcessReward(AsyncReward):
    """Mean of the judge's integrity and knowledge scores.

    Args:
        judge: a :class:`JudgeConfig` (a client is created) or a shared :class:`JudgeClient`.
        template: the judge prompt; defaults to ``process-v2`` (rewards/judge/prompts/process_v2.txt).

    A judgment that fails after retries follows ``judge.config.on_failure``: ``None`` (abstain),
    ``0.0``, or :class:`JudgeError` is raised.
    """

    name = "process"

    def __init__(self, judge: JudgeConfig | JudgeClient | None = None, template: PromptTemplate | None = None,
                 name: str | None = None, weight: float | None = None):
        super().__init__(name, weight)
        if judge is None:
            judge = JudgeConfig()
        self.client = judge if isinstance(judge, JudgeClient) else JudgeClient(judge)
        self.template = template or default_template()

    async def ascore(self, sample: RewardSample) -> float | None:
        try:
            verdict = await self.client.judge(sample, self.template)
        except JudgeError:
            policy = self.client.config.on_failure
            if policy == "raise":
                raise
            return 0.0 if policy == "zero" else None
        return verdict.score

    def metrics(self) -> dict[str, float]:
        return self.client.ledger.snapshot("judge/")

    def __repr__(self) -> str:
        return (f"ProcessReward(name={self.name!r}, weight={self.weight!r}, client={self.client!r}, "
                f"template={self.template.version!r})")
