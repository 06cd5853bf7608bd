"""Dynamic sampling with 2 real processes under DeepSpeed ZeRO-3 (gloo, CPU), launched by
tests/grpo/test_dynamic_sampling_2proc.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/grpo/ds_dynamic_sampling.py OUT_DIR CKPT

Rank 1's own prompts carry no reward spread, rank 0's do, so rank 1 must generate extra rounds and
rank 0 must generate with it: under ZeRO-3 generation gathers the parameters collectively, so a rank
that stopped early would hang the job. Real sampling, 2 steps; each rank writes OUT_DIR/rank<k>.json.
"""
import json
import os
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
from ds_common import dataset, make_config, tiny_model  # noqa: E402

from rewards import Reward  # noqa: E402


class FlatFor(Reward):
    """Constant for the items in ``flat`` (zero-std groups), a dense length reward otherwise."""
    name = "flat_or_length"
    flat: set = set()

    def score(self, sample):
        if sample.extra["id"] in self.flat:
            return 0.5
        return max(0.0, 1.0 - abs(len(sample.completion) - 12) / 12)


class Counting:
    def __init__(self, sampler):
        self.sampler, self.calls = sampler, 0

    def __call__(self, *args, **kw):
        self.calls += 1
        return self.sampler(*args, **kw)


def main():
    from grpo import GRPOTrainer
    out, ckpt = sys.argv[1], sys.argv[2]
    cfg = make_config(out + "/run", deepspeed=os.path.join(out, "ds_zero3.json"), max_steps=2,
                      dynamic_sampling=True, max_resample_rounds=3)
    reward = FlatFor()
    trainer = GRPOTrainer(tiny_model(ckpt), [reward], args=cfg, train_dataset=dataset(),
                          processing_class=tiny_model.processor)
    rank = trainer.engine.rank
    mine = [it["id"] for r in range(cfg.max_steps) for it in trainer.items_for_round(r, cfg.prompts_per_step)]
    reward.flat = set(trainer.engine.all_gather_objects(mine)[1])   # rank 1's own prompts: no signal
    trainer.sampler = Counting(trainer.sampler)
    t0 = time.time()
    history = trainer.train()
    result = {"rank": rank, "calls": trainer.sampler.calls, "time": time.time() - t0,
              "flat_own": sorted(set(mine) & reward.flat),
              **{k: [h[k] for h in history] for k in ("loss", "grad_norm", "dynamic_sampling/extra_rounds",
                                                       "dynamic_sampling/zero_std_fraction",
                                                       "dynamic_sampling/filled_frac", "frac_zero_std_groups")}}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
