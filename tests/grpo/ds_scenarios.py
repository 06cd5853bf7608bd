"""Multi-process scenarios, launched once per test session by tests/grpo/test_deepspeed.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/grpo/ds_scenarios.py OUT_DIR CKPT

Each rank writes OUT_DIR/rank<k>.json; the tests read them. Scenarios:
  fixed_batch  ZeRO-3 GRPO update on a fixed global batch: loss, params after the step, whether
               parameters are partitioned; compared by the test with a 1-process run.
  generate     a real ZeRO-3 rollout + update (gathered generation, reference engine, beta > 0),
               with rank 1's prompts holding no image.
  resume       save a ZeRO-3 checkpoint, load it into a fresh engine, compare the next losses.
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
from ds_common import ( # noqa: E402
    FIXED_BATCH, FixedSampler, LengthReward, dataset, gathered_params, make_config, tiny_model)


def scenario_other_zero_stages(ckpt, out):
    """ZeRO-2 and ZeRO-3 + optimizer offload on the fixed batch (gradient accumulation 2)."""
    from grpo import GRPOTrainer
    result = {}
    for name in ("zero2", "zero3_offload"):
        cfg = make_config(f"{out}/{name}", deepspeed=os.path.join(out, f"ds_{name}.json"), **FIXED_BATCH)
        trainer = GRPOTrainer(tiny_model(ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                              processing_class=tiny_model.processor)
        trainer.sampler = FixedSampler()
        history = trainer.train()
        result[name] = {"loss": [h["loss"] for h in history], "grad_norm": [h["grad_norm"] for h in history],
                        "kl": [h["kl_mean"] for h in history], "zero_stage": trainer.engine.zero_stage}
    return result


def scenario_fixed_batch(ckpt, out):
    from grpo import GRPOTrainer
    import deepspeed
    cfg = make_config(out, deepspeed=os.path.join(out, "ds_zero3.json"), **FIXED_BATCH)
    trainer = GRPOTrainer(tiny_model(ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                          processing_class=tiny_model.processor)
    trainer.sampler = FixedSampler()
    engine = trainer.engine.engine
    partitioned = [p.ds_tensor.numel() < p.ds_numel for p in engine.module.parameters()]
    history = trainer.train()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = gathered_params(engine.module.model)
    return {"loss": [h["loss"] for h in history], "reward_mean": [h["reward/mean"] for h in history],
            "grad_norm": [h["grad_norm"] for h in history], "kl": [h["kl_mean"] for h in history],
            "partitioned_frac": sum(partitioned) / len(partitioned), "params": params,
            "world_size": trainer.engine.world_size, "zero_stage": trainer.engine.zero_stage}


def scenario_generate(ckpt, out):
    from grpo import GRPOTrainer
    cfg = make_config(out + "/gen", deepspeed=os.path.join(out, "ds_zero3.json"), beta=0.04,
                      max_steps=2, prompts_per_step=2)
    rank = int(os.environ["RANK"])
    items = dataset(with_images=(rank == 0))  # rank 1's prompts hold no image
    trainer = GRPOTrainer(tiny_model(ckpt), [LengthReward()], args=cfg, train_dataset=items,
                          processing_class=tiny_model.processor)
    seed_after_init = torch.initial_seed()
    # the same prompt on both ranks, sampled with the trainer's sampler: per-rank seeds draw
    # different completions (with one shared seed both ranks would draw the same ones)
    same = trainer.adapter.encode_prompts([dataset(1, with_images=False)[0]["messages"]], [[]])
    state = torch.get_rng_state()
    with trainer.engine.generation_model() as gen_model:
        comp = trainer.sampler(gen_model, trainer.adapter, same.repeat_interleave(4), cfg)
    torch.set_rng_state(state)  # the training run below starts from the seeded state
    t0 = time.time()
    history = trainer.train()
    return {"gen_loss": [h["loss"] for h in history], "gen_kl": [h["kl_mean"] for h in history],
            "gen_lengths": [h["completion/length_mean"] for h in history], "gen_time": time.time() - t0,
            "gen_has_ref": trainer.engine.ref_module is not None, "gen_seed": seed_after_init,
            "gen_run_seed": cfg.seed, "gen_same_prompt_ids": comp.ids.tolist()}


def scenario_resume(ckpt, out):
    """Save at step 1, resume to step 3: the same losses as an uninterrupted run, with forced
    completions and with real sampling (each rank's own seeded stream, restored from the
    checkpoint's per-rank RNG state)."""
    from grpo import GRPOTrainer
    ds_cfg = os.path.join(out, "ds_zero3.json")
    result = {}
    for tag, fixed in (("", True), ("sampled_", False)):
        def trainer(sub, **kw):
            t = GRPOTrainer(tiny_model(ckpt), [LengthReward()], train_dataset=dataset(),
                            processing_class=tiny_model.processor,
                            args=make_config(f"{out}/{tag}{sub}", deepspeed=ds_cfg, **kw))
            if fixed:
                t.sampler = FixedSampler()
            return t
        full = [(h["loss"], h["completion/length_mean"]) for h in trainer("full", max_steps=3, save_steps=0).train()]
        trainer("part", max_steps=1, save_steps=1).train()
        tail = [(h["loss"], h["completion/length_mean"])
                for h in trainer("part", max_steps=3, resume_from_checkpoint="auto").train()]
        result[f"{tag}resume_full"], result[f"{tag}resume_tail"] = full, tail
    return result


def main():
    out, ckpt = sys.argv[1], sys.argv[2]
    result = {}
    for fn in (scenario_fixed_batch, scenario_other_zero_stages, scenario_generate, scenario_resume):
        t0 = time.time()
        result.update(fn(ckpt, out))
        result[f"time/{fn.__name__}"] = time.time() - t0
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
