"""Rewards for GRPO on vision-language models (PathVLM-R1): accuracy, format, and the
cross-modal process reward scored by an LLM judge, and DAPO's soft overlong punishment
(``OverlongPenalty``, docs/algorithms.md); plain TRL-style reward functions run through
``FunctionReward``. See docs/rewards.md."""
from rewards.accuracy import AccuracyReward
from rewards.base import AsyncReward, Reward, RewardError, RewardSample
from rewards.format_reward import FormatReward
from rewards.functions import FunctionReward, TrainerState, as_rewards
from rewards.judge.client import JudgeClient, JudgeError
from rewards.judge.config import JudgeConfig
from rewards.judge.parse import Verdict, VerdictError, parse_verdict
from rewards.judge.prompt import PromptTemplate, default_template
from rewards.overlong import OverlongPenalty
from rewards.process import ProcessReward
from rewards.runner import score_all

__all__ = [
    "AccuracyReward", "AsyncReward", "FormatReward", "FunctionReward", "JudgeClient", "JudgeConfig", "JudgeError",
    "OverlongPenalty", "ProcessReward", "PromptTemplate", "Reward", "RewardError", "RewardSample", "Verdict",
    "VerdictError", "TrainerState", "as_rewards", "default_template", "parse_verdict", "score_all",
    "start_local_judge",
]


def __getattr__(name: str):
    # Imported on first use, not here: ``python -m rewards.judge.server`` imports this package
    # first, and runpy warns when the module it is about to run is already in sys.modules.
    if name == "start_local_judge":
        from rewards.judge.server import start_local_judge
        return start_local_judge
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")
