"""The smallest complete GRPO run, written with the public API only (what ``grpo``, ``models``,
``rewards`` and ``data`` export): a tiny Qwen2.5-VL built offline, eight embedded pathology tiles,
the built-in accuracy and format rewards next to a custom one, and eight optimizer steps on the
CPU (about 10 seconds).

    python examples/grpo_minimal.py --out runs/grpo_minimal

Each step appends one JSON line to <out>/grpo/metrics.jsonl: every reward's mean
(``reward/<name>/mean``), the loss, the KL to the reference model, completion lengths, timings.
For real data and a real checkpoint, swap the two lines marked below (see README.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

import data  # noqa: E402
from grpo import GRPOConfig, GRPOTrainer  # noqa: E402
from models import ensure_tiny_checkpoint  # noqa: E402
from rewards import AccuracyReward, FormatReward, Reward  # noqa: E402


class ConciseReasoning(Reward):
    """A custom reward: override ``score`` (one sample in; a float in ``range``, or None to
    abstain). Full marks for reasoning of at most ``max_words`` words, 0 from twice that on."""
    name = "concise"        # its metric is reward/concise/mean
    weight = 0.5            # the built-in rewards weigh 1.0
    max_words = 12

    def score(self, sample):
        reasoning = sample.completion.split("</think>")[0].replace("<think>", "")
        return min(1.0, max(0.0, 2.0 - len(reasoning.split()) / self.max_words))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/grpo_minimal", help="output folder")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    args = parser.parse_args(argv)
    out = Path(args.out)

    model = ensure_tiny_checkpoint(out / "tiny-model")   # <- or your Qwen2.5-VL checkpoint folder
    records = data.load_embedded("pathology", n=8)        # <- or data.load_dataset("train.jsonl")
    rewards = [AccuracyReward(), FormatReward(), ConciseReasoning()]
    config = GRPOConfig(num_generations=4, per_device_train_batch_size=8, max_steps=args.steps,
                        learning_rate=1e-4, max_completion_length=32, beta=0.04,
                        output_dir=str(out / "grpo"), disable_tqdm=True)
    trainer = GRPOTrainer(str(model), rewards, args=config, train_dataset=records)  # loads the processor too
    history = trainer.train()

    for step, row in enumerate(history, start=1):
        means = "  ".join(f"{r.name} {row[f'reward/{r.name}/mean']:.2f}" for r in rewards)
        print(f"step {step}: loss {row['loss']:+.4f}  kl {row['kl_mean']:.5f}  {means}")
    print(f"metrics: {out / 'grpo' / 'metrics.jsonl'}")
    return history


if __name__ == "__main__":
    main()
