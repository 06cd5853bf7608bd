"""Group sampling: each prompt repeated G times, sampled, cut at the first EOS.

The sampling distribution is the model's softmax(logits / temperature) with optional top-p /
top-k, and with the vision placeholder tokens suppressed (``next_tokens``). The checkpoint's own
generation config (Qwen2.5-VL-Instruct ships top_k=1, temperature=0.1, repetition_penalty=1.05) is
ignored, so a rollout samples exactly what GRPOConfig says.

The decode loop itself (prefill, the KV cache shared by the G samples of a prompt, M-RoPE
positions of the new tokens) is the adapter's ``sample_continuations``; this module hands it the
token choice as a function of the logits.

``sample_informative_groups`` is DAPO's dynamic sampling loop: generation rounds until every rank
holds enough groups with reward spread, with the ranks in step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from models.adapter import PromptBatch

from .core import select_groups


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


def token_chooser(cfg, never_sample_ids: list[int], greedy: bool = False, logprobs: list | None = None):
    """``choose(logits (n, V) fp32) -> ids (n,)`` for the adapter's decode loop: ``next_tokens`` with
    ``never_sample_ids`` suppressed. With a list ``logprobs``, each step appends the log-probs (n,)
    of the chosen tokens under softmax(logits / temperature)."""
    suppress = None

    def choose(logits: torch.Tensor) -> torch.Tensor:
        nonlocal suppress
        if suppress is None:
            suppress = torch.tensor(never_sample_ids, device=logits.device, dtype=torch.long)
        tok = next_tokens(logits, cfg, suppress, greedy)
        if logprobs is not None:
            logprobs.append((logits / cfg.temperature).log_softmax(-1).gather(-1, tok[:, None]).squeeze(1))
        return tok
    return choose


@torch.no_grad()
def decode_shared(model, adapter, prompts: PromptBatch, cfg, greedy: bool = False,
                  return_logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample one completion per row of ``prompts`` (``prompts.unique`` set), each distinct prompt
    prefilled once and its KV cache shared among the rows that copy it (the adapter's
    ``sample_continuations``).

    Returns ids (n, T') with T' <= max_completion_length (stops when every row has emitted EOS;
    pad after EOS) and, if asked, the log-prob (n, T') of each sampled token under
    softmax(logits / temperature), the quantity ``CompletionLogProbs`` recomputes.
    """
    logps: list | None = [] if return_logprobs else None
    choose = token_chooser(cfg, adapter.never_sample_ids, greedy, logps)
    ids = adapter.sample_continuations(model, prompts, choose, cfg.max_completion_length)
    return ids, (torch.stack(logps, 1) if return_logprobs else None)


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
        prompts = prompts.rows_as_prompts()
    return in_chunks(model, prompts, chunk, adapter, lambda part: decode_shared(model, adapter, part, cfg, greedy)[0])


def in_chunks(model, prompts: PromptBatch, chunk: int | None, adapter, run) -> Completions:
    """``run(part) -> ids`` on consecutive row chunks of ``prompts`` in eval mode; pad, mask after EOS."""
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


def sample_informative_groups(generate: Callable[[int], torch.Tensor], needed: int, max_extra_rounds: int,
                              all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]):
    """Dynamic sampling (DAPO, arXiv 2503.14476): generation attempts until this step's batch can
    be filled with informative groups, every rank doing the same number of attempts.

    Args:
        generate: ``generate(attempt) -> informative (B_a,) bool``: generates and scores attempt
            ``attempt`` (0 = the round's own prompts, then 1, 2, ...) on this rank and keeps what it
            made; True marks a group with reward spread.
        needed: groups this rank's batch holds (``prompts_per_step``).
        max_extra_rounds: attempts after the first at most.
        all_reduce_sum: sums a tensor over ranks (identity in one process).

    The decision is global: after each attempt one all-reduce of ``[ranks still short of
    informative groups, informative groups of this attempt, groups of this attempt]``. Groups never
    move between ranks (each rank's batch keeps B groups, so micro-batching is unchanged), so
    another attempt is made while ANY rank is short and fewer than ``max_extra_rounds`` extra
    attempts were made. Every rank sees the same sums and stops at the same attempt, so collective
    work inside an attempt (ZeRO-3's gathered generation) stays matched. A rank that already has
    enough still generates in the extra attempts; its surplus is discarded.

    Returns:
        picks: ``select_groups(informative, needed)``: (attempt, group) pairs, generation order.
        stats: ``zero_std_fraction`` (of the first attempt's groups, all ranks: before refilling),
        ``extra_rounds``, ``filled_frac`` (this rank's share of zero-std groups put back because
        the informative ones ran out; the mean over ranks is the global share, all ranks holding
        ``needed`` groups), ``generated_groups`` (all ranks, all attempts).
    """
    informative: list[torch.Tensor] = []
    first = None
    generated = 0.0
    for attempt in range(max_extra_rounds + 1):
        flags = generate(attempt).bool().cpu()
        informative.append(flags)
        have = sum(int(f.sum()) for f in informative)
        sums = all_reduce_sum(torch.tensor([float(have < needed), float(flags.sum()), float(len(flags))]))
        sums = sums.cpu()
        generated += float(sums[2])
        if first is None:
            first = sums
        if sums[0] == 0:
            break
    picks, filled = select_groups(informative, needed)
    stats = {"zero_std_fraction": float(1.0 - first[1] / first[2].clamp(min=1)), "extra_rounds": float(attempt),
             "filled_frac": filled / needed, "generated_groups": generated}
    return picks, stats
