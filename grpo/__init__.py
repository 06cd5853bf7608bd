"""GRPO for vision-language models.

    from grpo import GRPOTrainer, GRPOConfig

``grpo.core`` holds the maths as pure tensor functions; ``grpo.trainer`` the loop. The package
level is the public API: the trainers and their configs, evaluation, and the two helpers a
launcher needs (``init_distributed``, ``default_device``). See docs/architecture.md.
"""
from .base import PreflightError
from .checkpoint import CheckpointWriteError
from .config import GRPOConfig, SFTConfig
from .engine import default_device, init_distributed
from .evaluate import EvalResult, Prediction, claim_balance, evaluate, letter_baselines
from .samples import default_reward_sample
from .sft import SFTTrainer
from .trainer import GRPOTrainer

__all__ = ["GRPOConfig", "GRPOTrainer", "SFTConfig", "SFTTrainer", "EvalResult", "Prediction", "claim_balance", "evaluate",
           "letter_baselines",
           "default_device", "init_distributed", "default_reward_sample", "PreflightError", "CheckpointWriteError"]
