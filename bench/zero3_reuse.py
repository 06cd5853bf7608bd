"""Prompt/image reuse under DeepSpeed ZeRO-3, 2 processes, at 1,024 image tokens: the GRPO step with
``reuse_prompts`` on and off, side by side in one run (issue 15).

Until this change the log-prob passes ran the per-row path under ZeRO-3 and with activation
checkpointing (``models.forward.can_share_prefix`` said no), so the paper's configuration got
none of the reuse in its reference pass, old-policy pass and policy forward/backward; only
generation shared the prompt. Now every pass runs each distinct prompt once there too. Variants:
"reuse" (as now), "before" (``can_share_prefix`` as it was, patched in: reuse in generation only)
and "no_reuse" (``reuse_prompts=False``: the per-row path everywhere, generation included, every
sample encoding its image and reading its prompt in every pass). Ratios are against "no_reuse".

Each variant is its own fresh ``torch.distributed.run`` job (2 ranks; gloo on CPU, NCCL on GPUs)
with ``examples/configs/zero3.json`` ("auto" values resolved from the trainer's config): the tiny
Qwen2.5-VL (or --model PATH), vision tower frozen, 896 x 896 images (1,024 image tokens), per
rank 2 prompts x G = 4 in 2 micro-batches of 4, exactly --tokens completion tokens (EOS and the
vision placeholders suppressed), beta 0.04 (a ZeRO-3 reference engine), mu 1, lr 1e-5. With
``--checkpointing`` both variants also run with activation checkpointing (the ratio is reported
per setting). Step time: rank 0's median over --steps steps after --warmup (the ranks run in
lockstep; rank 1's median is reported too), with the phases the trainer times
(generate / logprobs / update). Each job also counts the shared log-prob passes it ran
(``models.forward.shared_prefix_hidden`` calls), which shows which path ran.

Target: with reuse / without <= 0.5 at 1,024 image tokens under ZeRO-3.

    python bench/zero3_reuse.py [--model PATH] [--steps 3] [--warmup 1] [--tokens 192]
        [--checkpointing off on] [--out bench/results/zero3_reuse.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import (ROOT, our_bench_parts, bench_parser, ensure_model, images, peak_rss_mb,
                     processor, question, versions, write)

TARGET = 0.5
# reuse: every pass shares the prompt (now); before: generation only (the log-prob passes per row under
# ZeRO-3, as before this change); no_reuse: reuse_prompts=False, nothing shared
VARIANTS = ("reuse", "before", "no_reuse")
IMAGE_PX = 896                     # 32 x 32 merged patches of 28 px = 1,024 image tokens
DS_JSON = ROOT / "examples" / "configs" / "zero3.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(cfg: dict, timeout: int = 3600) -> dict:
    """One 2-rank job; returns rank 0's report with rank 1's step time."""
    with tempfile.TemporaryDirectory(prefix="zero3_reuse_") as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT),
               "MASTER_ADDR": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), __file__, "--worker", json.dumps(cfg), "--dir", out]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        reports = [Path(out, f"rank{r}.json") for r in (0, 1)]
        if proc.returncode != 0 or not all(p.is_file() for p in reports):
            return {"error": f"2-rank job exited {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
        r0, r1 = (json.loads(p.read_text()) for p in reports)
        r0.update(rank1_step_s=r1["step_s"], rank1_peak_rss_mb=r1["peak_rss_mb"],
                  job_wall_s=time.perf_counter() - t0)
        return r0


def can_share_prefix_before(model, sync_vision: bool = False) -> bool:
    """``models.forward.can_share_prefix`` before this change, verbatim: the "before" variant."""
    name = ("is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing")
            else "is_gradient_checkpointing")
    checkpointing = getattr(model, name, False)
    return not sync_vision and not checkpointing


# ------------------------------------------------------------------ the worker (one per rank)
def worker(cfg: dict, out: str) -> None:
    import torch
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    from grpo import GRPOConfig, GRPOTrainer
    from models import ModelConfig, forward, load_policy

    if cfg["variant"] == "before":  # the log-prob passes as before this change: per-row under ZeRO-3 / checkpointing
        forward.can_share_prefix = can_share_prefix_before
    shared_calls = [0]
    shared_prefix_hidden = forward.shared_prefix_hidden

    def counted(*a, **kw):
        shared_calls[0] += 1
        return shared_prefix_hidden(*a, **kw)
    forward.shared_prefix_hidden = counted

    LengthReward, ForcedLength = our_bench_parts()

    rank = int(os.environ["RANK"])
    proc = processor(cfg["model"], cfg)
    torch.manual_seed(cfg["seed"])
    model = load_policy(ModelConfig(cfg["model"], freeze_vision=True, gradient_checkpointing=cfg["checkpointing"]))
    steps = cfg["steps"] + cfg["warmup"]
    n = cfg["prompts"] * steps * 2                                     # both ranks' prompts
    items = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(i)}]}],
              "images": [img], "question": question(i), "answer": "A"}
             for i, img in enumerate(images(n, cfg["image_px"], cfg["seed"]))]
    args = GRPOConfig(num_generations=cfg["g"], per_device_train_batch_size=cfg["micro_batch"],
                      gradient_accumulation_steps=cfg["prompts"] * cfg["g"] // cfg["micro_batch"],
                      max_steps=steps, max_completion_length=cfg["tokens"], beta=cfg["beta"], num_iterations=1,
                      learning_rate=cfg["lr"], loss_type="grpo", seed=cfg["seed"],
                      reuse_prompts=cfg["variant"] != "no_reuse",
                      deepspeed=str(DS_JSON), output_dir=os.path.join(out, "run"), disable_tqdm=True)
    trainer = GRPOTrainer(model, [LengthReward()], args=args, train_dataset=items, adapter=ForcedLength(proc))
    times, parts, losses = [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        metrics = trainer.training_step(step)
        elapsed = time.perf_counter() - t0
        assert metrics["completion/length_min"] == cfg["tokens"], "completions must all have `tokens` tokens"
        losses.append(metrics["loss"])
        if step >= cfg["warmup"]:
            times.append(elapsed)
            parts.append({k: v for k, v in metrics.items() if k.startswith("time/")})
    report = {"config": cfg, "step_s": statistics.median(times), "steps_s": times,
              "phases_s": {k: statistics.median(p[k] for p in parts) for k in parts[0]},
              "shared_logprob_passes": shared_calls[0], "zero_stage": trainer.engine.zero_stage,
              "world_size": trainer.engine.world_size, "losses": losses, "peak_rss_mb": peak_rss_mb(),
              "versions": versions()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


# ------------------------------------------------------------------ the driver
def main(argv=None):
    p = bench_parser(__doc__, steps=3, warmup=1)
    p.add_argument("--tokens", type=int, default=192, help="completion tokens (forced; the paper's maximum)")
    p.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"],
                   help="activation checkpointing settings to measure (each: reuse on and off)")
    a = p.parse_args(argv)
    model = ensure_model(a.model)
    base = {"model": model, "prompts": 2, "g": 4, "micro_batch": 4, "tokens": a.tokens, "beta": 0.04,
            "image_px": IMAGE_PX, "lr": 1e-5, "seed": 0, "steps": a.steps, "warmup": a.warmup}
    runs, ratios = {}, {}
    for ckpt in a.checkpointing:
        run = {}
        for variant in VARIANTS:
            cfg = {**base, "variant": variant, "checkpointing": ckpt == "on"}
            run[variant] = r = run_variant(cfg)
            print(ckpt, variant, {k: r.get(k) for k in ("step_s", "phases_s", "shared_logprob_passes", "error")},
                  flush=True)
        off = run["no_reuse"]
        for variant in ("reuse", "before"):
            on = run[variant]
            if "error" not in on and "error" not in off:
                run[f"{variant}/no_reuse"] = {"step_s": on["step_s"] / off["step_s"],
                                              **{k: on["phases_s"][k] / off["phases_s"][k] for k in on["phases_s"]
                                                 if off["phases_s"].get(k)}}
        if "reuse/no_reuse" in run:
            ratios[f"checkpointing_{ckpt}"] = run["ratio"] = run["reuse/no_reuse"]["step_s"]
        runs[f"checkpointing_{ckpt}"] = run
    main_ratio = ratios.get("checkpointing_off", next(iter(ratios.values()), None))
    report = {"benchmark": "zero3_reuse", "runs": runs, "ratio": main_ratio, "ratios": ratios,
              "target": f"step time with / without reuse at 1024 image tokens, ZeRO-3, 2 processes <= {TARGET}",
              "target_met": bool(ratios) and all(r <= TARGET for r in ratios.values()),
              "ds_config": json.loads(DS_JSON.read_text()), "versions": versions(),
              "method": "each variant a fresh 2-rank torch.distributed.run job; rank 0's median step time over "
                        "--steps steps after --warmup"}
    write("zero3_reuse", report, a.out)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        w = argparse.ArgumentParser()
        w.add_argument("--worker")
        w.add_argument("--dir")
        wa = w.parse_args()
        worker(json.loads(wa.worker), wa.dir)
    else:
        main()
