"""From dataset items to prompts and reward samples.

The trainer accepts two kinds of items:

* ``data.VQARecord`` (the library's record type): the prompt is built by ``data.prompts`` (the
  paper's R1-style system prompt and question template) and images are loaded from its paths;
* a plain ``dict`` with ``"messages"`` (Qwen2.5-VL chat messages, image parts as
  ``{"type": "image"}``), ``"images"`` (PIL images or paths, in order) and the reward fields
  (``"question"``, ``"answer"``, optionally ``"options"``, ``"criteria"``, ...).

A user with another layout passes ``prompt_fn(item) -> (messages, images)`` and/or
``reward_sample_fn(item, completion) -> RewardSample`` to the trainer.
"""
from __future__ import annotations

from PIL import Image

from data.prompts import build_messages, load_image
from rewards import RewardSample

_REWARD_FIELDS = ("question", "answer", "options", "criteria", "modality")


def _open(image, min_pixels=None, max_pixels=None):
    """A PIL image converted to RGB as it is; a path decoded (``data.readers.read_image``) and
    resized to the pixel limits by ``data.prompts.load_image``."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    return load_image(image, **kw)


def default_prompt(item, min_pixels=None, max_pixels=None) -> tuple[list[dict], list]:
    """(chat messages, PIL images) for one dataset item."""
    if isinstance(item, dict):
        if "messages" not in item:
            raise KeyError(f"dataset item has no 'messages' field (keys: {sorted(item)}); give dict items "
                           f"'messages' and 'images', use data.VQARecord, or pass prompt_fn=")
        return item["messages"], [_open(i, min_pixels, max_pixels) for i in item.get("images", [])]
    return build_messages(item), [_open(p, min_pixels, max_pixels) for p in item.images]


def default_reward_sample(item, completion: str) -> RewardSample:
    """What the reward functions see for one completion of ``item``."""
    if isinstance(item, dict):
        known = {k: item[k] for k in _REWARD_FIELDS if item.get(k) is not None}
        if "question" not in known or "answer" not in known:
            raise KeyError(f"dataset item lacks 'question' or 'answer' (keys: {sorted(item)}); "
                           f"the rewards need them, or pass reward_sample_fn=")
        extra = {k: v for k, v in item.items() if k not in _REWARD_FIELDS + ("messages", "images")}
        return RewardSample(completion=completion, images=list(item.get("images", [])), extra=extra, **known)
    return RewardSample(question=item.question, completion=completion, answer=item.answer,
                        options=item.options, images=list(item.images), criteria=list(item.criteria),
                        modality=item.modality, extra={"id": item.id, "source": item.source, **item.extra})
