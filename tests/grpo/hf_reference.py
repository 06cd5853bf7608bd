"""Hugging Face ``generate`` as the reference sampler: the distribution of ``grpo.rollout.sample``
through transformers' own decoding, every row on its own (no prefix sharing).

Test-only: ``tests/grpo/test_reuse_prefix.py`` checks the adapter's decode loop against it, and
``bench/harness.py`` (run from a checkout) imports it as the "before" of the step benchmarks.
"""
from __future__ import annotations

import torch
from transformers import GenerationConfig

from grpo.rollout import Completions, in_chunks
from models.adapter import PromptBatch


def generation_config(cfg, adapter, greedy: bool = False) -> GenerationConfig:
    """The Hugging Face ``generate`` equivalent of ``sample``'s distribution."""
    common = dict(max_new_tokens=cfg.max_completion_length, eos_token_id=adapter.eos_token_ids,
                  pad_token_id=adapter.pad_token_id, suppress_tokens=adapter.never_sample_ids,
                  repetition_penalty=1.0, use_cache=True)
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k if cfg.top_k > 0 else None, **common)


@torch.no_grad()
def sample_hf(model, adapter, prompts: PromptBatch, cfg, chunk: int | None = None,
              greedy: bool = False) -> Completions:
    """``grpo.rollout.sample`` through Hugging Face ``generate`` on every row (no sharing); same
    signature, so it can replace ``GRPOTrainer.sampler``."""
    gen_cfg = generation_config(cfg, adapter, greedy)

    def run(part):
        out = model.generate(**adapter.generate_inputs(part), generation_config=gen_cfg)
        return out[:, part.input_ids.shape[1]:]
    return in_chunks(model, prompts, chunk, adapter, run)
