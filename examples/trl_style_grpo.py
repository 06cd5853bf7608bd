# GRPO on a vision-language model, written as a TRL script: TRL's GRPOConfig fields, reward
# functions f(prompts, completions, **columns), a datasets.Dataset of rows in TRL's vision format
# (a conversational "prompt", an "image", a "solution" column). The TRL original of this file
# differs only in its two import lines, which read:
#
#     from transformers import AutoProcessor
#     from trl import GRPOConfig, GRPOTrainer
#
# (tests/examples/test_trl_port.py checks it). transformers' AutoProcessor needs torchvision for
# Qwen2.5-VL's video half; the image-only processor of `models` loads the same files without it.
#
#     python -m models.tiny --out runs/tiny-qwen25vl       # a tiny Qwen2.5-VL, built offline
#     python examples/trl_style_grpo.py --model_name_or_path runs/tiny-qwen25vl --max_steps 4
import argparse
import re

from datasets import Dataset
from PIL import Image

from grpo import GRPOConfig, GRPOTrainer
from models import ImageOnlyQwen2_5_VLProcessor as AutoProcessor

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
    pattern = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
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
