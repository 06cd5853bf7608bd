"""A 2-process GRPO run (ZeRO-2, gloo) in which rank 1 raises at step 2; run by
test_rel_rank_failure.py under a launcher, never imported by pytest:

    torchrun --nproc_per_node 2 rank_failure_runner.py OUT CKPT WHERE
    deepspeed --num_gpus 2 rank_failure_runner.py OUT CKPT WHERE     (appends --local_rank=N)

WHERE is where rank 1 raises during step 2 (round 1): ``reward`` (its reward function),
``rollout`` (generation) or ``update`` (the optimizer step). Just before raising, rank 1
prints ``FAILING rank=1 t=<time.time()>`` so that the test can time the job's end from the
failure, not from the launch. checkpoint-1 is written before (save_steps=1).
"""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "grpo"))
from ds_common import LengthReward, dataset, make_config, tiny_model, write_ds_config  # noqa: E402

from grpo import GRPOTrainer  # noqa: E402
from rewards import Reward  # noqa: E402

MESSAGE = "injected failure on rank 1 at step 2"
STATE = {"round": -1}


def fail_here(where: str, rank: int) -> None:
    if rank == 1 and STATE["round"] == 1 and WHERE == where:
        print(f"FAILING rank={rank} t={time.time():.3f}", flush=True)
        raise ValueError(MESSAGE)


class FlakyReward(Reward):
    name = "flaky"

    def score(self, sample):
        fail_here("reward", int(os.environ["RANK"]))
        return 0.5


args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher's
out, ckpt, WHERE = args
ds_dir = os.path.join(out, f"ds-rank{os.environ['RANK']}")  # one per rank: no rank reads a half-written one
os.makedirs(ds_dir, exist_ok=True)
write_ds_config(ds_dir)
cfg = make_config(out, max_steps=3, save_steps=1, deepspeed=os.path.join(ds_dir, "ds_zero2.json"))
trainer = GRPOTrainer(tiny_model(ckpt), [LengthReward(), FlakyReward()], args=cfg, train_dataset=dataset(),
                      processing_class=tiny_model.processor)
rank = trainer.engine.rank
rollout, sampler, update = trainer.rollout, trainer.sampler, trainer.update


def tracked_rollout(round_idx):
    STATE["round"] = round_idx
    return rollout(round_idx)


def failing_sampler(*a, **kw):
    fail_here("rollout", rank)
    return sampler(*a, **kw)


def failing_update(batch):
    fail_here("update", rank)
    return update(batch)


trainer.rollout, trainer.sampler, trainer.update = tracked_rollout, failing_sampler, failing_update
print(f"READY rank={rank} pid={os.getpid()} t={time.time():.3f}", flush=True)
trainer.train()
print(f"DONE rank={rank}", flush=True)
