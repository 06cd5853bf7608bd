"""The two things the trainer asks of a causal VLM, reached through the adapter (``QwenVLAdapter``):

* ``completion_hidden``: hidden states (N, T, H) that predict completion tokens (N, T) after their
  prompts: one pass over prompt + completion per row, or (``shared_prefix_hidden``) each distinct
  prompt prefilled once with a KV cache that its rows' completions attend to;
* ``decode``: continuations sampled with a KV cache: each distinct prompt's image encoded and its
  prompt prefilled once, the cache copied to the G rows that share it (the prefix sharing of vLLM's
  automatic prefix caching and SGLang's RadixAttention, for the one prefix a GRPO group is known to
  share), then one batched forward per new token. The token choice (the sampling distribution) is
  the caller's function of the logits.

Completion token j of a row always sits at the prompt's largest M-RoPE position + 1 + j
(``reuse.continuation_positions``), exactly as in the unshared forward pass.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import reuse
from .batch import PromptBatch


def with_images(inputs: dict, prompts: PromptBatch) -> dict:
    """``inputs`` plus the rows' ``pixel_values`` / ``image_grid_thw`` when they hold any image."""
    pixel_values, grid = prompts.images()
    if pixel_values is not None and pixel_values.shape[0] > 0:
        inputs.update(pixel_values=pixel_values, image_grid_thw=grid)
    return inputs


def forward_inputs(prompts: PromptBatch, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> dict:
    """Inputs of one forward pass over prompt + completion (N, P + T), every row on its own."""
    zeros = torch.zeros_like(completion_ids)
    return with_images(dict(
        input_ids=torch.cat([prompts.input_ids, completion_ids], 1),
        attention_mask=torch.cat([prompts.attention_mask, completion_mask.to(prompts.attention_mask.dtype)], 1),
        mm_token_type_ids=torch.cat([prompts.mm_token_type_ids, zeros.to(prompts.mm_token_type_ids.dtype)], 1)),
        prompts)


def backbone_and_head(model):
    """(decoder that returns hidden states, output projection) of a HF causal VLM."""
    head = model.get_output_embeddings()
    base = getattr(model, "model", None)
    if head is None or base is None:
        raise ValueError(f"{type(model).__name__}: expected `.model` (backbone) and an output embedding layer")
    return base, head


def with_dummy_image_row(inputs: dict, config) -> dict:
    """``inputs`` plus one extra row holding a single 2x2-patch blank image (one image token).

    Under ZeRO-3 each module's parameters are gathered by a collective when the module runs, in
    the order modules run. A rank whose micro-batch holds no image would skip the vision tower
    while the other ranks gather its weights, and the job would hang or mismatch. With this row
    the forward pass runs the tower at the same point as on every other rank; the caller drops
    the row's outputs (adding 0 x them to keep the backward pass in step too).
    """
    ids, attn, mm = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    width = ids.shape[1]
    if width < 3:
        raise ValueError("sequences shorter than 3 tokens cannot host the dummy image row")
    row = torch.full((1, width), config.vision_end_token_id, dtype=ids.dtype, device=ids.device)
    row[0, -3:] = torch.tensor([config.vision_start_token_id, config.image_token_id, config.vision_end_token_id])
    row_attn = torch.zeros((1, width), dtype=attn.dtype, device=attn.device)
    row_attn[0, -3:] = 1
    row_mm = torch.zeros((1, width), dtype=mm.dtype, device=mm.device)
    row_mm[0, -2] = 1
    vc = config.vision_config
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    return {**inputs, "input_ids": torch.cat([ids, row]), "attention_mask": torch.cat([attn, row_attn]),
            "mm_token_type_ids": torch.cat([mm, row_mm]),
            "pixel_values": torch.zeros((4, dim), device=ids.device),
            "image_grid_thw": torch.tensor([[1, 2, 2]], device=ids.device)}


def can_share_prefix(model, sync_vision: bool = False) -> bool:
    """Whether the log-prob pass may run each distinct prompt once. Not under ZeRO-3
    (``sync_vision``: every rank must run the same modules in the same order, see
    ``with_dummy_image_row``) nor with activation checkpointing (transformers then drops the KV
    cache in training mode); the per-row path is used there."""
    name = ("is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing")
            else "is_gradient_checkpointing")  # the first is transformers >= 5.2's name
    checkpointing = getattr(model, name, False)
    return not sync_vision and not checkpointing


def completion_hidden(model, completion_ids: torch.Tensor, *, prompts: PromptBatch | None = None,
                      completion_mask: torch.Tensor | None = None, sync_vision: bool = False,
                      **inputs) -> torch.Tensor:
    """Hidden states (N, T, H) whose position i predicts ``completion_ids`` (N, T) token i.

    Either ``inputs``: ``forward_inputs`` over prompt + completion (N, P + T), every row on its own;
    or ``prompts`` (N rows, ``prompts.unique`` set) and ``completion_mask`` (N, T): each distinct
    prompt then runs once and its KV cache is shared by its rows (``shared_prefix_hidden``), unless
    ``can_share_prefix`` says no. ``sync_vision`` (ZeRO-3): run the vision tower even when no row
    holds an image (``with_dummy_image_row``).
    """
    if prompts is not None:
        if can_share_prefix(model, sync_vision):
            return shared_prefix_hidden(model, prompts, completion_ids, completion_mask)
        inputs = forward_inputs(prompts, completion_ids, completion_mask)
    backbone, _ = backbone_and_head(model)
    n, t = completion_ids.shape
    dummy = sync_vision and inputs.get("pixel_values") is None
    if dummy:
        inputs = with_dummy_image_row(inputs, model.config)
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    out = backbone(**inputs, use_cache=False, return_dict=True)
    hidden = out.last_hidden_state[:, -t - 1:-1]        # (N, T, H): position i predicts token i+1
    if dummy:  # drop the row, keep it in the graph so the backward pass matches other ranks
        hidden = hidden[:n] + 0.0 * hidden[n:].sum()
    return hidden


def shared_prefix_hidden(model, prompts: PromptBatch, completion_ids: torch.Tensor,
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


@torch.no_grad()
def decode(model, prompts: PromptBatch, choose: Callable[[torch.Tensor], torch.Tensor], max_new_tokens: int,
           eos_token_ids: list[int], pad_token_id: int) -> torch.Tensor:
    """One continuation per row of ``prompts`` (``prompts.unique`` set), each distinct prompt prefilled
    once and its KV cache shared by the rows that copy it.

    ``choose(logits (n, V) fp32) -> ids (n,)`` picks every new token (called once per step, with
    the next-token logits of all n rows). Returns ids (n, T') with T' <= ``max_new_tokens``: stops
    when every row has emitted an EOS; ``pad_token_id`` after a row's EOS. One forward per new token
    over all n rows; no Python loop over rows or vocabulary.
    """
    backbone, head = backbone_and_head(model)
    distinct, row_of = torch.unique(prompts.prompt_index, sorted=True, return_inverse=True)
    inputs = reuse.prompt_inputs(model, prompts.unique, distinct, reuse_features=True)  # no grad here
    device = inputs["input_ids"].device
    row_of = row_of.to(device)
    out = backbone(**inputs, use_cache=True, return_dict=True)                   # prefill (b, P)
    n, t_max, p = len(row_of), max_new_tokens, inputs["input_ids"].shape[1]
    cache = out.cache
    cache.batch_select_indices(row_of)                                           # (b, ...) -> (n, ...)
    reuse.reserve(cache, t_max)                                                  # decode writes in place
    hidden = out.last_hidden_state[row_of, -1]                                   # (n, H)
    mask = torch.ones((n, p + t_max), dtype=inputs["attention_mask"].dtype, device=device)
    mask[:, :p] = inputs["attention_mask"][row_of]
    start = reuse.continuation_positions(inputs["position_ids"][:, row_of], 1)  # (3, n, 1)
    eos = torch.tensor(eos_token_ids, device=device)
    ids = torch.full((n, t_max), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for t in range(t_max):
        tok = choose(head(hidden).float())                                       # (n,) from logits (n, V)
        ids[:, t] = torch.where(done, pad_token_id, tok)
        done |= torch.isin(tok, eos)
        if t == t_max - 1 or bool(done.all()):  # one host sync per token, as in transformers
            break
        hidden = backbone(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :p + t + 1], position_ids=start + t,
                          cache=cache, use_cache=True, return_dict=True).last_hidden_state[:, -1]
    return ids[:, :t + 1]
