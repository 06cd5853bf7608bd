"""Build a tiny Qwen2.5-VL checkpoint offline.

The real ``Qwen2_5_VLForConditionalGeneration`` architecture (window-attention vision tower,
patch merger, M-RoPE text decoder) at a size that trains on a 2-core CPU, saved with
``save_pretrained`` together with its tokenizer and image processor, so it loads through exactly
the path a real checkpoint does (``models.loading.load_policy`` / ``load_processor``).

    python -m models.tiny --out runs/tiny-qwen25vl                 # 2k byte-level BPE (fast)
    python -m models.tiny --out runs/tiny-qwen25vl-qv --tokenizer qwen   # real Qwen2.5 vocabulary
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .processor import PAPER_MAX_PIXELS, PAPER_MIN_PIXELS, make_image_processor
from .tokenization import load_qwen_vocab_tokenizer, train_tiny_tokenizer


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model. Defaults: ~1.1M parameters with the 2k BPE, which learned the
    embedded nuclei task from scratch in minutes on one CPU thread (DESIGN.md)."""
    tokenizer: str = "bpe"        # "bpe": small BPE trained here; "qwen": real Qwen2.5 vocabulary
    bpe_vocab_size: int = 2048    # upper bound on the BPE's ids (the corpus may yield fewer)
    text_hidden: int = 128        # decoder width
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2        # grouped-query attention, as in Qwen2.5
    text_intermediate: int = 256
    vision_hidden: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 128
    window_size: int = 56         # pixels per attention window (real model: 112)
    min_pixels: int = PAPER_MIN_PIXELS
    max_pixels: int = PAPER_MAX_PIXELS
    seed: int = 0


def build_tokenizer(spec: TinySpec, corpus: list[str] | None = None):
    if spec.tokenizer == "bpe":
        return train_tiny_tokenizer(spec.bpe_vocab_size, corpus)
    if spec.tokenizer == "qwen":
        return load_qwen_vocab_tokenizer()
    raise ValueError(f"TinySpec.tokenizer={spec.tokenizer!r}: use 'bpe' or 'qwen'")


def tiny_config(spec: TinySpec, tokenizer) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config whose special-token ids are the tokenizer's."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vocab = ((len(tokenizer) + 63) // 64) * 64  # pad rows, as real checkpoints do (151936)
    head_dim = spec.text_hidden // spec.text_heads
    # M-RoPE splits head_dim/2 rotary frequencies across (temporal, height, width);
    # Qwen2.5-VL-7B uses [16, 24, 24] of 64. Keep the same proportions.
    half = head_dim // 2
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    text = dict(vocab_size=vocab, hidden_size=spec.text_hidden, num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
                intermediate_size=spec.text_intermediate, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden, num_heads=spec.vision_heads,
                  intermediate_size=spec.vision_intermediate, out_hidden_size=spec.text_hidden,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=spec.window_size, fullatt_block_indexes=[spec.vision_depth - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids,
                            eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"])


def build_tiny_checkpoint(out: str | Path, spec: TinySpec = TinySpec(), corpus: list[str] | None = None) -> Path:
    """Create a randomly initialised tiny Qwen2.5-VL with tokenizer and image processor in ``out``.
    ``corpus``: texts to train the BPE on (e.g. a dataset's prompts and targets), so its words
    become single tokens; default: a built-in VQA-flavoured corpus."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec, corpus)
    config = tiny_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    make_image_processor(spec.min_pixels, spec.max_pixels).save_pretrained(out)
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out


def ensure_tiny_checkpoint(out: str | Path, spec: TinySpec = TinySpec(), corpus: list[str] | None = None) -> Path:
    """Build the checkpoint unless ``out`` already holds one built from the same spec."""
    out = Path(out)
    marker = out / "tiny_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == asdict(spec) \
            and (out / "model.safetensors").is_file():
        return out
    return build_tiny_checkpoint(out, spec, corpus)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--tokenizer", choices=("bpe", "qwen"), default="bpe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_checkpoint(args.out, TinySpec(tokenizer=args.tokenizer, seed=args.seed))
    n = sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration.from_pretrained(path).parameters())
    print(f"tiny Qwen2.5-VL ({n / 1e6:.2f}M parameters, tokenizer={args.tokenizer}) written to {path}")


if __name__ == "__main__":
    main()
