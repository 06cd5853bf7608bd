"""An image-only Qwen2.5-VL processor that works without torchvision.

``Qwen2_5_VLProcessor`` as shipped needs a video processor, and Qwen2-VL's video processor imports
torchvision, which does not import beside PyPI's CPU torch. ``AutoProcessor`` then silently
returns only the tokenizer. This subclass keeps everything the processor does for images (the
``<|image_pad|>`` expansion by ``image_grid_thw``, ``mm_token_type_ids``) and drops the video
half; the PIL image processor ``Qwen2VLImageProcessorPil`` does the resizing and patching.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

# The paper's limits on image size (PathVLM-R1 §4.1: min 3,136 = 56x56, max 65,536 pixels).
PAPER_MIN_PIXELS = 3136
PAPER_MAX_PIXELS = 65536


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for image + text inputs (no video processor, no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = None

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise NotImplementedError("ImageOnlyQwen2_5_VLProcessor handles images only; "
                                      "install torchvision and use Qwen2_5_VLProcessor for video")
        return super().__call__(images=images, text=text, **kwargs)


def make_image_processor(min_pixels: int = PAPER_MIN_PIXELS, max_pixels: int = PAPER_MAX_PIXELS,
                         **overrides) -> Qwen2VLImageProcessorPil:
    """Qwen2.5-VL's image processor (patch 14, temporal patch 2, merge 2, CLIP mean/std)."""
    check_pixel_limits(min_pixels, max_pixels)
    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                    **overrides)


def check_pixel_limits(min_pixels: int, max_pixels: int) -> None:
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"min_pixels={min_pixels}, max_pixels={max_pixels}: "
                         f"need 0 < min_pixels <= max_pixels (the paper uses 3136 and 65536)")


def pixel_limits(image_processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen2-VL image processor (kept in ``size`` since transformers 5)."""
    return int(image_processor.size["shortest_edge"]), int(image_processor.size["longest_edge"])


def load_processor(path: str | Path, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> ImageOnlyQwen2_5_VLProcessor:
    """Load the tokenizer and image processor of a local Qwen2.5-VL checkpoint folder.

    ``min_pixels``/``max_pixels`` override the checkpoint's own limits (the paper uses
    3,136 / 65,536). Works for real checkpoints and for the tiny ones ``models.tiny`` builds.
    """
    path = Path(path)
    if not (path / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{path}: no preprocessor_config.json; expected a Qwen2.5-VL "
                                f"checkpoint folder (build a tiny one with `python -m models.tiny --out {path}`)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    if min_pixels is not None or max_pixels is not None:
        lo, hi = pixel_limits(image_processor)
        lo, hi = min_pixels or lo, max_pixels or hi
        check_pixel_limits(lo, hi)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            path, size={"shortest_edge": lo, "longest_edge": hi})
    template = tokenizer.chat_template
    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=template)
