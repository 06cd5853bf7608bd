"""The narrow interface between the trainer and a vision-language model.

The trainer never touches Qwen's names: it asks an adapter to turn chat messages and images into
a ``PromptBatch``, to list the token ids that must never be sampled, and to build the inputs of a
forward pass over prompt + completion. Everything Qwen2.5-VL specific lives here:

* ``mm_token_type_ids`` (1 on image tokens) must be passed to the forward pass, extended with zeros
  over the completion, or transformers 5 silently falls back to 1-D positions (no M-RoPE).
* ``pixel_values`` holds every image's patches back to back; a sample's slice is found from
  ``image_grid_thw`` (patches per image = t * h * w), so sub-batches must re-slice it.
* vision placeholder tokens must never be sampled, or the next forward fails with
  "Image features and image tokens do not match".
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts with their images.

    input_ids, attention_mask, mm_token_type_ids: (N, P)
    pixel_values: (sum of patches over the batch's images, C*t*p*p) or None (also None when
        ``unique`` is set: use ``images()``)
    image_grid_thw: (number of images, 3) or None
    images_per_row: (N,) number of images each row's prompt holds

    When the rows are copies of fewer distinct prompts (a GRPO group repeats its prompt G times),
    ``unique`` holds the B distinct prompts and ``prompt_index`` (N,) which of them each row copies,
    so image encoding and prompt prefill can run once per distinct prompt (``models.reuse``).
    ``cache`` is where ``models.reuse`` keeps per-prompt work (positions, image features) of a
    batch used as ``unique``.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    images_per_row: torch.Tensor
    prompt_index: torch.Tensor | None = None
    unique: "PromptBatch | None" = None
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def patch_spans(self) -> list[tuple[int, int, int, int]]:
        """Per row: (first image, last image + 1, first patch, last patch + 1)."""
        patches = (self.image_grid_thw.prod(-1).tolist() if self.image_grid_thw is not None else [])
        spans, img, patch = [], 0, 0
        for n in self.images_per_row.tolist():
            n_patch = sum(patches[img:img + n])
            spans.append((img, img + n, patch, patch + n_patch))
            img, patch = img + n, patch + n_patch
        return spans

    def select(self, rows: torch.Tensor | list[int]) -> "PromptBatch":
        """Rows ``rows`` (in that order, repeats allowed) with their images' patches."""
        # Row indices live on the CPU (bookkeeping tensors like images_per_row do); CPU indices
        # also index CUDA tensors, while comparing or indexing across devices raises.
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        if torch.equal(rows, torch.arange(len(self))):
            return self  # all rows in order: no copy (pixel_values can be hundreds of MB)
        if self.unique is not None:  # images stay with the distinct prompts: no per-row copies
            return PromptBatch(self.input_ids[rows], self.attention_mask[rows], self.mm_token_type_ids[rows],
                               None, None, self.images_per_row[rows], self.prompt_index[rows],
                               self.unique).trim_padding()
        pixel_values = grid = None
        if self.pixel_values is not None:
            spans = self.patch_spans()
            picked = [spans[r] for r in rows.tolist()]
            pix = [self.pixel_values[p0:p1] for _, _, p0, p1 in picked]
            thw = [self.image_grid_thw[i0:i1] for i0, i1, _, _ in picked]
            pixel_values = torch.cat(pix) if pix else self.pixel_values[:0]
            grid = torch.cat(thw) if thw else self.image_grid_thw[:0]
        batch = PromptBatch(self.input_ids[rows], self.attention_mask[rows], self.mm_token_type_ids[rows],
                            pixel_values, grid, self.images_per_row[rows])
        return batch.trim_padding()

    def images(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(pixel_values, image_grid_thw) of these rows, in row order. A batch of copies
        (``unique`` set) builds them from the distinct prompts only when asked (the per-row path)."""
        if self.unique is None:
            return self.pixel_values, self.image_grid_thw
        copies = self.unique.select(self.prompt_index)
        return copies.pixel_values, copies.image_grid_thw

    def repeat_interleave(self, g: int) -> "PromptBatch":
        """Each row repeated ``g`` times in place: rows 0,0,..,1,1,.. (the GRPO group layout).
        The result remembers that its rows are copies of this batch's rows (``unique``)."""
        rows = torch.arange(len(self)).repeat_interleave(g)
        if self.unique is not None:
            return self.select(rows)
        return replace(self.select(rows), prompt_index=rows, unique=self, cache={})

    def trim_padding(self) -> "PromptBatch":
        """Drop left-padding columns that every row pads (after selecting a sub-batch)."""
        keep = self.attention_mask.any(0).nonzero()
        first = int(keep[0]) if len(keep) else 0
        if first == 0:
            return self
        return replace(self, input_ids=self.input_ids[:, first:], attention_mask=self.attention_mask[:, first:],
                       mm_token_type_ids=self.mm_token_type_ids[:, first:], cache={})

    def to(self, device) -> "PromptBatch":
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return PromptBatch(move(self.input_ids), move(self.attention_mask), move(self.mm_token_type_ids),
                           move(self.pixel_values), move(self.image_grid_thw), self.images_per_row,
                           self.prompt_index, self.unique.to(device) if self.unique is not None else None)


class QwenVLAdapter:
    """Qwen2.5-VL (and Qwen2-VL) behind the trainer's interface."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        tok = self.tokenizer
        self.pad_token_id = tok.pad_token_id
        # An Instruct model ends its turn with <|im_end|>; <|endoftext|> also ends a sequence.
        self.eos_token_ids = sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")})
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
        """Inputs of one forward pass over prompt + completion (N, P + T)."""
        return forward_inputs(prompts, completion_ids, completion_mask)

    def shared_forward_inputs(self, prompts: PromptBatch, completion_mask: torch.Tensor) -> dict:
        """Inputs for ``grpo.logprobs.CompletionLogProbs`` that let it run each distinct prompt of
        ``prompts`` once (``prompts.unique`` must be set); see ``models.reuse``."""
        if prompts.unique is None:
            raise ValueError("prompts.unique is None: build the batch with PromptBatch.repeat_interleave")
        return dict(prompts=prompts, completion_mask=completion_mask)

    def generate_inputs(self, prompts: PromptBatch) -> dict:
        inputs = dict(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                      mm_token_type_ids=prompts.mm_token_type_ids)
        pixel_values, grid = prompts.images()
        if pixel_values is not None and pixel_values.shape[0] > 0:
            inputs.update(pixel_values=pixel_values, image_grid_thw=grid)
        return inputs

    def decode(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                for ids, m in zip(completion_ids, completion_mask)]


def forward_inputs(prompts: PromptBatch, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> dict:
    """Inputs of one forward pass over prompt + completion (N, P + T), every row on its own."""
    zeros = torch.zeros_like(completion_ids)
    inputs = dict(
        input_ids=torch.cat([prompts.input_ids, completion_ids], 1),
        attention_mask=torch.cat([prompts.attention_mask, completion_mask.to(prompts.attention_mask.dtype)], 1),
        mm_token_type_ids=torch.cat([prompts.mm_token_type_ids, zeros.to(prompts.mm_token_type_ids.dtype)], 1))
    pixel_values, grid = prompts.images()
    if pixel_values is not None and pixel_values.shape[0] > 0:
        inputs.update(pixel_values=pixel_values, image_grid_thw=grid)
    return inputs


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
