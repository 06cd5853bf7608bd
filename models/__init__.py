"""Model loading and adapters (Qwen2.5-VL first), and the tiny offline Qwen2.5-VL builder."""
from .adapter import PromptBatch, QwenVLAdapter
from .loading import (ModelConfig, freeze_vision, load_model_and_processor, load_policy, load_reference,
                      pick_attn_implementation, pick_dtype)
from .processor import ImageOnlyQwen2_5_VLProcessor, load_processor
from .tiny import TinySpec, build_tiny_checkpoint, ensure_tiny_checkpoint
from .tokenization import default_corpus

__all__ = ["PromptBatch", "QwenVLAdapter", "ModelConfig", "freeze_vision", "load_model_and_processor",
           "load_policy", "load_reference", "pick_attn_implementation", "pick_dtype",
           "ImageOnlyQwen2_5_VLProcessor", "load_processor", "TinySpec", "build_tiny_checkpoint",
           "ensure_tiny_checkpoint", "default_corpus"]
