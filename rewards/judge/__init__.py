"""The LLM judge behind the process reward: an async client for any OpenAI-compatible server,
its configuration, judgment cache, usage ledger and rate limiter, the versioned prompts (per
chain and group-wise), the verdict parser, a local judge server (``python -m rewards.judge.server``)
with its deterministic rubric, and a reward-hacking audit for any judge
(``python -m rewards.judge.audit``). See docs/rewards.md."""
from rewards.judge.client import JudgeClient, JudgeError
from rewards.judge.config import JudgeConfig
from rewards.judge.parse import (IncompleteGroupVerdict, ScoreOutOfRange, Verdict, VerdictError,
                                 parse_group_verdict, parse_verdict)
from rewards.judge.prompt import PromptTemplate, default_group_template, default_template

__all__ = ["IncompleteGroupVerdict", "JudgeClient", "JudgeConfig", "JudgeError", "PromptTemplate",
           "ScoreOutOfRange", "Verdict", "VerdictError", "default_group_template", "default_template",
           "parse_group_verdict", "parse_verdict"]
