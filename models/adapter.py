"""The narrow interface between the trainer and a vision-language model.

The trainer never touches Qwen's names nor a model's internals: it asks an adapter to turn chat
messages and images into a ``PromptBatch``, to list the token ids that must never be sampled and
those that end a turn, for the hidden states of completions after their prompts
(``completion_hidden``, ``output_head``) and to sample continuations of prompts
(``sample_continuations``, with the trainer's token-choice function). KV-cache prefill, prefix
reuse and M-RoPE positions stay behind it (``models.forward``, ``models.reuse``). Everything
Qwen2.5-VL specific lives in ``models``:

* ``mm_token_type_ids`` (1 on image tokens) must be passed to the forward pass, extended with zeros
  over the completion, or transformers 5 silently falls back to 1-D positions (no M-RoPE).
* ``pixel_values`` holds every image's patches back to back; a sample's slice is found from
  ``image_grid_thw`` (patches per image = t * h * w), so sub-batches must re-slice it.
* vision placeholder tokens must never be sampled, or the next forward fails with
  "Image features and image tokens do not match".
* an Instruct turn ends with ``<|im_end|>`` (``end_of_turn``).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import forward
from .batch import PromptBatch

__all__ = ["PromptBatch", "QwenVLAdapter", "END_OF_TURN"]

# An Instruct model ends its turn with <|im_end|> (the chat template closes every message with it).
END_OF_TURN = "<|im_end|>"


class QwenVLAdapter:
    """Qwen2.5-VL (and Qwen2-VL) behind the trainer's interface."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        tok = self.tokenizer
        self.pad_token_id = tok.pad_token_id
        # The chat template closes every turn with END_OF_TURN; <|endoftext|> also ends a sequence.
        self.end_of_turn = END_OF_TURN
        self.end_of_turn_ids = tok(END_OF_TURN, add_special_tokens=False)["input_ids"]
        self.eos_token_ids = sorted({tok.convert_tokens_to_ids(END_OF_TURN), tok.convert_tokens_to_ids("<|endoftext|>")})
        self.never_sample_ids = sorted(tok.convert_tokens_to_ids(t) for t in (
            "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"))

    def prompt_text(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_prompts(self, messages: list[list[dict]], images: list[list]) -> PromptBatch:
        """Chat messages (one conversation per row, with ``{"type": "image"}`` parts) and the PIL
        images each row refers to, in order. Prompts are never truncated: cutting a prompt that
        holds image tokens would break the image-feature/token correspondence."""
        if len(messages) != len(images):
            raise ValueError(f"{len(messages)} conversations but {len(images)} image lists")
        texts = [self.prompt_text(m) for m in messages]
        for i, (text, imgs) in enumerate(zip(texts, images)):
            n_slots = text.count("<|image_pad|>")
            if n_slots != len(imgs):
                raise ValueError(f"prompt {i} has {n_slots} image placeholders but {len(imgs)} images; "
                                 f"add one {{'type': 'image'}} content part per image")
        flat = [img for imgs in images for img in imgs]
        enc = self.processor(text=texts, images=flat or None, return_tensors="pt",
                             padding=True, padding_side="left")
        return PromptBatch(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
            mm_token_type_ids=enc.get("mm_token_type_ids", torch.zeros_like(enc["input_ids"])),
            pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"),
            images_per_row=torch.tensor([len(i) for i in images], dtype=torch.long))

    def forward_inputs(self, prompts: PromptBatch, completion_ids: torch.Tensor,
                       completion_mask: torch.Tensor) -> dict:
        """Inputs of one forward pass over prompt + completion (N, P + T), every row on its own
        (for ``completion_hidden``)."""
        return forward.forward_inputs(prompts, completion_ids, completion_mask)

    def shared_forward_inputs(self, prompts: PromptBatch, completion_mask: torch.Tensor) -> dict:
        """Inputs for ``completion_hidden`` that let it run each distinct prompt of ``prompts`` once
        (``prompts.unique`` must be set); see ``models.forward.shared_prefix_hidden``."""
        if prompts.unique is None:
            raise ValueError("prompts.unique is None: build the batch with PromptBatch.repeat_interleave")
        return dict(prompts=prompts, completion_mask=completion_mask)

    def generate_inputs(self, prompts: PromptBatch) -> dict:
        return forward.with_images(dict(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                                        mm_token_type_ids=prompts.mm_token_type_ids), prompts)

    def decode(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                for ids, m in zip(completion_ids, completion_mask)]

    # ------------------------------------------------------------------ the model side
    def completion_hidden(self, model, completion_ids: torch.Tensor, *, sync_vision: bool = False,
                          **inputs) -> torch.Tensor:
        """Hidden states (N, T, H) of ``model`` whose position i predicts ``completion_ids`` (N, T)
        token i, after each row's prompt. ``inputs``: ``forward_inputs`` (every row on its own) or
        ``shared_forward_inputs`` (each distinct prompt run once). ``sync_vision`` (ZeRO-3): run the
        vision tower even when no row holds an image. See ``models.forward.completion_hidden``."""
        return forward.completion_hidden(model, completion_ids, sync_vision=sync_vision, **inputs)

    def output_head(self, model) -> torch.nn.Module:
        """The output projection (H -> V) that turns ``completion_hidden`` into logits."""
        return forward.backbone_and_head(model)[1]

    def sample_continuations(self, model, prompts: PromptBatch, choose: Callable[[torch.Tensor], torch.Tensor],
                             max_new_tokens: int) -> torch.Tensor:
        """ids (N, T') with T' <= ``max_new_tokens``: one continuation per row of ``prompts``
        (``prompts.unique`` set; ``PromptBatch.rows_as_prompts`` makes every row its own prompt),
        each new token ``choose(logits (N, V) fp32) -> (N,)``; stops once every row has emitted an
        EOS, pad after it. Each distinct prompt is prefilled once (``models.forward.decode``)."""
        return forward.decode(model, prompts, choose, max_new_tokens, self.eos_token_ids, self.pad_token_id)
