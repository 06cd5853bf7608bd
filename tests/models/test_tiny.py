"""The tiny offline Qwen2.5-VL: it round-trips, its processor agrees with the model, its chat template
is Qwen's and the adapter's end-of-turn tokens are the template's. (Log-probs of its completions:
tests/grpo/test_logprobs.py.)"""
import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from helpers import noise_image
from models import QwenVLAdapter, load_processor
from models.tiny import TinySpec, build_tiny_checkpoint, ensure_tiny_checkpoint
from models.tokenization import QWEN25_VL_SPECIAL_TOKENS, load_qwen_vocab_tokenizer


def _messages(text):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_checkpoint_round_trips_with_identical_logits(tiny_ckpt, tiny_processor, tmp_path):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    adapter = QwenVLAdapter(tiny_processor)
    batch = adapter.encode_prompts([_messages("What stain?")], [[noise_image(0)]])
    inputs = adapter.generate_inputs(batch)
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path / "again")
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        after = reloaded(**inputs).logits
    assert before.shape == (1, batch.input_ids.shape[1], model.config.text_config.vocab_size)
    assert torch.equal(before, after)


def test_checkpoint_is_real_architecture_and_small(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl"
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    # special ids in the config are the tokenizer's
    tok = load_processor(tiny_ckpt).tokenizer
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")


def test_ensure_reuses_an_existing_build(tmp_path):
    path = ensure_tiny_checkpoint(tmp_path / "t")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tmp_path / "t") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("size", [(112, 112), (84, 140), (200, 60)])
def test_image_token_count_matches_grid(tiny_processor, size):
    adapter = QwenVLAdapter(tiny_processor)
    img = noise_image(1, size)
    batch = adapter.encode_prompts([_messages("Describe.")], [[img]])
    t, h, w = batch.image_grid_thw[0].tolist()
    n_image_tokens = int((batch.input_ids == tiny_processor.image_token_id).sum())
    assert n_image_tokens == t * h * w // 4          # merge 2x2 patches into one token
    assert batch.pixel_values.shape == (t * h * w, 3 * 2 * 14 * 14)
    assert int(batch.mm_token_type_ids.sum()) == n_image_tokens
    # the resized image keeps within the pixel limits, sides multiples of 28
    assert 3136 <= (h * 14) * (w * 14) <= 65536


def test_chat_template_renders_qwen_format(tiny_processor):
    text = tiny_processor.apply_chat_template(_messages("Hi?"), tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n")


def test_real_qwen_vocabulary_has_qwen_ids():
    tok = load_qwen_vocab_tokenizer()
    assert len(tok) == 151643 + len(QWEN25_VL_SPECIAL_TOKENS)
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert tok("Hello world")["input_ids"] == [9707, 1879]  # Qwen2.5's ids for these words


def test_tiny_checkpoint_with_real_vocabulary_generates(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "qv", TinySpec(tokenizer="qwen", text_hidden=32, text_intermediate=64))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert model.config.text_config.vocab_size == 151680  # 151665 ids padded to a multiple of 64
    adapter = QwenVLAdapter(load_processor(path))
    batch = adapter.encode_prompts([_messages("Hi")], [[noise_image(2)]])
    out = model.generate(**adapter.generate_inputs(batch), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, batch.input_ids.shape[1] + 3)


def test_adapter_end_of_turn_is_the_chat_templates(tiny_processor):
    adapter = QwenVLAdapter(tiny_processor)
    text = tiny_processor.apply_chat_template(_messages("Hi?") + [{"role": "assistant", "content": "A"}],
                                              tokenize=False)
    assert text.endswith("<|im_start|>assistant\nA" + adapter.end_of_turn + "\n")
    assert adapter.tokenizer.decode(adapter.end_of_turn_ids) == "<|im_end|>"
    assert set(adapter.end_of_turn_ids) <= set(adapter.eos_token_ids)     # sampling stops there too
