"""Run by test_rel_numerics.py under torch.distributed.run with 2 processes (ZeRO-3, gloo): the
loss of step 2 is NaN on rank 0 only. Writes OUT/rank<r>.json with what each rank saw."""
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "grpo"))
from ds_common import FixedSampler, LengthReward, dataset, make_config, tiny_model, write_ds_config  # noqa: E402

from grpo import GRPOTrainer  # noqa: E402

out, ckpt = sys.argv[1], sys.argv[2]
cfg = make_config(out, max_steps=3, deepspeed=write_ds_config(out))
t = GRPOTrainer(tiny_model(ckpt), [LengthReward()], args=cfg, train_dataset=dataset(), processing_class=tiny_model.processor)
t.sampler = FixedSampler()
rollout = t.rollout


def poisoned(round_idx):
    batch = rollout(round_idx)
    if round_idx == 1 and t.engine.rank == 0:
        batch.advantages[0] = float("nan")
    return batch


t.rollout = poisoned
history = t.train()
inner = t.engine.optimizer.optimizer  # the torch AdamW under ZeRO-3's partitioned wrapper
result = {"skipped_step": [h["skipped_step"] for h in history], "skipped_steps": [h["skipped_steps"] for h in history],
          "adam_steps": sorted({int(s["step"]) for s in inner.state.values()}),
          "lr_steps": t.engine.scheduler.last_epoch}
Path(out, f"rank{t.engine.rank}.json").write_text(json.dumps(result))
