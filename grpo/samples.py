"""From dataset items to prompts and reward samples.

The trainer accepts three kinds of items:

* ``data.VQARecord`` (the library's record type): the prompt is built by ``data.prompts`` (the
  paper's R1-style system prompt and question template) and images are loaded from its paths;
* a plain ``dict`` with ``"messages"`` (Qwen2.5-VL chat messages, image parts as
  ``{"type": "image"}``), ``"images"`` (PIL images or paths, in order) and the reward fields
  (``"question"``, ``"answer"``, optionally ``"options"``, ``"criteria"``, ...);
* a ``dict`` in TRL's format: ``"prompt"`` (a list of chat messages whose content is a string or a
  list of parts such as ``{"type": "image"}``, ``{"type": "text", "text": ...}``; or a plain
  string), an image in ``"image"`` (one PIL image, path or encoded bytes) or ``"images"`` (a list),
  and any other columns, which plain reward functions receive as keyword arguments
  (``rewards.FunctionReward``). The images go where the parts ``{"type": "image"}`` stand; a prompt
  without such parts gets them before the text of its first user message, as TRL does
  (``trl.data_utils.prepare_multimodal_messages``). ``"answer"`` (else ``"solution"``) becomes the
  reward sample's reference answer, which the built-in ``AccuracyReward`` and ``ProcessReward``
  need; ``"question"`` defaults to the text of the prompt's last user message.

A user with another layout passes ``prompt_fn(item) -> (messages, images)`` and/or
``reward_sample_fn(item, completion) -> RewardSample`` to the trainer.
"""
from __future__ import annotations

import io

from PIL import Image

from data.prompts import build_messages, load_image
from rewards import RewardSample
from rewards.functions import PROMPT, FunctionReward

_REWARD_FIELDS = ("question", "answer", "options", "criteria", "modality")
_ROLES = ("system", "user", "assistant", "tool")


def _open(image, min_pixels=None, max_pixels=None):
    """A PIL image converted to RGB as it is; a path (or encoded bytes, or a ``datasets`` Image
    struct ``{"bytes", "path"}``) decoded (``data.readers.read_image``) and resized to the pixel
    limits by ``data.prompts.load_image``."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict):  # datasets' Image feature read without decoding
        image = image.get("bytes") or image.get("path")
    kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    return load_image(image, **kw)


def is_trl_item(item) -> bool:
    """Whether ``item`` is a dict in TRL's format: a ``"prompt"``, no ``"messages"``."""
    return isinstance(item, dict) and "prompt" in item and "messages" not in item


def item_images(item: dict) -> list:
    """A TRL-format item's images as a list: ``item["images"]`` (a list, or a single image), else
    ``[item["image"]]``, else ``[]``. The objects themselves, not copies."""
    images = item.get("images")
    if images is None:
        images = [] if item.get("image") is None else [item["image"]]
    elif not isinstance(images, (list, tuple)):
        images = [images]
    return list(images)


def _part(part, where: str) -> dict:
    """One content part, without the keys a ``datasets`` struct column fills with None."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict) or "type" not in part:
        raise ValueError(f"{where}: a content part must be a dict with a 'type' ('text' or 'image'), got {part!r:.80}")
    return {k: v for k, v in part.items() if v is not None}


def prepare_messages(prompt, images: list, where: str = "dataset item") -> tuple[list[dict], list]:
    """(messages, images in the order their parts appear) for a TRL-format ``prompt``.

    Every content becomes a list of parts; the ``{"type": "image"}`` placeholders are filled, in
    order, with ``images`` (each part gets ``"image": <the image>``, as TRL does); a part that
    already holds an image keeps it. Without placeholders the images go before the text of the
    first user message. A count that does not match raises ``ValueError`` naming ``where``."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt or not all(
            isinstance(m, dict) and m.get("role") in _ROLES for m in prompt):
        raise ValueError(f"{where}: 'prompt' must be a string or a non-empty list of chat messages "
                         f"{{'role': {'|'.join(_ROLES)}, 'content': ...}}, got {prompt!r:.120}")
    messages = []
    for m in prompt:
        content = m.get("content")
        content = [] if content is None else [_part(p, where) for p in
                                              ([content] if isinstance(content, str) else content)]
        messages.append({**{k: v for k, v in m.items() if v is not None}, "content": content})
    placeholders = sum(1 for m in messages for p in m["content"] if p["type"] == "image" and "image" not in p)
    if placeholders == 0 and images:
        user = next((m for m in messages if m["role"] == "user"), None)
        if user is None:
            raise ValueError(f"{where}: {len(images)} image(s) but the prompt has no user message to put them in")
        user["content"] = [{"type": "image"} for _ in images] + user["content"]
        placeholders = len(images)
    if placeholders != len(images):
        raise ValueError(f"{where}: the prompt has {placeholders} image placeholder(s) {{'type': 'image'}} but "
                         f"the item has {len(images)} image(s) ('image'/'images'); give one placeholder per image")
    queue, ordered = list(images), []
    for m in messages:
        for i, p in enumerate(m["content"]):
            if p["type"] == "image":
                if "image" not in p:
                    p = m["content"][i] = {**p, "image": queue.pop(0)}
                ordered.append(p["image"])
    return messages, ordered


def prompt_text(prompt) -> str:
    """The text of a TRL-format prompt: the string itself, or the text parts of its last user
    message (of its last message when none is the user's), joined by newlines."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"] or list(prompt)
    content = users[-1].get("content") if users else ""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content or [] if isinstance(p, dict) and p.get("text"))


def default_prompt(item, min_pixels=None, max_pixels=None) -> tuple[list[dict], list]:
    """(chat messages, PIL images) for one dataset item."""
    if is_trl_item(item):
        messages, images = prepare_messages(item["prompt"], item_images(item), _where(item))
        opened = {id(im): _open(im, min_pixels, max_pixels) for im in images}
        for m in messages:
            m["content"] = [{**p, "image": opened[id(p["image"])]} if p["type"] == "image" else p
                            for p in m["content"]]
        return messages, [opened[id(im)] for im in images]
    if isinstance(item, dict):
        if "messages" not in item:
            raise KeyError(f"dataset item has no 'messages' or 'prompt' field (keys: {sorted(item)}); give dict "
                           f"items 'messages' and 'images' (or TRL's 'prompt' and 'image'/'images'), use "
                           f"data.VQARecord, or pass prompt_fn=")
        return item["messages"], [_open(i, min_pixels, max_pixels) for i in item.get("images", [])]
    return build_messages(item), [_open(p, min_pixels, max_pixels) for p in item.images]


def _where(item: dict) -> str:
    return f"dataset item {item['id']!r}" if item.get("id") is not None else "dataset item"


def _reference(item: dict):
    """A TRL-format item's reference answer: ``answer``, else ``solution`` (None when neither)."""
    for key in ("answer", "solution"):
        if item.get(key) is not None:
            return item[key] if isinstance(item[key], str) else str(item[key])
    return None


def default_reward_sample(item, completion: str) -> RewardSample:
    """What the reward functions see for one completion of ``item``.

    For a TRL-format item, ``extra`` holds every column but ``"prompt"`` (as TRL passes them to
    reward functions), and ``extra["prompt"]`` the prompt as :func:`prepare_messages` makes it (the
    string itself for a string prompt); ``answer`` is ``None`` when the item has neither ``answer``
    nor ``solution`` (see :func:`reward_field_problems`)."""
    if is_trl_item(item):
        prompt = item["prompt"]
        images = item_images(item)
        messages = prompt if isinstance(prompt, str) else prepare_messages(prompt, images, _where(item))[0]
        known = {k: item[k] for k in ("options", "criteria", "modality") if item.get(k) is not None}
        question = item["question"] if isinstance(item.get("question"), str) else prompt_text(prompt)
        extra = {k: v for k, v in item.items() if k != "prompt"}
        extra[PROMPT] = messages
        return RewardSample(question=question, completion=completion, answer=_reference(item), images=images,
                            extra=extra, **known)
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


def _needs_answer(reward) -> bool:
    """The built-in rewards that compare with the reference answer."""
    from rewards import AccuracyReward, ProcessReward
    return isinstance(reward, (AccuracyReward, ProcessReward))


def reward_field_problems(item, rewards) -> list[str]:
    """Why ``rewards`` cannot score the completions of ``item`` through :func:`default_reward_sample`:
    a TRL-format item without ``answer`` or ``solution`` can be scored only by plain reward functions
    (``rewards.FunctionReward``) and by the built-in rewards that do not read the reference
    (``FormatReward``, ``OverlongPenalty``). Empty when they can."""
    if not is_trl_item(item) or _reference(item) is not None:
        return []
    needing = [r.name for r in rewards if not isinstance(r, FunctionReward) and _needs_answer(r)]
    if not needing:
        return []
    return [f"reward(s) {needing} compare with the reference answer, but the dataset items (TRL format, columns "
            f"{sorted(item)}) have no 'answer' or 'solution' column; add one, score with plain reward functions "
            f"f(prompts, completions, **columns) instead, or pass reward_sample_fn="]
