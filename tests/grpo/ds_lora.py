"""LoRA under DeepSpeed with 2 processes, launched by tests/grpo/test_lora.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/grpo/ds_lora.py OUT_DIR CKPT

Each rank writes OUT_DIR/rank<k>.json. Scenarios:
  zero2, zero3  GRPO with peft_config on the fixed global batch (beta > 0, mu = 2; under ZeRO-3 the
                trainer loads the checkpoint partitioned and peft wraps the partitioned model): losses, grad
                norms, KL, every adapter weight (gathered), the largest change of any base weight
                against a fresh load of the checkpoint (gathered), and the adapters and the merged
                model saved by save_model; the test compares them with a 1-process run.
  resume        ZeRO-3 + LoRA: 3 steps straight vs 1 step, checkpoint, resume to 3.
"""
import json
import os
import sys
import time

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
from ds_common import FixedSampler, LengthReward, dataset, make_config, tiny_model  # noqa: E402

# test_deepspeed.py's fixed batch: token-level loss, a reference (here: adapters disabled), mu = 2
LORA_BATCH = dict(prompts_per_step=2, loss_type="dapo", beta=0.04, num_iterations=2, max_steps=4)


def lora_config():
    from models.lora import default_lora_config
    return default_lora_config(r=4, lora_alpha=8)


def gathered(params):
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(params))


def scenario_train(ckpt, out, variant):
    from grpo import GRPOTrainer
    from models import ModelConfig, load_policy
    from models.lora import AdaptersDisabled
    cfg = make_config(f"{out}/{variant}", deepspeed=os.path.join(out, f"ds_{variant}.json"), **LORA_BATCH)
    # ZeRO-3: the trainer loads the checkpoint itself, partitioned from the start, and peft injects
    # the adapters into the partitioned model; ZeRO-2: a model loaded by the caller
    model = ModelConfig(str(ckpt), freeze_vision=True) if variant == "zero3" else tiny_model(ckpt)
    trainer = GRPOTrainer(model, [LengthReward()], args=cfg, train_dataset=dataset(),
                          processing_class=None if variant == "zero3" else tiny_model.processor,
                          peft_config=lora_config())
    trainer.sampler = FixedSampler()
    partitioned = all(hasattr(p, "ds_id") for p in trainer.engine.model.parameters()) if variant == "zero3" else None
    history = trainer.train()
    model = trainer.engine.model
    fresh = dict(load_policy(ModelConfig(str(ckpt), freeze_vision=True)).named_parameters())
    with gathered(model.parameters()):
        adapters = {n: p.detach().flatten().tolist() for n, p in model.named_parameters() if ".lora_" in n}
        change = max(float((p.detach() - fresh[n.replace(".base_layer.", ".")]).abs().max())
                     for n, p in model.named_parameters() if ".lora_" not in n)
    saved = f"{out}/{variant}/saved"
    trainer.save_model(f"{saved}/adapters")
    trainer.save_model(f"{saved}/merged", merged=True)
    ref = trainer.engine.ref_module
    return {"loss": [h["loss"] for h in history], "grad_norm": [h["grad_norm"] for h in history],
            "kl": [h["kl_mean"] for h in history], "zero_stage": trainer.engine.zero_stage,
            "world_size": trainer.engine.world_size, "adapters": adapters, "base_max_abs_change": change,
            "reference_shares_policy": isinstance(ref, AdaptersDisabled) and ref.lora.model is model,
            "saved": saved, "partitioned": partitioned}


def scenario_resume(ckpt, out):
    from grpo import GRPOTrainer
    ds_cfg = os.path.join(out, "ds_zero3.json")

    def run(folder, steps, **kw):
        trainer = GRPOTrainer(tiny_model(ckpt), [LengthReward()], train_dataset=dataset(),
                              processing_class=tiny_model.processor, peft_config=lora_config(),
                              args=make_config(f"{out}/{folder}", deepspeed=ds_cfg, beta=0.04, max_steps=steps, **kw))
        trainer.sampler = FixedSampler()
        return [h["loss"] for h in trainer.train()]
    full = run("resume_full", 3, save_steps=0)
    run("resume_part", 1, save_steps=1)
    files = sorted(os.path.relpath(os.path.join(d, f), f"{out}/resume_part/checkpoint-1")
                   for d, _, fs in os.walk(f"{out}/resume_part/checkpoint-1") for f in fs)
    tail = run("resume_part", 3, resume_from_checkpoint="auto")
    return {"full": full, "tail": tail, "checkpoint_files": files}


def main():
    out, ckpt = sys.argv[1], sys.argv[2]
    result = {}
    for variant in ("zero2", "zero3"):
        t0 = time.time()
        result[variant] = scenario_train(ckpt, out, variant)
        result[f"time/{variant}"] = time.time() - t0
    t0 = time.time()
    result["resume"] = scenario_resume(ckpt, out)
    result["time/resume"] = time.time() - t0
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
