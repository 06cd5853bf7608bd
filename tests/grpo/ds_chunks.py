"""ZeRO-3 with ranks whose log-prob passes need different numbers of output-head chunks; launched
by tests/grpo/test_deepspeed_chunks.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/grpo/ds_chunks.py OUT_DIR CKPT

Rank 0's completions are 8 tokens long, rank 1's 2 tokens, and ``logprob_chunk_size`` = 4 rows:
rank 0 projects 4 x 8 = 32 rows per micro-batch in 8 chunks, rank 1 4 x 2 = 8 rows in 2. Under
ZeRO-3 every call of the output head gathers its partitioned weight (a collective), so the ranks
must call it equally often. Each rank writes OUT_DIR/rank<k>.json with its losses.
"""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
from ds_common import LengthReward, dataset, make_config, tiny_model  # noqa: E402


class RankLengthSampler:
    """Completions of a fixed length per rank (8 tokens on rank 0, 2 on rank 1), varied tokens."""

    def __call__(self, model, adapter, prompts, cfg, chunk=None):
        from grpo.rollout import Completions, mask_after_eos
        length = 8 if int(os.environ["RANK"]) == 0 else 2
        g = torch.Generator().manual_seed(len(prompts))
        ids = torch.randint(100, 600, (len(prompts), cfg.max_completion_length), generator=g)
        ids[:, length:] = adapter.eos_token_ids[0]
        ids[::2, length - 1] = adapter.eos_token_ids[0]  # lengths vary inside a group: advantages != 0
        mask, truncated = mask_after_eos(ids, adapter.eos_token_ids)
        return Completions(ids, mask, truncated)


def run(ckpt, out, chunk):
    """Two GRPO steps (beta > 0: a ZeRO-3 reference engine too); the losses and, per forward of
    the policy and the reference, how often each called its output head."""
    from grpo import GRPOTrainer
    cfg = make_config(f"{out}/run{chunk}", deepspeed=os.path.join(out, "ds_zero3.json"), beta=0.04, max_steps=2,
                      max_completion_length=8, logprob_chunk_size=chunk, num_iterations=1)
    trainer = GRPOTrainer(tiny_model(ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                          processing_class=tiny_model.processor)
    trainer.sampler = RankLengthSampler()
    calls = []
    for engine in (trainer.engine.engine, trainer.engine.ref_module):   # ZeRO-3: both DeepSpeed engines
        head = engine.module.adapter.output_head(engine.module.model)
        head.register_forward_hook(lambda *a: calls.append(1))
    history = trainer.train()
    return {"loss": [h["loss"] for h in history], "kl": [h["kl_mean"] for h in history],
            "grad_norm": [h["grad_norm"] for h in history], "head_calls": len(calls)}


def main():
    out, ckpt = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    result = {"whole": run(ckpt, out, 1024), "chunked": run(ckpt, out, 4)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
