"""Memory of a GRPO step: full fine-tuning against LoRA (``peft_config=``), side by side.

One GRPOTrainer step at the paper's beta = 0.04 (so a reference model is needed) on a small
Qwen2.5-VL built here: the decoder at Qwen2.5-0.5B's width (hidden 896, 14 heads, 2 KV heads,
MLP 4864) with 8 layers instead of 24, the tiny vision tower (frozen in both variants) and the
2k BPE vocabulary, ~121M parameters, fp32 on CPU. LoRA: rank 16 on the language model's q, k, v,
o, gate, up and down projections (``models.lora.default_lora_config``).

Each variant runs in a fresh process (``bench/harness.py``'s rule: its own ``ru_maxrss``). Reported:

* ``weights_bytes``: every distinct parameter storage the trainer holds, policy and reference
  together (full fine-tuning keeps a frozen copy as the reference; LoRA's reference is the same
  network with its adapters disabled);
* ``grad_bytes``: the gradients present when the optimizer steps (trainable parameters only);
* ``optimizer_bytes``: AdamW's state after the step;
* ``state_bytes``: the sum of the three, the part LoRA changes by construction;
* ``peak_rss_mb``: the process's resident-set high-water mark after the measured steps (weights,
  state, activations, the Python/torch runtime);
* ``step_s``: median step time.

``ratios``: lora / full of each. Completions are forced to ``--tokens`` tokens (EOS never sampled)
so both variants do the same work.

    python bench/lora_memory.py [--out bench/results/lora_memory.json] [--layers 8] [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from harness import ROOT, our_bench_parts, bench_parser, images, peak_rss_mb, question, versions, write

SMALL = dict(text_hidden=896, text_heads=14, text_kv_heads=2, text_intermediate=4864)


def small_model(layers: int) -> str:
    from models.tiny import TinySpec, ensure_tiny_checkpoint
    return str(ensure_tiny_checkpoint(f"/tmp/grpo-bench/small-qwen25vl-{layers}l", TinySpec(text_layers=layers, **SMALL)))


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def worker(cfg: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    from grpo import GRPOConfig, GRPOTrainer
    from models import ModelConfig, load_policy, load_processor

    LengthReward, ForcedLength = our_bench_parts()

    path = cfg["model"]
    proc = load_processor(path)
    torch.manual_seed(cfg["seed"])
    model = load_policy(ModelConfig(path, freeze_vision=True))
    peft_config = None
    if cfg["variant"] == "lora":
        from models.lora import default_lora_config
        peft_config = default_lora_config(r=cfg["r"], lora_alpha=2 * cfg["r"])
    steps = cfg["steps"] + cfg["warmup"]
    n = cfg["prompts"] * steps
    items = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(i)}]}],
              "images": [img], "question": question(i), "answer": "A"}
             for i, img in enumerate(images(n, cfg["image_px"], cfg["seed"]))]
    args = GRPOConfig(num_generations=cfg["g"], per_device_train_batch_size=cfg["prompts"] * cfg["g"],
                      max_steps=steps, max_completion_length=cfg["tokens"], beta=cfg["beta"],
                      learning_rate=1e-5, seed=cfg["seed"], output_dir=f"/tmp/grpo-bench/lora_memory-{cfg['variant']}",
                      disable_tqdm=True)
    trainer = GRPOTrainer(model, [LengthReward()], args=args, train_dataset=items, adapter=ForcedLength(proc),
                          peft_config=peft_config)
    engine = trainer.engine
    held = list(engine.module.parameters())
    if isinstance(engine.ref_module, torch.nn.Module):
        held += list(engine.ref_module.parameters())
    grads = []
    step = engine.step

    def counted_step():  # the gradients are complete (and largest) just before the optimizer step
        grads.append(_unique_bytes(p.grad for g in engine.optimizer.param_groups for p in g["params"]
                                   if p.grad is not None))
        return step()
    engine.step = counted_step
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        metrics = trainer.training_step(s)
        if s >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
        assert metrics["completion/length_min"] == cfg["tokens"], "completions must all have `tokens` tokens"
    opt = _unique_bytes(t for state in engine.optimizer.state.values() for t in state.values()
                        if torch.is_tensor(t) and t.dim() > 0)
    weights = _unique_bytes(held)
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in engine.module.parameters())
    return {"variant": cfg["variant"], "params_total": total, "params_trainable": trainable,
            "weights_bytes": weights, "grad_bytes": max(grads), "optimizer_bytes": opt,
            "state_bytes": weights + max(grads) + opt, "peak_rss_mb": peak_rss_mb(),
            "step_s": statistics.median(times), "steps_s": times, "loss": metrics["loss"]}


def main(argv=None):
    p = bench_parser(__doc__, steps=2, warmup=1)
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the small model")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    model = a.model or small_model(a.layers)
    base = dict(model=model, prompts=2, g=4, tokens=a.tokens, beta=0.04, image_px=112, r=a.r, seed=0,
                steps=a.steps, warmup=a.warmup)
    runs = {v: run_self({**base, "variant": v}) for v in ("full", "lora")}
    ok = all("error" not in r for r in runs.values())
    keys = ("weights_bytes", "grad_bytes", "optimizer_bytes", "state_bytes", "peak_rss_mb", "step_s")
    ratios = {k: runs["lora"][k] / runs["full"][k] for k in keys} if ok else None
    report = {"benchmark": "lora_memory", "config": {**base, "layers": a.layers, "dtype": "float32"},
              "runs": runs, "ratios": ratios,
              "memory_method": "distinct parameter storages of policy + reference; gradients just before the "
                               "optimizer step; AdamW state after it; ru_maxrss of a fresh process per variant",
              "versions": versions()}
    write("lora_memory", report, a.out)


def run_self(cfg: dict, timeout: int = 1800) -> dict:
    """One variant in a fresh process (its own peak RSS)."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"worker exited {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    return json.loads(lines[-1])


if __name__ == "__main__":
    main()
