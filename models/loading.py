"""Load policy and reference models from a local checkpoint folder.

Chooses the attention implementation (flash-attn 2 when it imports and CUDA is present, else
PyTorch SDPA) and dtype (bf16 on GPU, fp32 on CPU), optionally freezes the vision tower and its
patch merger (PathVLM-R1 trains the language model only) and turns on gradient checkpointing.
Only local paths are accepted: nothing here reaches a model hub.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from .processor import load_processor

# model_type -> class; the adapter layer (models.adapter) keeps model quirks out of the trainer.
MODEL_CLASSES = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


@dataclass(frozen=True)
class ModelConfig:
    path: str                           # local checkpoint folder (config.json, weights, processor)
    dtype: str = "auto"                 # "auto" (bf16 on CUDA, fp32 on CPU), "bfloat16", "float16", "float32"
    attn_implementation: str = "auto"   # "auto", "flash_attention_2", "sdpa", "eager"
    freeze_vision: bool = True          # the paper freezes the vision tower and projector
    gradient_checkpointing: bool = False
    min_pixels: int | None = None       # override the processor's limits (paper: 3136)
    max_pixels: int | None = None       # (paper: 65536)


def pick_attn_implementation(requested: str = "auto") -> str:
    """``flash_attention_2`` when flash-attn imports and CUDA is present, else ``sdpa``."""
    flash_ok = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        raise ValueError("attn_implementation='flash_attention_2' needs CUDA and the flash-attn package "
                         "(pip install -e .[gpu]); use 'sdpa' or 'auto' on this machine")
    if requested not in ("flash_attention_2", "sdpa", "eager"):
        raise ValueError(f"attn_implementation={requested!r}: use auto, flash_attention_2, sdpa or eager")
    return requested


def pick_dtype(requested: str = "auto") -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and lose log-prob precision)."""
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        dtype = getattr(torch, requested)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={requested!r}: use auto, bfloat16, float16 or float32")
    return dtype


def _check_local(path: str | Path) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        hint = (" It looks like a hub name; download the checkpoint first and pass its folder."
                if "/" in str(path) and not p.exists() else "")
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no config.json).{hint} "
                                f"A tiny offline one: python -m models.tiny --out PATH")
    return p


def model_class(path: str | Path):
    model_type = AutoConfig.from_pretrained(_check_local(path)).model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported yet "
                         f"(supported: {sorted(MODEL_CLASSES)})")
    return MODEL_CLASSES[model_type]


def freeze_vision(model) -> int:
    """Freeze the vision tower including its patch merger (projector); returns #frozen params."""
    visual = getattr(getattr(model, "model", model), "visual", None)
    if visual is None:
        raise ValueError(f"{type(model).__name__} has no vision tower (model.visual) to freeze")
    n = 0
    for p in visual.parameters():
        p.requires_grad_(False)
        n += p.numel()
    return n


def load_policy(cfg: ModelConfig):
    """The trainable policy, ready for a torch optimizer or ``deepspeed.initialize``."""
    cls = model_class(cfg.path)
    model = cls.from_pretrained(cfg.path, dtype=pick_dtype(cfg.dtype),
                                attn_implementation=pick_attn_implementation(cfg.attn_implementation))
    if cfg.freeze_vision:
        freeze_vision(model)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the cache is rebuilt per generation call anyway
    model.train()
    return model


def load_reference(cfg: ModelConfig):
    """A frozen copy of the starting policy for the KL term (only needed when beta > 0)."""
    cls = model_class(cfg.path)
    model = cls.from_pretrained(cfg.path, dtype=pick_dtype(cfg.dtype),
                                attn_implementation=pick_attn_implementation(cfg.attn_implementation))
    model.requires_grad_(False)
    return model.eval()


def load_model_and_processor(cfg: ModelConfig):
    """(policy, processor) — the usual first line of a training script."""
    return load_policy(cfg), load_processor(cfg.path, cfg.min_pixels, cfg.max_pixels)
