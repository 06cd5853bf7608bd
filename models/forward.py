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

import contextlib
import functools
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


def _checkpointed_text_layers(model) -> list:
    """The language model's decoder layers that transformers checkpoints in training mode."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    backbone = getattr(model, "model", model)
    text = getattr(backbone, "language_model", backbone)
    return [m for m in text.modules()
            if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)]


def _non_reentrant(func):
    """``func`` (a layer's ``_gradient_checkpointing_func``) as a non-reentrant checkpoint, or None
    when it is not transformers' ``functools.partial`` of ``torch.utils.checkpoint.checkpoint``
    (or of its offloading wrapper) and so cannot be told apart."""
    if not isinstance(func, functools.partial):
        return None
    if func.keywords.get("use_reentrant") is False:
        return func
    return functools.partial(func.func, *func.args, **{**func.keywords, "use_reentrant": False})


def can_share_prefix(model, sync_vision: bool = False) -> bool:
    """Whether the log-prob pass may run each distinct prompt once (``shared_prefix_hidden``).

    Also under ZeRO-3 (``sync_vision``: the shared pass then keeps every rank running the same
    modules in the same order) and with activation checkpointing (``_cache_survives_checkpointing``).
    Not when a checkpointed decoder layer uses a checkpoint function other than transformers'
    (its reentrancy cannot be known: a reentrant checkpoint runs the layer without gradient, so
    the cached prompt keys would carry none back from the completions), nor for sliding-window
    attention layers (the prompt cache here is a full-attention one); the per-row path runs there."""
    del sync_vision  # both paths honour it
    if any(_non_reentrant(m._gradient_checkpointing_func) is None for m in _checkpointed_text_layers(model)):
        return False
    text_config = model.config.get_text_config(decoder=True)
    return all(t == "full_attention" for t in (getattr(text_config, "layer_types", None) or ["full_attention"]))


@contextlib.contextmanager
def _cache_survives_checkpointing(model):
    """For the two passes of ``shared_prefix_hidden``: checkpointed decoder layers keep their cache.

    transformers' ``GradientCheckpointingLayer`` replaces ``cache`` by None in training mode
    unless the layer declares ``_can_checkpoint_with_cache`` ("layers that only read the KV
    cache"): a writer would store again when the backward pass replays it. The shared path's
    caches are safe to replay (``reuse.PromptLayer`` writes once, ``reuse.PrefixLayer`` never),
    so each layer says so for the duration of the passes. The replay itself calls the layer's
    forward with the arguments of the first call; the flag is not read again.

    The layers also checkpoint non-reentrantly meanwhile: a reentrant checkpoint runs the layer
    under ``torch.no_grad`` and replays it with gradient only towards its positional inputs, so
    the prompt's keys and values, kept through the cache, would carry no gradient back from the
    completions (the prompt would silently learn nothing from them). Non-reentrant checkpointing
    keeps the forward's autograd graph and recomputes only the saved tensors."""
    layers = _checkpointed_text_layers(model)
    saved = [(m, m.__dict__.get("_can_checkpoint_with_cache"), m._gradient_checkpointing_func) for m in layers]
    try:
        for m, _, func in saved:
            m._can_checkpoint_with_cache = True
            m._gradient_checkpointing_func = _non_reentrant(func)
        yield
    finally:
        for m, flag, func in saved:
            if flag is None:
                m.__dict__.pop("_can_checkpoint_with_cache", None)
            else:
                m._can_checkpoint_with_cache = flag
            m._gradient_checkpointing_func = func


def completion_hidden(model, completion_ids: torch.Tensor, *, prompts: PromptBatch | None = None,
                      completion_mask: torch.Tensor | None = None, sync_vision: bool = False,
                      **inputs) -> torch.Tensor:
    """Hidden states (N, T, H) whose position i predicts ``completion_ids`` (N, T) token i.

    Either ``inputs``: ``forward_inputs`` over prompt + completion (N, P + T), every row on its own;
    or ``prompts`` (N rows, ``prompts.unique`` set) and ``completion_mask`` (N, T): each distinct
    prompt then runs once and its KV cache is shared by its rows (``shared_prefix_hidden``), unless
    ``can_share_prefix`` says no. ``sync_vision`` (ZeRO-3): every rank runs the same modules in the
    same order whatever its batch holds (the vision tower even when no row holds an image).
    """
    if prompts is not None:
        if can_share_prefix(model, sync_vision):
            return shared_prefix_hidden(model, prompts, completion_ids, completion_mask, sync_vision=sync_vision)
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


def with_dummy_prompt_row(inputs: dict, config, dtype) -> dict:
    """Prompt-pass inputs (``reuse.prompt_inputs``: ids, mask, M-RoPE positions, no image) plus one
    row holding a blank image (``with_dummy_image_row``); the row's positions are its text ones."""
    out = with_dummy_image_row({**inputs, "mm_token_type_ids": torch.zeros_like(inputs["input_ids"])}, config)
    del out["mm_token_type_ids"]
    pos = inputs["position_ids"]
    width = pos.shape[-1]
    row = (torch.arange(width, device=pos.device) - (width - 3)).clamp(min=0)        # 0 on padding, 0 1 2
    out["position_ids"] = torch.cat([pos, row.expand(pos.shape[0], 1, width).to(pos.dtype)], 1)
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def shared_prefix_hidden(model, prompts: PromptBatch, completion_ids: torch.Tensor,
                         completion_mask: torch.Tensor, sync_vision: bool = False) -> torch.Tensor:
    """Hidden states (n, T, H) that predict ``completion_ids`` (n, T), running each distinct prompt once.

    The b distinct prompts among the n rows run alone (b, P) with a KV cache (``reuse.PromptCache``);
    the completions (n, T) run on it, each row reading its prompt's keys and values
    (``reuse.PrefixCache``: differentiable, so gradients of all G copies add up in the shared
    prompt pass). Position i of the result predicts completion token i: token 0 is predicted by
    the prompt's last position, token i > 0 by completion position i - 1. Works with activation
    checkpointing (``_cache_survives_checkpointing``).

    ``sync_vision`` (ZeRO-3): what runs must not depend on the batch. The vision tower runs once
    per pass on every rank when it trains (on a blank image where the distinct prompts hold
    none) and, when it is frozen, on every rank at once whenever one of them lacks its features
    (``reuse.image_features_in_step``); the completion pass runs even for a 1-token width (on the
    token itself, its output kept at weight 0 so that the backward pass runs it too).
    """
    backbone, _ = backbone_and_head(model)
    distinct, row_of = torch.unique(prompts.prompt_index, sorted=True, return_inverse=True)
    frozen = reuse.vision_frozen(model)
    if sync_vision and frozen:
        reuse.image_features_in_step(model, prompts.unique)
    inputs = reuse.prompt_inputs(model, prompts.unique, distinct, reuse_features=frozen)
    row_of = row_of.to(inputs["input_ids"].device)
    t = completion_ids.shape[1]
    mask = torch.cat([inputs["attention_mask"][row_of], completion_mask.to(inputs["attention_mask"].dtype)], 1)
    positions = reuse.continuation_positions(inputs["position_ids"][:, row_of], t)
    dummy = sync_vision and not frozen and "pixel_values" not in inputs
    if dummy:
        inputs = with_dummy_prompt_row(inputs, model.config, next(model.parameters()).dtype)
    cache = reuse.PromptCache()
    with _cache_survives_checkpointing(model):
        # use_cache=False: the cache passed is used all the same (transformers only builds one
        # itself when asked), without the warning that checkpointing turns use_cache off
        out = backbone(**inputs, cache=cache, use_cache=False, return_dict=True)
        hidden = out.last_hidden_state[row_of, -1:]                              # (n, 1, H)
        if dummy:  # the blank image's row: dropped, kept in the graph for the backward pass
            hidden = hidden + 0.0 * out.last_hidden_state[len(distinct):].sum()
        if t > 1 or sync_vision:
            w = max(t - 1, 1)
            comp = backbone(input_ids=completion_ids[:, :w], attention_mask=mask[:, :mask.shape[1] - t + w],
                            position_ids=positions[:, :, :w], cache=reuse.PrefixCache(cache, row_of),
                            use_cache=False, return_dict=True).last_hidden_state      # (n, w, H)
            hidden = torch.cat([hidden, comp], 1) if t > 1 else hidden + 0.0 * comp.sum()
    return hidden


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
