"""``CompletionLogProbs``: the module the back-end (PyTorch or DeepSpeed) wraps and calls for every
forward of a step: completion log-probs and entropies, without full-vocabulary logits.

The model work (one pass per row, or each distinct prompt prefilled once with a shared KV cache)
is the adapter's ``completion_hidden``; the maths is ``grpo.core.token_logprobs_from_hidden``, the
output projection applied chunk by chunk.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .core import head_chunk_rows, token_logprobs_from_hidden


class CompletionLogProbs(nn.Module):
    """Wraps a causal VLM so that ``forward`` returns completion log-probs and entropies.

    The DeepSpeed engine wraps this module (not the bare model), so ZeRO-3's parameter hooks and
    the engine's bookkeeping see every forward, while the full-vocabulary logits are never built.
    ``self.model`` is the Hugging Face model (used as is for generation and saving); ``adapter``
    (``models.QwenVLAdapter``) knows how to run it.
    """

    def __init__(self, model: nn.Module, adapter, chunk_size: int = 1024, sync_vision: bool = False):
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.chunk_size = chunk_size
        # ZeRO-3: the same collectives on every rank (the vision tower runs even without images,
        # the output head is called as often as on the rank with the most rows)
        self.sync_vision = sync_vision

    def forward(self, completion_ids: torch.Tensor, temperature: float = 1.0, entropy_grad: bool = False,
                entropy_top_k: int = 0, **inputs):
        """completion_ids (N, T) -> logp (N, T), entropy (N, T) under softmax(logits / temperature),
        and with ``entropy_top_k`` > 0 the entropy of the top-k tokens (N, T) as a third output
        (``token_logprobs_from_hidden``; ``entropy_grad`` makes the entropy differentiable).
        ``inputs``: the adapter's ``forward_inputs`` (every row on its own) or
        ``shared_forward_inputs`` (each distinct prompt run once)."""
        hidden = self.adapter.completion_hidden(self.model, completion_ids, sync_vision=self.sync_vision,
                                                **inputs)                            # (N, T, H)
        head = self.adapter.output_head(self.model)
        calls = 0
        if self.sync_vision and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every head call gathers its ZeRO-3 partitions: ranks with fewer rows (shorter
            # completions) pad up to the ranks' largest number of chunks, or the collectives hang
            rows = hidden.shape[0] * hidden.shape[1]
            calls = torch.tensor([-(-rows // head_chunk_rows(head, self.chunk_size))], device=hidden.device)
            dist.all_reduce(calls, op=dist.ReduceOp.MAX)
            calls = int(calls.item())
        return token_logprobs_from_hidden(head, hidden, completion_ids, temperature, self.chunk_size,
                                          entropy_grad=entropy_grad, entropy_top_k=entropy_top_k,
                                          min_head_calls=calls)
