"""ZeRO-3's parameter-fetch trace across generation rounds, with 2 real processes (gloo, CPU);
launched by tests/grpo/test_zero3_trace.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/grpo/ds_zero3_trace.py OUT_DIR CKPT

A real GRPO run (sampled rollouts, a reference engine, mu = 2 so each round has a no-grad pass of
the policy before its updates, rank 1's prompts without an image) over 3 generation rounds. After
each round (on leaving ``engine.generation_model()``) and after each update, each rank records what
DeepSpeed's parameter coordinator says (ds_common.ZeroFetchProbe): the trace mode, whether the
start-of-forward reset hook is still registered, the modules' ds_ids, DeepSpeed's hook counts, and
the fetch/prefetch/all-gather events. Each rank writes OUT_DIR/rank<k>.json.
"""
import contextlib
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
from ds_common import LengthReward, ZeroFetchProbe, dataset, make_config, tiny_model  # noqa: E402

ROUNDS, MU = 3, 2


def main():
    out, ckpt = sys.argv[1], sys.argv[2]
    from grpo import GRPOTrainer
    rank = int(os.environ["RANK"])
    cfg = make_config(out + "/trace", deepspeed=os.path.join(out, "ds_zero3.json"), beta=0.04,
                      num_iterations=MU, max_steps=ROUNDS * MU, prompts_per_step=2)
    trainer = GRPOTrainer(tiny_model(ckpt), [LengthReward()], args=cfg, train_dataset=dataset(with_images=rank == 0),
                          processing_class=tiny_model.processor)
    engine = trainer.engine
    probe = ZeroFetchProbe(engine)
    ids_at_start, hooks_at_start = probe.ds_ids(), probe.hook_counts()
    rounds, updates = [], []

    generation_model = engine.generation_model

    @contextlib.contextmanager
    def watched_generation_model():
        before = probe.snapshot()
        with generation_model() as model:
            yield model
            during = ZeroFetchProbe.delta(probe.snapshot(), before)
        rounds.append({"trace": probe.trace(), "reset_hook": probe.reset_hook_registered(),
                       "ds_ids_unchanged": probe.ds_ids() == ids_at_start,
                       "hooks": list(probe.hook_counts()), "events_during_generation": during})
    engine.generation_model = watched_generation_model

    update = trainer.update

    def watched_update(batch):
        before = probe.snapshot()
        metrics = update(batch)
        updates.append({"events": ZeroFetchProbe.delta(probe.snapshot(), before), "trace": probe.trace(),
                        "trace_length": probe.trace_length(), "loss": metrics["loss"],
                        "micro_batches": len(trainer.micro_batches(len(batch.prompts)))})
        return metrics
    trainer.update = watched_update

    history = trainer.train()
    result = {"rounds": rounds, "updates": updates, "hooks_at_start": list(hooks_at_start),
              "steps": len(history), "kl": [h["kl_mean"] for h in history]}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
