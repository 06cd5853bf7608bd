"""Group sampling: each prompt repeated G times, sampled, cut at the first EOS.

The sampling distribution is the model's softmax(logits / temperature) with optional top-p /
top-k, and with the vision placeholder tokens suppressed. The checkpoint's own generation config
(Qwen2.5-VL-Instruct ships top_k=1, temperature=0.1, repetition_penalty=1.05) is ignored, so a
rollout samples exactly what GRPOConfig says.

The G samples of a prompt share everything up to their first new token, so ``decode_shared``
encodes each prompt's image and prefills the prompt once, then copies the KV cache to the G rows
(the prefix sharing of vLLM's automatic prefix caching and SGLang's RadixAttention, done here for
the one prefix a GRPO group is known to share). Decoding is a plain loop over new tokens, each
step one batched forward; ``sample_hf`` is the same distribution through ``generate``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import GenerationConfig

from models import reuse
from models.adapter import PromptBatch, backbone_and_head


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
    """The Hugging Face ``generate`` equivalent of ``sample``'s distribution (used by ``sample_hf``)."""
    common = dict(max_new_tokens=cfg.max_completion_length, eos_token_id=adapter.eos_token_ids,
                  pad_token_id=adapter.pad_token_id, suppress_tokens=adapter.never_sample_ids,
                  repetition_penalty=1.0, use_cache=True)
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k if cfg.top_k > 0 else None, **common)


def next_tokens(logits: torch.Tensor, cfg, suppress: torch.Tensor, greedy: bool = False) -> torch.Tensor:
    """logits (n, V) fp32 -> sampled ids (n,). The order of transformers' processors and warpers:
    suppress, temperature, top-k, top-p (smallest set with mass >= top_p, at least one token)."""
    logits = logits.index_fill(-1, suppress, float("-inf"))
    if greedy:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)                        # ascending
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - cfg.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


@torch.no_grad()
def decode_shared(model, adapter, prompts: PromptBatch, cfg, greedy: bool = False,
                  return_logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample one completion per row of ``prompts`` (``prompts.unique`` set), prefilling each
    distinct prompt once and sharing its KV cache among the rows that copy it.

    Returns ids (n, T') with T' <= max_completion_length (stops when every row has emitted EOS;
    pad after EOS) and, if asked, the log-prob (n, T') of each sampled token under
    softmax(logits / temperature), the quantity ``grpo.logprobs`` recomputes.
    One forward per new token over all n rows; no Python loop over rows or vocabulary.
    """
    backbone, head = backbone_and_head(model)
    distinct, row_of = torch.unique(prompts.prompt_index, sorted=True, return_inverse=True)
    inputs = reuse.prompt_inputs(model, prompts.unique, distinct, reuse_features=True)  # no grad here
    device = inputs["input_ids"].device
    row_of = row_of.to(device)
    out = backbone(**inputs, use_cache=True, return_dict=True)                   # prefill (b, P)
    n, t_max, p = len(row_of), cfg.max_completion_length, inputs["input_ids"].shape[1]
    cache = out.cache
    cache.batch_select_indices(row_of)                                           # (b, ...) -> (n, ...)
    reuse.reserve(cache, t_max)                                                  # decode writes in place
    hidden = out.last_hidden_state[row_of, -1]                                   # (n, H)
    mask = torch.ones((n, p + t_max), dtype=inputs["attention_mask"].dtype, device=device)
    mask[:, :p] = inputs["attention_mask"][row_of]
    start = reuse.continuation_positions(inputs["position_ids"][:, row_of], 1)  # (3, n, 1)
    suppress = torch.tensor(adapter.never_sample_ids, device=device, dtype=torch.long)
    eos = torch.tensor(adapter.eos_token_ids, device=device)
    ids = torch.full((n, t_max), adapter.pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros((n, t_max), device=device) if return_logprobs else None
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for t in range(t_max):
        logits = head(hidden).float()                                            # (n, V)
        tok = next_tokens(logits, cfg, suppress, greedy)
        if return_logprobs:
            logps[:, t] = (logits / cfg.temperature).log_softmax(-1).gather(-1, tok[:, None]).squeeze(1)
        ids[:, t] = torch.where(done, adapter.pad_token_id, tok)
        done |= torch.isin(tok, eos)
        if t == t_max - 1 or bool(done.all()):  # one host sync per token, as in transformers
            break
        hidden = backbone(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :p + t + 1], position_ids=start + t,
                          cache=cache, use_cache=True, return_dict=True).last_hidden_state[:, -1]
    width = t + 1
    return ids[:, :width], (logps[:, :width] if return_logprobs else None)


@torch.no_grad()
def sample(model, adapter, prompts: PromptBatch, cfg, chunk: int | None = None,
           greedy: bool = False) -> Completions:
    """Generate one completion per row of ``prompts`` (already repeated G times), ``chunk`` rows
    per call; returns completions padded to a common length.

    When ``prompts`` knows its distinct prompts (``PromptBatch.repeat_interleave``) and
    ``cfg.reuse_prompts`` (default True), each distinct prompt's image is encoded and its prompt
    prefilled once for its G samples (``decode_shared``). Otherwise each row is its own prompt.
    """
    if prompts.unique is None or not getattr(cfg, "reuse_prompts", True):  # every row on its own
        pixel_values, grid = prompts.images()
        own = replace(prompts, pixel_values=pixel_values, image_grid_thw=grid, prompt_index=None, unique=None, cache={})
        prompts = replace(own, pixel_values=None, image_grid_thw=None, prompt_index=torch.arange(len(prompts)),
                          unique=own)
    return _in_chunks(model, prompts, chunk, adapter, lambda part: decode_shared(model, adapter, part, cfg, greedy)[0])


@torch.no_grad()
def sample_hf(model, adapter, prompts: PromptBatch, cfg, chunk: int | None = None,
              greedy: bool = False) -> Completions:
    """``sample`` through Hugging Face ``generate`` on every row (no sharing): the reference that
    ``decode_shared`` is tested against, and the "before" of ``bench/``."""
    gen_cfg = generation_config(cfg, adapter, greedy)

    def run(part):
        out = model.generate(**adapter.generate_inputs(part), generation_config=gen_cfg)
        return out[:, part.input_ids.shape[1]:]
    return _in_chunks(model, prompts, chunk, adapter, run)


def _in_chunks(model, prompts: PromptBatch, chunk: int | None, adapter, run) -> Completions:
    """``run`` on consecutive row chunks of ``prompts`` in eval mode; pad, mask after EOS."""
    chunk = chunk or len(prompts)
    was_training = model.training
    model.eval()
    pieces = []
    try:
        for start in range(0, len(prompts), chunk):
            pieces.append(run(prompts.select(list(range(start, min(start + chunk, len(prompts)))))))
    finally:
        model.train(was_training)
    width = max(p.shape[1] for p in pieces)
    ids = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=adapter.pad_token_id)
                     for p in pieces])
    mask, truncated = mask_after_eos(ids, adapter.eos_token_ids)
    return Completions(ids, mask, truncated)
