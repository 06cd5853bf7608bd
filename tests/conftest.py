"""Shared test set-up: one torch thread (a second thread is slower on 2-core machines),
offline Hugging Face, and a session-wide tiny Qwen2.5-VL checkpoint."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny Qwen2.5-VL (2k BPE) built once per test session."""
    from models.tiny import build_tiny_checkpoint
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen25vl")


@pytest.fixture(scope="session")
def tiny_processor(tiny_ckpt):
    from models.processor import load_processor
    return load_processor(tiny_ckpt)

