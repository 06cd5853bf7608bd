"""GRPO algorithm core: pure tensor functions (no model / tokenizer / config objects).

This module holds the logit-level helpers and re-exports the rest:

* :mod:`grpo.advantages`: ``group_advantages``, ``combine_rewards``, ``ADVANTAGE_SCALES``
* :mod:`grpo.losses`: ``kl_penalty``, ``policy_loss``, ``grpo_token_loss``,
  ``aggregate_loss``, ``masked_mean``, ``KL_ESTIMATORS``, ``RATIO_LEVELS``, ``LOSS_AGGREGATIONS``
* here: ``selective_log_softmax``, ``entropy_from_logits``

Formulas, conventions and references: docs/algorithms.md.
"""
from __future__ import annotations


import torch
from torch import Tensor

from grpo.advantages import ADVANTAGE_SCALES, combine_rewards, group_advantages, register_advantage_scale
from grpo.losses import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    RATIO_LEVELS,
    aggregate_loss,
    grpo_token_loss,
    kl_penalty,
    masked_mean,
    masked_sum,
    policy_loss,
    register_kl_estimator,
    register_loss_aggregation,
    register_ratio_level,
)

__all__ = [
    "ADVANTAGE_SCALES", "KL_ESTIMATORS", "RATIO_LEVELS", "LOSS_AGGREGATIONS",
    "register_advantage_scale", "register_kl_estimator", "register_ratio_level", "register_loss_aggregation",
    "group_advantages", "combine_rewards", "kl_penalty", "policy_loss", "grpo_token_loss",
    "aggregate_loss", "masked_mean", "masked_sum", "selective_log_softmax", "entropy_from_logits",
]

DEFAULT_CHUNK_ROWS = 256  # rows (token positions) per chunk: 256 x 152k vocab x 4 B ~ 150 MB in fp32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # logsumexp over a ~150k vocabulary in bf16/fp16 is too coarse: work in fp32 chunk by chunk.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log_softmax(logits / temperature).gather(-1, index), chunked in forward AND backward.

    Forward keeps only the per-row logsumexp ``(rows,)``; backward recomputes the softmax one
    chunk at a time: d out_r / d z_{r,v} = (1[v = index_r] - softmax(z_r / tau)_v) / tau.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, chunk_size: int, temperature: float) -> Tensor:
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)                             # (R, V), R = N*T
        idx = index.reshape(-1, 1).long()                        # (R, 1)
        cdt = _compute_dtype(logits.dtype)
        out = torch.empty(flat.shape[0], dtype=cdt, device=logits.device)   # (R,)
        lse = torch.empty_like(out)                                          # (R,)
        for s in range(0, flat.shape[0], chunk_size):
            z = flat[s:s + chunk_size].to(cdt)                   # (C, V)
            if temperature != 1.0:
                z = z / temperature
            lse[s:s + chunk_size] = torch.logsumexp(z, dim=-1)
            out[s:s + chunk_size] = z.gather(-1, idx[s:s + chunk_size]).squeeze(-1) - lse[s:s + chunk_size]
        ctx.save_for_backward(logits, idx, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out.view(index.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, idx, lse = ctx.saved_tensors
        V, cs, tau = logits.shape[-1], ctx.chunk_size, ctx.temperature
        flat = logits.reshape(-1, V)                             # (R, V)
        cdt = lse.dtype
        go = grad_out.reshape(-1, 1).to(cdt)                     # (R, 1)
        grad = torch.empty_like(flat)                            # (R, V), logits dtype
        for s in range(0, flat.shape[0], cs):
            z = flat[s:s + cs].to(cdt)
            if tau != 1.0:
                z = z / tau
            g = -torch.exp(z - lse[s:s + cs, None]) * go[s:s + cs]   # (C, V): -p * grad
            g.scatter_add_(-1, idx[s:s + cs], go[s:s + cs])          # + 1[v = index] * grad
            if tau != 1.0:
                g = g / tau
            grad[s:s + cs] = g.to(grad.dtype)
        return grad.view_as(logits), None, None, None


def selective_log_softmax(
    logits: Tensor, index: Tensor, chunk_size: int = DEFAULT_CHUNK_ROWS, temperature: float = 1.0
) -> Tensor:
    """Log-probabilities of the chosen tokens without a full log-softmax tensor.

    Args:
        logits: ``(N, T, V)`` (any leading dims ``(..., V)``).
        index: ``(N, T)`` (``(...)``) token ids.
        chunk_size: rows (token positions) processed at once; peak extra memory is
            ``chunk_size x V`` in forward and backward (plus the ``(N, T, V)`` gradient itself).
        temperature: logits are divided by it first (use the sampling temperature so the
            log-probs are those of the distribution the completions were sampled from).

    Returns:
        ``(N, T)``: ``log_softmax(logits / temperature)[..., index]``. fp32 for fp16/bf16
        logits (computed chunk-wise in fp32), else ``logits.dtype``. Differentiable w.r.t.
        ``logits`` (first-order).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"index shape {tuple(index.shape)} != logits.shape[:-1] {tuple(logits.shape[:-1])}")
    return _SelectiveLogSoftmax.apply(logits, index, int(max(1, chunk_size)), float(temperature))


def entropy_from_logits(
    logits: Tensor, chunk_size: int = DEFAULT_CHUNK_ROWS, temperature: float = 1.0
) -> Tensor:
    """Entropy of softmax(logits / temperature) per position, ``(N, T, V) -> (N, T)``.

    ``H = -sum_v p_v log p_v`` with ``log p = log_softmax`` (stable: no exp of raw logits),
    computed ``chunk_size`` rows at a time; ``-inf`` logits (masked vocab) contribute 0.
    fp32 result for fp16/bf16 input. Differentiable, but meant for metrics (wrap in no_grad).
    """
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)                                 # (R, V)
    cdt = _compute_dtype(logits.dtype)
    parts = []
    for s in range(0, flat.shape[0], max(1, chunk_size)):
        z = flat[s:s + chunk_size].to(cdt) / temperature         # (C, V)
        logp = torch.log_softmax(z, dim=-1)
        # p * log p with p = 0 and log p = -inf would be NaN: clamp log p to the finite range.
        parts.append(-(logp.exp() * logp.clamp(min=torch.finfo(cdt).min)).sum(-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=cdt)
    return out.view(logits.shape[:-1])
