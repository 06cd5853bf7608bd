"""Prompts in the R1 format and Qwen2.5-VL chat messages, SFT targets, and image loading.

The system prompt is the DeepSeek-R1 "think then answer" instruction (DeepSeek-AI, 2025,
Table 1), as used by open-r1 / VLM-R1 for GRPO. The question template follows PathVLM-R1 (and
Med-R1 before it): the question, its options, then the instruction to put the reasoning in
``<think></think>`` and the final answer in ``<answer></answer>``. For multiple choice the
``<answer>`` holds the option letter (``record.answer_letter``); for open questions, a short
phrase.
"""
from __future__ import annotations

import math

from PIL import Image

from .readers import read_image
from .records import VQARecord, lettered

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>")

QUESTION_TEMPLATE = (
    "{question}\n{options}Output the thinking process in <think> </think> and the final answer "
    "({answer_kind}) in <answer> </answer> tags.")

# Qwen2.5-VL: 14-px patches merged 2x2, so image sides must be multiples of 28.
IMAGE_FACTOR = 28
MIN_PIXELS = 3136    # 56 x 56, PathVLM-R1's min_pixels
MAX_PIXELS = 65536   # 256 x 256, PathVLM-R1's max_pixels
MAX_ASPECT = 200     # Qwen2.5-VL refuses more extreme aspect ratios


def format_options(options: list[str] | None) -> str:
    """'A. first\\nB. second\\n' (empty for open questions)."""
    if not options:
        return ""
    return "".join(f"{letter}. {text}\n" for letter, text in lettered(options))


def build_question(record: VQARecord) -> str:
    kind = "the option letter" if record.options else "a short phrase"
    return QUESTION_TEMPLATE.format(question=record.question.strip(),
                                    options=format_options(record.options), answer_kind=kind)


def build_messages(record: VQARecord, image_placeholder: bool = True,
                   system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """Qwen2.5-VL chat messages: system text, then the user's image(s) and question.

    With ``image_placeholder=True`` each image entry holds the path (the processor loads it);
    with False it holds the PIL image from :func:`load_image`, already resized to the limits.
    """
    images = [{"type": "image", "image": path if image_placeholder else load_image(path)}
              for path in record.images]
    return [
        {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
        {"role": "user", "content": images + [{"type": "text", "text": build_question(record)}]},
    ]


def final_answer(record: VQARecord) -> str:
    """What belongs inside ``<answer>``: the option letter, or the answer text."""
    return record.answer_letter or record.answer if record.options else record.answer


def build_sft_target(record: VQARecord) -> str:
    """A ``<think>...</think><answer>...</answer>`` completion for the SFT stage.

    The reasoning states the record's evaluation criteria in order, then concludes with the
    answer; so SFT teaches exactly the facts the process reward later checks, and little else:
    every token the model cannot copy from the prompt should depend on the image (a long target
    of boilerplate lets the loss fall while the image-dependent tokens barely count).
    """
    facts = [c.strip().rstrip(".") for c in record.criteria if c.strip()]
    steps = " ".join(f"{fact[0].upper()}{fact[1:]}." for fact in facts)
    conclusion = f"So the answer is {record.answer_letter if record.options else record.answer}."
    think = f"{steps} {conclusion}".strip()
    return f"<think>{think}</think><answer>{final_answer(record)}</answer>"


def smart_size(height: int, width: int, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS, factor: int = IMAGE_FACTOR) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, pixel count within the limits, aspect
    ratio kept as closely as the rounding allows (the rule of Qwen2.5-VL's ``smart_resize``)."""
    if min(height, width) < 1:
        raise ValueError(f"image has an empty side ({height}x{width})")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds "
                         f"{MAX_ASPECT}; crop the image first")
    if min_pixels > max_pixels or max_pixels < factor * factor:
        raise ValueError(f"need {factor * factor} <= min_pixels <= max_pixels, got "
                         f"{min_pixels}, {max_pixels}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def load_image(path: str, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image as RGB and resize it so both sides are multiples of 28 and the pixel
    count lies in [min_pixels, max_pixels] (PathVLM-R1: 3,136 and 65,536)."""
    image = read_image(path)
    height, width = smart_size(image.height, image.width, min_pixels, max_pixels)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return image
