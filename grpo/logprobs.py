"""Per-token log-probs of sampled completions, without a full-vocabulary log-softmax.

A forward pass gives hidden states (N, P + T, H). Only the T positions that predict completion
tokens matter; their logits (N, T, V) would be 2.4 GB in fp32 for N = 16, T = 192 at Qwen's
V = 151,936, and a log-softmax over them another 2.4 GB. Here the output projection runs over
chunks of rows; each chunk keeps only the chosen token's log-prob and the row's entropy, and under
autograd each chunk is checkpointed, so the backward pass recomputes one chunk's logits at a time.
Peak memory for the head is then O(chunk_size x V) instead of O(N x T x V).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.adapter import backbone_and_head, with_dummy_image_row


def _head_chunk(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, temperature: float):
    """hidden (R, H), ids (R,) -> (log-prob of ids (R,), entropy (R,)), logits scaled by 1/temperature."""
    logits = head(hidden).float() / temperature                          # (R, V)
    lse = torch.logsumexp(logits, dim=-1)                                # (R,)
    logp = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse        # (R,)
    with torch.no_grad():  # entropy is a metric; no gradient through it
        probs = torch.softmax(logits, dim=-1)
        entropy = lse - (probs * logits).sum(-1)
    return logp, entropy


def token_logprobs_from_hidden(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
                               temperature: float = 1.0, chunk_size: int = 1024):
    """hidden (N, T, H) predicting ids (N, T) -> (logp (N, T), entropy (N, T)).

    Rows are processed ``chunk_size`` at a time; with grad enabled each chunk is checkpointed.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    n, t, h = hidden.shape
    flat_h, flat_ids = hidden.reshape(n * t, h), ids.reshape(n * t)
    logps, ents = [], []
    for start in range(0, n * t, chunk_size):
        hs, ix = flat_h[start:start + chunk_size], flat_ids[start:start + chunk_size]
        if torch.is_grad_enabled() and hs.requires_grad:
            lp, ent = checkpoint(_head_chunk, head, hs, ix, temperature, use_reentrant=False)
        else:
            lp, ent = _head_chunk(head, hs, ix, temperature)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        empty = hidden.new_zeros(n, t, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps).view(n, t), torch.cat(ents).view(n, t)


class CompletionLogProbs(nn.Module):
    """Wraps a causal VLM so that ``forward`` returns completion log-probs and entropies.

    The DeepSpeed engine wraps this module (not the bare model), so ZeRO-3's parameter hooks and
    the engine's bookkeeping see every forward, while the full-vocabulary logits are never built.
    ``self.model`` is the Hugging Face model (used as is for generation and saving).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, sync_vision: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.sync_vision = sync_vision  # ZeRO-3: run the vision tower even without images

    def forward(self, completion_ids: torch.Tensor, temperature: float = 1.0, **inputs):
        """inputs: the adapter's ``forward_inputs`` over prompt + completion (N, P + T);
        completion_ids (N, T) -> logp (N, T), entropy (N, T)."""
        backbone, head = backbone_and_head(self.model)
        n, t = completion_ids.shape
        dummy = self.sync_vision and inputs.get("pixel_values") is None
        if dummy:
            inputs = with_dummy_image_row(inputs, self.model.config)
            inputs["pixel_values"] = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
        out = backbone(**inputs, use_cache=False, return_dict=True)
        hidden = out.last_hidden_state[:, -t - 1:-1]        # (N, T, H): position i predicts token i+1
        if dummy:  # drop the row, keep it in the graph so the backward pass matches other ranks
            hidden = hidden[:n] + 0.0 * hidden[n:].sum()
        return token_logprobs_from_hidden(head, hidden, completion_ids, temperature, self.chunk_size)
