"""``PromptBatch``: left-padded prompts with their images, the unit every model call takes.

Qwen2.5-VL's ``pixel_values`` holds every image's patches back to back; a row's slice is found from
``image_grid_thw`` (patches per image = t * h * w), so sub-batches must re-slice it (``select``).
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

    def rows_as_prompts(self) -> "PromptBatch":
        """The same rows, each its own distinct prompt (``unique`` = these rows, ``prompt_index`` =
        0..N-1): for decoding with nothing shared between rows."""
        pixel_values, grid = self.images()
        own = replace(self, pixel_values=pixel_values, image_grid_thw=grid, prompt_index=None, unique=None, cache={})
        return replace(own, pixel_values=None, image_grid_thw=None, prompt_index=torch.arange(len(self)), unique=own)
