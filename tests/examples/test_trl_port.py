"""A TRL GRPO script for a VLM runs here after changing only its imports: examples/trl_style_grpo.py
trains the tiny Qwen2.5-VL, and its text is the TRL original below with the import lines swapped."""
import ast
import difflib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "trl_style_grpo.py"
OUR_IMPORTS = ["from grpo import GRPOConfig, GRPOTrainer",
               "from models import ImageOnlyQwen2_5_VLProcessor as AutoProcessor"]
TRL_IMPORTS = ["from transformers import AutoProcessor",
               "from trl import GRPOConfig, GRPOTrainer"]

# The script as a TRL user has it. The header comment is the example's (it is shared text).
TRL_ORIGINAL = '''\
import argparse
import re

from datasets import Dataset
from PIL import Image

from transformers import AutoProcessor
from trl import GRPOConfig, GRPOTrainer

SYSTEM_PROMPT = (
    "A conversation between user and assistant. The user asks a question, and the assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think></think> and <answer></answer> tags."
)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def make_dataset(n):
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        rows.append({
            "prompt": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": "Which colour fills this image: red, green or blue?"},
            ],
            "image": Image.new("RGB", (56, 56), COLOURS[name]),
            "solution": name,
        })
    return Dataset.from_list(rows)


def format_reward(completions, **kwargs):
    """1.0 when the completion is <think>...</think><answer>...</answer>, else 0.0."""
    pattern = r"^<think>.*?</think>\\s*<answer>.*?</answer>$"
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(pattern, content, re.DOTALL) else 0.0 for content in contents]


def accuracy_reward(completions, solution, **kwargs):
    """1.0 when the <answer> names the colour in the solution column, else 0.0."""
    rewards = []
    for completion, sol in zip(completions, solution):
        match = re.search(r"<answer>(.*?)</answer>", completion[0]["content"], re.DOTALL)
        rewards.append(1.0 if match and match.group(1).strip().lower() == sol else 0.0)
    return rewards


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_name_or_path", default="runs/tiny-qwen25vl")
    parser.add_argument("--output_dir", default="runs/trl-style-grpo")
    parser.add_argument("--max_steps", type=int, default=4)
    script_args = parser.parse_args()

    training_args = GRPOConfig(
        output_dir=script_args.output_dir,
        learning_rate=1e-4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=32,
        temperature=1.0,
        beta=0.0,
        max_steps=script_args.max_steps,
        logging_steps=1,
        report_to="none",
        seed=42,
    )
    processor = AutoProcessor.from_pretrained(script_args.model_name_or_path)
    trainer = GRPOTrainer(
        model=script_args.model_name_or_path,
        reward_funcs=[format_reward, accuracy_reward],
        args=training_args,
        train_dataset=make_dataset(12),
        processing_class=processor,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
'''


def _body(text: str) -> str:
    """The script without its leading comment block."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    return "".join(lines[start:])


def _swap_imports(text: str, ours: list[str], theirs: list[str]) -> str:
    """``text`` with the block of lines ``ours`` replaced by ``theirs`` (each line exactly once)."""
    lines = text.splitlines()
    at = [lines.index(line) for line in ours]
    assert all(lines.count(line) == 1 for line in ours) and at == list(range(at[0], at[0] + len(ours)))
    return "\n".join(lines[:at[0]] + theirs + lines[at[-1] + 1:]) + "\n"


def _load_script():
    spec = importlib.util.spec_from_file_location("trl_style_grpo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_differs_from_the_trl_original_only_in_import_lines():
    ours = SCRIPT.read_text()
    assert _swap_imports(_body(ours), OUR_IMPORTS, TRL_IMPORTS) == TRL_ORIGINAL
    changed = [line for line in difflib.unified_diff(_body(ours).splitlines(), TRL_ORIGINAL.splitlines(), n=0,
                                                    lineterm="")
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed and all(line[1:].startswith(("from ", "import ")) for line in changed), changed
    # the header comment shows the TRL import lines
    header = [line[1:].strip() for line in ours.splitlines() if line.startswith("#")]
    assert all(line in header for line in TRL_IMPORTS)


def test_its_reward_functions_score_as_trl_documents_them():
    m = _load_script()
    completions = [[{"role": "assistant", "content": "<think>it is all red</think><answer>Red</answer>"}],
                   [{"role": "assistant", "content": "<think>hm</think>\n<answer>blue</answer>"}],
                   [{"role": "assistant", "content": "red"}]]
    assert m.format_reward(completions=completions) == [1.0, 1.0, 0.0]
    assert m.accuracy_reward(completions=completions, solution=["red", "green", "red"]) == [1.0, 0.0, 0.0]
    rows = m.make_dataset(4)
    assert rows.column_names == ["prompt", "image", "solution"] and rows[3]["solution"] == "red"


def _run(script: Path, ckpt, out, steps: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(script), "--model_name_or_path", str(ckpt), "--output_dir",
                           str(out), "--max_steps", str(steps)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=out.parent)


def test_the_script_trains_the_tiny_vlm_and_logs_its_reward_functions(tiny_ckpt, tmp_path):
    run = _run(SCRIPT, tiny_ckpt, tmp_path / "run", 2)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for name in ("format_reward", "accuracy_reward"):
            assert 0.0 <= row[f"reward/{name}/mean"] <= 1.0 and row[f"reward/{name}/abstain_rate"] == 0.0
        assert row["loss"] is not None and math.isfinite(row["loss"]) and row["skipped_step"] == 0.0
        # 4 x 2 completions per step: 2 prompts x 4 generations (TRL's batch layout)
        assert row["completion/length_min"] >= 1
    assert (tmp_path / "run" / "model.safetensors").is_file()     # trainer.save_model(output_dir)


def test_trl_itself_runs_the_original(tiny_ckpt, tmp_path):
    """The TRL original under TRL (when TRL is installed; it is not a dependency). Two CPU-only
    adjustments, neither in the script: without torchvision, transformers' AutoProcessor cannot load
    Qwen2.5-VL, so the image-only processor line stays; and TRL defaults to bf16, which a CPU run
    turns off (bf16=False, use_cpu=True)."""
    pytest.importorskip("trl")
    import torch
    text = TRL_ORIGINAL
    if importlib.util.find_spec("torchvision") is None:
        text = text.replace(TRL_IMPORTS[0], OUR_IMPORTS[1])
    if not torch.cuda.is_available():
        assert text.count("        seed=42,\n") == 1
        text = text.replace("        seed=42,\n", "        seed=42,\n        bf16=False,\n        use_cpu=True,\n")
    ast.parse(text)
    script = tmp_path / "trl_original.py"
    script.write_text(text)
    run = _run(script, tiny_ckpt, tmp_path / "run", 1)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "rewards/format_reward/mean" in run.stdout + run.stderr       # TRL's own log line
    assert (tmp_path / "run" / "model.safetensors").is_file()
