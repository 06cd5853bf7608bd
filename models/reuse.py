"""Work done once per distinct prompt instead of once per GRPO sample.

A GRPO group holds G samples of one prompt. Run naively, every sample re-encodes the prompt's
image and re-reads the whole prompt in generation and in every log-prob pass: for a prompt of
P tokens (most of them image tokens) and T completion tokens, the decoder reads G·(P + T) tokens
where P + G·T would do. This module holds the Qwen2.5-VL specific pieces that let the decode loop
and the log-prob pass (``models.forward``) work once per distinct prompt:

* M-RoPE positions of each distinct prompt, from the model's own ``get_rope_index`` (a Python loop
  over rows and token runs in transformers), computed once per generation round;
* image features from the vision tower and patch merger, computed once per distinct prompt and,
  when the tower is frozen (PathVLM-R1 trains the language model only), kept for every pass of the
  round (``vision_frozen``);
* the inputs of a prompt-only forward pass whose KV cache the completions then attend to, and the
  two caches of that pass (``PromptCache``, ``PrefixCache``), built so that they also work under
  activation checkpointing, where the backward pass replays each decoder layer's forward.

Positions stay exactly those of the unshared forward: completion token j of a row sits at the
prompt's largest position + 1 + j, which is what ``get_rope_index`` gives text after the prompt.
Cached values live in ``PromptBatch.cache`` of the batch of distinct prompts, so they are dropped
with the round's batch. Image features are keyed by the model that computed them: the policy and
the reference model each use their own vision tower.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .batch import PromptBatch


def vision_frozen(model) -> bool:
    """True when no parameter of the vision tower (and merger) is trainable: its features of a
    given image are then constant for the whole run, so one computation serves every pass."""
    visual = getattr(getattr(model, "model", model), "visual", None)
    return visual is not None and not any(p.requires_grad for p in visual.parameters())


def prompt_positions(model, unique: PromptBatch) -> torch.Tensor:
    """M-RoPE positions (3, B, P) of the distinct prompts (0 on left padding), cached on ``unique``."""
    if "positions" not in unique.cache:
        base = getattr(model, "model", model)
        pos, _ = base.get_rope_index(unique.input_ids, unique.mm_token_type_ids, unique.image_grid_thw,
                                     attention_mask=unique.attention_mask)
        unique.cache["positions"] = pos
    return unique.cache["positions"]


def continuation_positions(prompt_pos: torch.Tensor, length: int) -> torch.Tensor:
    """prompt_pos (3, n, P) -> positions (3, n, length) of the text tokens that follow the prompt."""
    start = prompt_pos.amax(dim=(0, 2)) + 1                                      # (n,)
    steps = torch.arange(length, device=prompt_pos.device)
    return (start[:, None] + steps[None, :]).unsqueeze(0).expand(3, -1, -1)


@torch.no_grad()
def image_features(model, unique: PromptBatch) -> tuple[torch.Tensor, ...]:
    """Features of every image of ``unique`` (tuple, one (tokens_i, H) tensor per image), computed
    without gradient once per model and kept on ``unique``. Only valid for a frozen tower."""
    key = ("image_features", id(model))
    if key not in unique.cache:
        base = getattr(model, "model", model)
        out = base.get_image_features(unique.pixel_values, unique.image_grid_thw, return_dict=True)
        unique.cache[key] = tuple(out.pooler_output)
    return unique.cache[key]


def blank_image(config, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, image_grid_thw) of one blank image of 2x2 patches (one merged image token)."""
    vc = config.vision_config
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    return (torch.zeros((4, dim), device=device, dtype=dtype),
            torch.tensor([[1, 2, 2]], device=device))


def image_features_in_step(model, unique: PromptBatch) -> None:
    """``image_features`` under ZeRO-3, where every rank must run the vision tower together.

    Each module's parameters are gathered by a collective when it runs, so a rank may run the
    tower only when every other rank does. Called by every rank at the same point of every shared
    log-prob pass (``models.forward.shared_prefix_hidden`` with ``sync_vision``): the ranks agree
    (one all-reduce of a flag) whether any of them still lacks the features of its distinct
    prompts; if one does, each rank runs the tower once, on its own images when it lacks their
    features, else on a blank image (``blank_image``) whose features are dropped. Whether a
    rank's features are already there differs between ranks: generation keeps them (it runs
    with all parameters gathered, no collective per module), a rank may hold no image at all, and
    a batch re-encoded by dynamic sampling starts empty; the agreement makes that harmless."""
    need = has_images(unique) and ("image_features", id(model)) not in unique.cache
    device = next(model.parameters()).device
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([float(need)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        anyone = bool(flag.item())
    else:
        anyone = need
    if not anyone:
        return
    if need:
        image_features(model, unique)
        return
    base = getattr(model, "model", model)
    pixels, grid = blank_image(model.config, device, next(base.visual.parameters()).dtype)
    with torch.no_grad():
        base.get_image_features(pixels, grid, return_dict=True)


def has_images(prompts: PromptBatch) -> bool:
    return prompts.pixel_values is not None and prompts.pixel_values.shape[0] > 0


def prompt_inputs(model, unique: PromptBatch, rows: torch.Tensor, reuse_features: bool) -> dict:
    """Inputs of a forward pass over the distinct prompts ``unique[rows]`` alone (b, P').

    With ``reuse_features`` the image features come from ``image_features`` (``mm_encoder_outputs``,
    the precomputed-features argument of transformers' Qwen2.5-VL); otherwise the pass runs the
    vision tower on ``pixel_values`` (once per distinct prompt still, and with gradient if trainable).
    """
    rows = rows.to(unique.input_ids.device)
    if reuse_features:  # select the tokens only: copying pixel_values would be wasted work
        sub = replace(unique, pixel_values=None, image_grid_thw=None, cache={}).select(rows)
    else:
        sub = unique.select(rows)                                                # left padding trimmed
    width = sub.input_ids.shape[1]
    positions = prompt_positions(model, unique)[:, rows, -width:]
    inputs = dict(input_ids=sub.input_ids, attention_mask=sub.attention_mask, position_ids=positions)
    if not has_images(unique) or int(unique.images_per_row[rows.cpu()].sum()) == 0:
        return inputs
    if reuse_features:
        feats = image_features(model, unique)
        spans = unique.patch_spans()
        picked = tuple(feats[i] for r in rows.tolist() for i in range(spans[r][0], spans[r][1]))
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=picked)}
    else:
        inputs.update(pixel_values=sub.pixel_values, image_grid_thw=sub.image_grid_thw)
    return inputs


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` holding its keys/values (n, heads, L, d) in a buffer with room for ``extra``
    more tokens. ``DynamicLayer.update`` appends with ``torch.cat``, which copies the whole cache at
    every new token (O(L) per token, the largest cost of decoding after a 1k-token image prompt on
    CPU); here a new token is written in place and ``keys``/``values`` are views of the filled part."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, extra: int):
        super().__init__()
        n, h, length, d = keys.shape
        self._k = keys.new_empty(n, h, length + extra, d)
        self._v = values.new_empty(n, h, length + extra, values.shape[-1])
        self._k[:, :, :length], self._v[:, :, :length] = keys, values
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        if end > self._k.shape[-2]:
            raise RuntimeError(f"ReservedLayer holds {self._k.shape[-2]} positions, asked for {end}")
        self._k[:, :, start:end], self._v[:, :, start:end] = key_states, value_states
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values


def reserve(cache, extra: int):
    """Give every full-attention layer of a filled ``DynamicCache`` room for ``extra`` more tokens."""
    cache.layers = [ReservedLayer(layer.keys, layer.values, extra) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


class PromptLayer(DynamicLayer):
    """One decoder layer's keys/values (b, heads, P, d) of a prompt-only pass, written once.

    The first ``update`` keeps the prompt's keys and values (with their autograd history: the
    completions' gradients flow back through them into the prompt pass); any later one is the
    backward pass replaying a checkpointed layer, which must store nothing (a ``DynamicLayer``
    would append a second copy). Either way the pass attends to the keys it was given: a prompt
    pass starts from an empty cache."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.keys, self.values = key_states, value_states
            self.device, self.is_initialized = key_states.device, True
        return key_states, value_states


class PrefixLayer(DynamicLayer):
    """Read-only view of a prompt pass's keys/values for the rows that continue it.

    ``update`` returns the rows' prompt keys/values (``keys[rows]``) followed by the new tokens'
    and stores nothing, so the completion pass, and its replay under activation checkpointing,
    read the same prefix. Rows are picked at each call: the (n, heads, P, d) copy lives only
    while a layer runs (under checkpointing it is not kept for the backward pass; without, the
    attention keeps its concatenation anyway). Indexing is differentiable: the gradients of a
    prompt's G rows add up in its prompt-pass keys."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.rows = keys, values, rows
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return (torch.cat([self.keys[self.rows], key_states], dim=-2),
                torch.cat([self.values[self.rows], value_states], dim=-2))


class PromptCache(DynamicCache):
    """The cache of a prompt-only pass (``PromptLayer`` per decoder layer, created on first use)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=PromptLayer)


class PrefixCache(DynamicCache):
    """A filled ``PromptCache`` seen by the rows ``rows`` (n,) that continue its prompts (``PrefixLayer``)."""

    def __init__(self, prompt: PromptCache, rows: torch.Tensor):
        Cache.__init__(self, layers=[PrefixLayer(layer.keys, layer.values, rows) for layer in prompt.layers])
