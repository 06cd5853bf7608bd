"""The tiny offline Qwen2.5-VL: it round-trips, its processor agrees with the model, sampling
works for a batch, and recomputed log-probs equal the ones generate() sampled with."""
import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from helpers import noise_image
from grpo.logprobs import CompletionLogProbs
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


def test_batched_sampling_and_logprobs_match_generate(tiny_ckpt, tiny_processor):
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    adapter = QwenVLAdapter(tiny_processor)
    images = [[noise_image(i, (84 + 28 * i, 112))] for i in range(3)]       # different grid sizes
    batch = adapter.encode_prompts([_messages("Q" + "?" * i) for i in range(3)], images).repeat_interleave(2)
    temperature = 1.3
    out = model.generate(**adapter.generate_inputs(batch), do_sample=True, temperature=temperature, top_k=None,
                         top_p=1.0, max_new_tokens=10, output_logits=True, return_dict_in_generate=True,
                         suppress_tokens=adapter.never_sample_ids, pad_token_id=adapter.pad_token_id,
                         eos_token_id=adapter.eos_token_ids)
    completion = out.sequences[:, batch.input_ids.shape[1]:]
    assert completion.shape[0] == 6
    assert not torch.isin(completion, torch.tensor(adapter.never_sample_ids)).any()
    sampled = torch.log_softmax(torch.stack(out.logits, 1).float() / temperature, -1)
    sampled = sampled.gather(-1, completion.unsqueeze(-1)).squeeze(-1)      # (6, T)
    mask = torch.ones_like(completion)
    with torch.no_grad():
        logp, entropy = CompletionLogProbs(model, chunk_size=7)(
            completion, temperature=temperature, **adapter.forward_inputs(batch, completion, mask))
    assert torch.allclose(logp, sampled, atol=1e-5, rtol=0)
    assert (entropy > 0).all()


def test_logprobs_chunked_gradient_matches_full_softmax(tiny_ckpt, tiny_processor):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt)
    adapter = QwenVLAdapter(tiny_processor)
    batch = adapter.encode_prompts([_messages("Q")] * 2, [[noise_image(3)], [noise_image(4)]])
    ids = torch.randint(0, 500, (2, 5))
    inputs = adapter.forward_inputs(batch, ids, torch.ones_like(ids))
    logp, _ = CompletionLogProbs(model, chunk_size=3)(ids, temperature=0.7, **inputs)
    logp.sum().backward()
    ours = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(**inputs).logits[:, -6:-1].float() / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ref.sum().backward()
    assert torch.allclose(logp, ref, atol=1e-5)
    assert torch.allclose(ours, model.lm_head.weight.grad, atol=1e-5)
