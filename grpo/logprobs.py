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

from models import reuse
from models.adapter import PromptBatch, backbone_and_head, forward_inputs, with_dummy_image_row


MAX_CHUNK_LOGITS = 2 ** 26  # logits per chunk (256 MiB in fp32)


def _out_features(head: nn.Module) -> int:
    size = getattr(head, "out_features", None)
    return int(size) if size else 1


def _head_chunk(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, temperature: float):
    """hidden (R, H), ids (R,) -> (log-prob of ids (R,), entropy (R,)), logits scaled by 1/temperature.

    At most two (R, V) buffers live at once (the logits and one work buffer: logsumexp's, then the
    entropy's, filled in place), so the head's peak stays about 2 x R x V x 4 bytes."""
    logits = head(hidden).float()                                        # (R, V)
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)                                # (R,)
    logp = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse        # (R,)
    with torch.no_grad():  # entropy is a metric; no gradient through it
        plogp = (logits - lse.unsqueeze(-1)).exp_().mul_(logits)         # p * logit, in place
        entropy = lse - plogp.sum(-1)
    return logp, entropy


def token_logprobs_from_hidden(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
                               temperature: float = 1.0, chunk_size: int = 1024):
    """hidden (N, T, H) predicting ids (N, T) -> (logp (N, T), entropy (N, T)).

    Rows are processed ``chunk_size`` at a time, and never more than ``MAX_CHUNK_LOGITS`` logits at
    a time; with grad enabled each chunk is checkpointed.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    n, t, h = hidden.shape
    flat_h, flat_ids = hidden.reshape(n * t, h), ids.reshape(n * t)
    # Bound the logits of one chunk, whatever the vocabulary: at Qwen's 151,936 rows a 1,024-row
    # chunk alone is 622 MB of fp32 logits, and its backward holds several such buffers.
    chunk_size = max(1, min(chunk_size, MAX_CHUNK_LOGITS // _out_features(head)))
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

    def forward(self, completion_ids: torch.Tensor, temperature: float = 1.0,
                prompts: PromptBatch | None = None, completion_mask: torch.Tensor | None = None, **inputs):
        """completion_ids (N, T) -> logp (N, T), entropy (N, T). Either ``inputs``: the adapter's
        ``forward_inputs`` over prompt + completion (N, P + T), every row on its own; or ``prompts``
        (N rows, ``prompts.unique`` set) and ``completion_mask`` (N, T): each distinct prompt is then
        run once and its KV cache shared by its rows (``shared_prefix_hidden``)."""
        backbone, head = backbone_and_head(self.model)
        if prompts is not None:
            if self.can_share_prefix():
                hidden = shared_prefix_hidden(self.model, prompts, completion_ids, completion_mask)
                return token_logprobs_from_hidden(head, hidden, completion_ids, temperature, self.chunk_size)
            inputs = forward_inputs(prompts, completion_ids, completion_mask)
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

    def can_share_prefix(self) -> bool:
        """Not under ZeRO-3 (every rank must run the same modules in the same order, see
        ``with_dummy_image_row``) nor with activation checkpointing (transformers then drops the KV
        cache in training mode); the plain path is used there."""
        name = ("is_activation_checkpointing" if hasattr(self.model, "is_activation_checkpointing")
                else "is_gradient_checkpointing")  # the first is transformers >= 5.2's name
        checkpointing = getattr(self.model, name, False)
        return not self.sync_vision and not checkpointing


def shared_prefix_hidden(model: nn.Module, prompts: PromptBatch, completion_ids: torch.Tensor,
                         completion_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states (n, T, H) that predict ``completion_ids`` (n, T), running each distinct prompt once.

    The b distinct prompts among the n rows run alone (b, P) with a KV cache; the cache is indexed to
    the n rows (differentiable: gradients of all G copies add up in the shared prompt pass) and the
    completions (n, T) run on it. Position i of the result predicts completion token i: token 0 is
    predicted by the prompt's last position, token i > 0 by completion position i - 1.
    """
    backbone, _ = backbone_and_head(model)
    distinct, row_of = torch.unique(prompts.prompt_index, sorted=True, return_inverse=True)
    inputs = reuse.prompt_inputs(model, prompts.unique, distinct, reuse_features=reuse.vision_frozen(model))
    row_of = row_of.to(inputs["input_ids"].device)
    out = backbone(**inputs, use_cache=True, return_dict=True)
    cache = out.cache
    cache.batch_select_indices(row_of)                                           # (b, ...) -> (n, ...)
    t = completion_ids.shape[1]
    mask = torch.cat([inputs["attention_mask"][row_of], completion_mask.to(inputs["attention_mask"].dtype)], 1)
    positions = reuse.continuation_positions(inputs["position_ids"][:, row_of], t)
    last = out.last_hidden_state[row_of, -1:]                                    # (n, 1, H)
    if t == 1:
        return last
    comp = backbone(input_ids=completion_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :, :-1],
                    cache=cache, use_cache=False, return_dict=True).last_hidden_state  # (n, T-1, H)
    return torch.cat([last, comp], 1)
