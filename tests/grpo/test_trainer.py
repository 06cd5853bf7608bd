"""GRPOTrainer in one process: it learns, it resumes exactly, it logs what it promises, and its
checkpoints are atomic and verified."""
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ds_common import FixedSampler, LengthReward, dataset, make_config, tiny_model  # noqa: E402

from grpo import GRPOConfig, GRPOTrainer
from grpo.checkpoint import latest_checkpoint, verify
from grpo.config import SFTConfig
from grpo.metrics import read_metrics
from grpo.rollout import mask_after_eos
from grpo.sft import SFTTrainer
from rewards import Reward

COLOURS = {"A": (220, 30, 30), "B": (30, 30, 220)}


class ColourLetter(Reward):
    """1 when the completion is exactly the letter naming the image's colour."""
    name = "colour"

    def score(self, sample):
        return 1.0 if sample.completion.strip() == sample.answer else 0.0


def colour_items(n=32, seed=0):
    from PIL import Image
    rng = random.Random(seed)
    items = []
    for i in range(n):
        k = "AB"[i % 2]
        items.append({"id": str(i), "question": "Colour?", "answer": k, "target": rng.choice("AB"),
                      "images": [Image.new("RGB", (56, 56), COLOURS[k])],
                      "messages": [{"role": "user", "content": [{"type": "image"},
                                                                {"type": "text", "text": "Colour? A) red B) blue"}]}]})
    return items


def test_grpo_learns_the_colour_letter_after_format_only_sft(tiny_ckpt, tmp_path):
    """SFT teaches the answer format with letters drawn independently of the image (so it cannot
    teach the colour); GRPO with the colour reward must then learn to read the image."""
    items, model = colour_items(), tiny_model(tiny_ckpt)
    model.model.visual.requires_grad_(True)
    proc = tiny_model.processor
    SFTTrainer(model, SFTConfig(batch_size=16, micro_batch_size=16, max_steps=30, learning_rate=3e-3,
                                output_dir=str(tmp_path / "sft"), progress_bar=False), items, proc).train()
    cfg = GRPOConfig(num_generations=8, prompts_per_step=4, micro_batch_size=32, max_steps=40, learning_rate=1e-3,
                     max_completion_length=3, beta=0.0, output_dir=str(tmp_path / "grpo"), progress_bar=False)
    history = GRPOTrainer(model, [ColourLetter()], args=cfg, train_dataset=items, processor=proc).train()
    rewards = [h["reward/mean"] for h in history]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert 0.25 < first < 0.75          # SFT left it at chance on the colour
    assert last > 0.85 and last > first + 0.25


def test_batch_not_divisible_by_micro_batch_names_the_fields():
    with pytest.raises(ValueError, match="prompts_per_step \\* num_generations = 12 .* micro_batch_size=8"):
        GRPOConfig(prompts_per_step=3, num_generations=4, micro_batch_size=8)
    with pytest.raises(ValueError, match="num_generations=1"):
        GRPOConfig(num_generations=1, micro_batch_size=2, prompts_per_step=2)


def test_resume_from_step_k_gives_the_same_next_losses(tiny_ckpt, tmp_path):
    """Real sampling (RNG restored from the checkpoint), 5 steps straight vs 2 + resume to 5."""
    def run(out, steps, resume=None, save_steps=0):
        cfg = make_config(str(out), max_steps=steps, save_steps=save_steps, beta=0.04,
                          resume_from_checkpoint=resume, loss_aggregation="token_mean")
        return GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                           processor=tiny_model.processor).train()
    straight = run(tmp_path / "a", 5)
    run(tmp_path / "b", 2, save_steps=2)
    resumed = run(tmp_path / "b", 5, resume="auto")
    assert len(resumed) == 3
    for key in ("loss", "reward/mean", "grad_norm", "kl_mean", "completion/length_mean"):
        assert [h[key] for h in resumed] == pytest.approx([h[key] for h in straight[2:]], rel=1e-6, abs=1e-9), key
    assert abs(resumed[-1]["loss"]) > 0
    steps = [m["step"] for m in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]     # nothing duplicated or missing across the resume


def test_metrics_cover_rewards_lengths_kl_clipping_and_timings(tiny_ckpt, tmp_path):
    cfg = make_config(str(tmp_path), max_steps=2, beta=0.04, num_iterations=2, log_completions=2)
    GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                processor=tiny_model.processor).train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    expected = {"reward/mean", "reward/std", "reward/length/mean", "reward/length/std", "frac_zero_std_groups",
                "completion/length_mean", "completion/length_min", "completion/length_max",
                "completion/truncated_frac", "kl_mean", "entropy", "clipfrac_low", "clipfrac_high",
                "ratio_mean", "ratio_min", "ratio_max", "grad_norm", "learning_rate", "loss",
                "time/generate", "time/reward", "time/logprobs", "time/update", "time/step"}
    assert expected <= set(rows[0]), expected - set(rows[0])
    assert rows[0]["ratio_min"] == rows[0]["ratio_max"] == 1.0      # first pass: on-policy
    assert rows[1]["ratio_min"] < 1.0 < rows[1]["ratio_max"]        # mu=2: second pass is off-policy
    assert rows[0]["completion/length_min"] <= rows[0]["completion/length_mean"] <= rows[0]["completion/length_max"]
    logged = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and {"completion", "reward", "id"} <= set(logged[0])


def test_mask_after_first_eos_and_truncation_flag():
    ids = torch.tensor([[5, 6, 9, 7, 9], [5, 6, 7, 8, 4], [9, 1, 1, 1, 1]])
    mask, truncated = mask_after_eos(ids, eos_ids=[9])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_masked_truncated_completions_leave_the_loss(tiny_ckpt, tmp_path):
    cfg = make_config(str(tmp_path), max_steps=1, mask_truncated_completions=True)
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                          processor=tiny_model.processor)
    trainer.sampler = FixedSampler()
    batch = trainer.rollout(0)
    truncated = batch.completions.truncated
    assert truncated.any() and (~truncated).any()
    assert batch.loss_mask[truncated].sum() == 0
    assert torch.equal(batch.loss_mask[~truncated], batch.completions.mask[~truncated])
    assert batch.num_tokens == float(batch.completions.mask[~truncated].sum())


def test_image_placeholders_are_never_sampled(tiny_ckpt, tmp_path):
    cfg = make_config(str(tmp_path), max_steps=1, max_completion_length=16, temperature=5.0)
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                          processor=tiny_model.processor)
    ids = trainer.rollout(0).completions.ids
    assert not torch.isin(ids, torch.tensor(trainer.adapter.never_sample_ids)).any()


def test_checkpoint_crash_mid_save_and_corruption_are_detected(tiny_ckpt, tmp_path):
    cfg = make_config(str(tmp_path), max_steps=2, save_steps=1, save_total_limit=3)
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                          processor=tiny_model.processor)
    trainer.sampler = FixedSampler()
    trainer.train()
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    # a crash while writing checkpoint-3 leaves only its temporary folder: ignored
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / ".tmp-checkpoint-3")
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    # a flipped byte in the newest checkpoint: detected, the previous one is used
    weights = tmp_path / "checkpoint-2" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="does not match its sha256"):
        verify(tmp_path / "checkpoint-2")
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"


def test_sft_trains_only_on_assistant_tokens(tiny_ckpt, tmp_path):
    items = colour_items(8)
    for it in items:
        it["target"] = "<answer>" + it["answer"] + "</answer>"
    trainer = SFTTrainer(tiny_model(tiny_ckpt), SFTConfig(batch_size=8, micro_batch_size=4, max_steps=25,
                         learning_rate=3e-3, output_dir=str(tmp_path), progress_bar=False), items,
                         tiny_model.processor)
    ids, mask = trainer.encode_targets(items[:2])
    tok = trainer.adapter.tokenizer
    assert tok.decode(ids[0][mask[0].bool()]) == "<answer>A</answer><|im_end|>"   # target + end of turn only
    history = trainer.train()
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["token_prob_mean"] > 0.6
