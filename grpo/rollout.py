"""Group sampling: each prompt repeated G times, sampled, cut at the first EOS.

The sampling distribution is the model's softmax(logits / temperature) with optional top-p /
top-k, and with the vision placeholder tokens suppressed. The checkpoint's own generation config
(Qwen2.5-VL-Instruct ships top_k=1, temperature=0.1, repetition_penalty=1.05) is replaced by an
explicit one, so a rollout samples exactly what GRPOConfig says.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from models.adapter import PromptBatch


@dataclass
class Completions:
    """ids, mask: (N, T); mask is 1 up to and including the first EOS. truncated: (N,) bool,
    True where the sample hit max_completion_length without emitting EOS."""
    ids: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:  # (N,)
        return self.mask.sum(1)


def mask_after_eos(ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (N, T) -> (mask (N, T) int, truncated (N,) bool). Tokens after the first EOS (padding
    or anything else) are masked out; a row with no EOS keeps all T tokens and is truncated."""
    is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device))          # (N, T)
    has_eos = is_eos.any(1)                                                     # (N,)
    first = torch.where(has_eos, is_eos.int().argmax(1), torch.full_like(has_eos, ids.shape[1], dtype=torch.long))
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)     # (1, T)
    mask = (positions <= first.unsqueeze(1)).int()
    return mask, ~has_eos


def generation_config(cfg, adapter, greedy: bool = False) -> GenerationConfig:
    common = dict(max_new_tokens=cfg.max_completion_length, eos_token_id=adapter.eos_token_ids,
                  pad_token_id=adapter.pad_token_id, suppress_tokens=adapter.never_sample_ids,
                  repetition_penalty=1.0, use_cache=True)
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k if cfg.top_k > 0 else None, **common)


@torch.no_grad()
def sample(model, adapter, prompts: PromptBatch, cfg, chunk: int | None = None,
           greedy: bool = False) -> Completions:
    """Generate one completion per row of ``prompts`` (already repeated G times), ``chunk`` rows
    per ``generate`` call; returns completions padded to a common length."""
    gen_cfg = generation_config(cfg, adapter, greedy)
    chunk = chunk or len(prompts)
    was_training = model.training
    model.eval()
    pieces = []
    try:
        for start in range(0, len(prompts), chunk):
            part = prompts.select(list(range(start, min(start + chunk, len(prompts)))))
            out = model.generate(**adapter.generate_inputs(part), generation_config=gen_cfg)
            pieces.append(out[:, part.input_ids.shape[1]:])
    finally:
        model.train(was_training)
    width = max(p.shape[1] for p in pieces)
    ids = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=adapter.pad_token_id)
                     for p in pieces])
    mask, truncated = mask_after_eos(ids, adapter.eos_token_ids)
    return Completions(ids, mask, truncated)
