"""GRPO for vision-language models.

    from grpo import GRPOTrainer, GRPOConfig

``grpo.core`` holds the maths as pure tensor functions; ``grpo.trainer`` the loop.
"""
from .config import GRPOConfig
from .trainer import GRPOTrainer

__all__ = ["GRPOConfig", "GRPOTrainer"]
