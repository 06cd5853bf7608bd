"""A real GRPO run for the kill-and-resume tests (run as a subprocess, never imported by pytest).

    python crash_runner.py OUT CKPT JUDGE_URL MAX_STEPS

Trains the tiny Qwen2.5-VL with a length reward and a ProcessReward judged by the local rubric
server (judge cache in OUT/judge.sqlite), saving a checkpoint every step and resuming from the
latest one. ``PAUSE_AT`` makes it stop at a precise point, print ``PAUSED ...`` and wait there
for the test to SIGKILL it:

    generate:R     round R's completions are sampled, not yet scored
    judge:R:K      K judgments of round R are paid and cached, the rest are in flight
    save:S         checkpoint S is written to its temporary folder, its manifest is not

Each PAUSED/DONE line carries ``successes=N``: judgments this process paid for. On a normal exit
OUT/ledger.json holds the judge ledger. ``LOG_LEVEL`` sets the root log level (stderr).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "grpo"))

import grpo.checkpoint as ckpt  # noqa: E402
from ds_common import LengthReward, dataset  # noqa: E402
from grpo import GRPOConfig, GRPOTrainer  # noqa: E402
from models import ModelConfig, load_policy, load_processor  # noqa: E402
from rewards import JudgeConfig, ProcessReward  # noqa: E402

PAUSE = os.environ.get("PAUSE_AT", "").split(":") if os.environ.get("PAUSE_AT") else None
STATE = {"round": -1, "paid_this_round": 0}


def pause(tag: str, reward: ProcessReward) -> None:
    print(f"PAUSED {tag} successes={reward.client.ledger.counts['successes']}", flush=True)
    time.sleep(3600)  # the test SIGKILLs us here


class PausingProcessReward(ProcessReward):
    async def ascore(self, sample):
        score = await super().ascore(sample)
        STATE["paid_this_round"] += 1
        if PAUSE and PAUSE[0] == "judge" and STATE["round"] == int(PAUSE[1]) \
                and STATE["paid_this_round"] == int(PAUSE[2]):
            print(f"PAUSED judge successes={self.client.ledger.counts['successes']}", flush=True)
            await asyncio.sleep(3600)  # other judgments of the batch keep running meanwhile
        return score


def main(out: str, ckpt_path: str, judge_url: str, max_steps: int) -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))  # DEBUG: every library's log
    judge = PausingProcessReward(JudgeConfig(base_url=judge_url, cache_path=str(Path(out) / "judge.sqlite"),
                                             max_retries=2, timeout=30.0))
    cfg = GRPOConfig(num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=max_steps,
                     learning_rate=1e-2, max_completion_length=8, beta=0.04, output_dir=out,
                     disable_tqdm=True, seed=7, save_steps=1, save_total_limit=2, log_completions=True, num_completions_to_print=2,
                     resume_from_checkpoint="auto")
    model = load_policy(ModelConfig(ckpt_path, freeze_vision=True))
    trainer = GRPOTrainer(model, [LengthReward(), judge], args=cfg, train_dataset=dataset(),
                          processing_class=load_processor(ckpt_path))
    rollout, sampler = trainer.rollout, trainer.sampler

    def tracked_rollout(round_idx):
        STATE.update(round=round_idx, paid_this_round=0)
        return rollout(round_idx)

    def pausing_sampler(*args, **kw):
        comp = sampler(*args, **kw)
        if PAUSE and PAUSE[0] == "generate" and STATE["round"] == int(PAUSE[1]):
            pause("generate", judge)
        return comp

    write_manifest = ckpt.write_manifest

    def pausing_manifest(folder):
        if PAUSE and PAUSE[0] == "save" and folder.name == f".tmp-checkpoint-{PAUSE[1]}":
            pause("save", judge)
        write_manifest(folder)

    trainer.rollout, trainer.sampler, ckpt.write_manifest = tracked_rollout, pausing_sampler, pausing_manifest
    trainer.train()
    (Path(out) / "ledger.json").write_text(json.dumps(judge.metrics()))
    print(f"DONE successes={judge.client.ledger.counts['successes']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
