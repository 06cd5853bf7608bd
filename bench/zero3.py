"""The paper's DeepSpeed set-up, 2 processes: our GRPO step against TRL's ``GRPOTrainer`` under
ZeRO-3 and ZeRO-3 with the optimizer offloaded to CPU, side by side in one run.

Each measured configuration is its own fresh 2-process job with the DeepSpeed config from
``examples/configs/`` (``zero3.json``, ``zero3_offload.json``; "auto" values resolved by each
trainer from its own arguments, fp32 on CPU):

  ours  ``torch.distributed.run --nproc_per_node 2 bench/zero3.py --worker ours ...``
        (our ``GRPOTrainer`` with ``deepspeed=<json>``)
  trl   ``accelerate launch --config_file <yaml> --num_processes 2 bench/zero3.py --worker trl ...``
        (an accelerate config with ``distributed_type: DEEPSPEED`` and ``deepspeed_config_file``
        pointing at the same JSON; TRL's ``GRPOTrainer`` with ``use_cpu=True, bf16=False``)

Same work on both sides: the tiny Qwen2.5-VL (or --model PATH), vision tower frozen, the same
prompts and images, 2 prompts x G = 4 per optimizer step over both ranks (4 completions per rank,
one forward/backward each), 224 x 224 images (64 image tokens), exactly --tokens tokens per
completion (default 192, the paper's maximum; EOS and the vision placeholders suppressed in both
samplers), beta 0.04 (a reference model on both sides), the GRPO sequence-mean loss
(``loss_type="grpo"``), epsilon 0.2, mu 1, grad clip 1.0, lr 1e-6 (the paper's G, beta, mu, lr).
Step time: median over --steps steps after --warmup of every job (--rounds jobs per side, TRL's
and ours back to back in ABBA order), as each rank measures it (the ranks run in lockstep; all are
reported), together with the process CPU time per step (``time.process_time``), which other work
on a shared machine moves less than wall time. Peak memory: each rank's own ``ru_maxrss``, written
by the rank.

When TRL's job fails, its error (exception type, message, command) goes into the JSON
(``trl_errors``). Either way our 2-process step is also compared with our 1-process step on the
same global batch (plain PyTorch engine, the 2 micro-batches of 4 accumulated in one process).

    python bench/zero3.py [--model PATH] [--steps 5] [--warmup 2] [--tokens 192] [--rounds 2]
        [--configs zero3 zero3_offload] [--out bench/results/zero3.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import (ROOT, our_bench_parts, bench_parser, ensure_model, forced_length_ids, images, length_reward_value, peak_rss_mb,
                     processor, question, versions, write)

CONFIGS = {"zero3": ROOT / "examples" / "configs" / "zero3.json",
           "zero3_offload": ROOT / "examples" / "configs" / "zero3_offload.json"}
NPROC = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT),
           "MASTER_ADDR": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "ACCELERATE_DISABLE_RICH": "1"}
    if not _cuda():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def accelerate_yaml(ds_json: str, port: int) -> str:
    """An accelerate config for a 2-process DeepSpeed job on this machine (CPU unless CUDA)."""
    cpu = not _cuda()
    return "\n".join([
        "compute_environment: LOCAL_MACHINE", "distributed_type: DEEPSPEED", "deepspeed_config:",
        f"  deepspeed_config_file: {ds_json}", "  deepspeed_multinode_launcher: standard", "  zero3_init_flag: true",
        "machine_rank: 0", "num_machines: 1", f"num_processes: {NPROC}", "main_training_function: main",
        "main_process_ip: 127.0.0.1", f"main_process_port: {port}", "rdzv_backend: static", "same_network: true",
        f"use_cpu: {str(cpu).lower()}", ""])


LAUNCHER_ERRORS = ("CalledProcessError", "ChildFailedError", "SystemExit", "KeyboardInterrupt")
_EXC = re.compile(r"^(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning))(?::\s?(.*))?$")


def job_exception(text: str) -> dict | None:
    """The error a failed job died of: the first ``Type: message`` line closing a Python
    traceback in ``text`` that is not the launcher's own report of a failed child (accelerate's
    CalledProcessError, torchrun's ChildFailedError); those only when nothing else is there."""
    found = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        for nxt in lines[i + 1:]:
            m = _EXC.match(nxt.strip())
            if m:
                found.append({"type": m.group(1), "message": (m.group(2) or "").strip()})
                break
    real = [f for f in found if f["type"].rsplit(".", 1)[-1] not in LAUNCHER_ERRORS]
    return (real or found or [None])[0]


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it. The launchers start each rank in a session of
    its own (torch's elastic agent), so killing the launcher's process group would leave the
    ranks running; the tree is read from /proc before anything is killed."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_job(side: str, config: str, cfg: dict, nproc: int = NPROC, timeout: int = 1800) -> dict:
    """One fresh job; returns {"ranks": [rank reports], ...} or {"error": ..., "command": ...}."""
    with tempfile.TemporaryDirectory(prefix=f"bench_zero3_{side}_") as out:
        port = _free_port()
        work = ["--worker", side, "--config", config, "--cfg", json.dumps(cfg), "--dir", out]
        if side == "trl":
            yaml = Path(out, "accelerate.yaml")
            yaml.write_text(accelerate_yaml(str(CONFIGS[config]), port))
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(yaml),
                   "--num_processes", str(nproc), __file__, *work]
        elif nproc == 1:  # our 1-process step: a plain process, no launcher
            cmd = [sys.executable, __file__, *work]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                   "127.0.0.1", "--master_port", str(port), __file__, *work]
        shown = " ".join(shlex.quote(c) for c in [os.path.normpath(cmd[0]), *cmd[1:]])
        shown = shown.replace(out, "$TMP").replace(f"{ROOT}/", "")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            stdout, stderr = proc.communicate()
            rc = f"killed after {timeout} s"
        wall = time.perf_counter() - t0
        reports = [Path(out, f"rank{r}.json") for r in range(nproc)]
        if rc != 0 or not all(p.is_file() for p in reports):
            both = stdout + "\n" + stderr
            fallback = {"type": None, "message": f"exit {rc}, no traceback" if isinstance(rc, int) else rc}
            return {"error": job_exception(both) or fallback, "exit": rc, "command": shown,
                    "stderr_tail": both[-4000:]}
        ranks = [json.loads(p.read_text()) for p in reports]
        yaml_text = Path(out, "accelerate.yaml").read_text() if side == "trl" else None
    return {"job_wall_s": wall, "command": shown, **({"accelerate_yaml": yaml_text} if yaml_text else {}),
            "ranks": ranks}


def pooled(jobs: list[dict]) -> dict:
    """One side's jobs (rounds) of one configuration: the error of the first failed job, or the
    medians over all their measured steps (rank 0's in step_s, each rank's in step_s_per_rank) and
    each rank's peak RSS (the largest over the jobs)."""
    failed = [j for j in jobs if "error" in j]
    if failed:
        return {**failed[0], "jobs": len(jobs)}
    nproc = len(jobs[0]["ranks"])
    steps = [[t for j in jobs for t in j["ranks"][r]["steps_s"]] for r in range(nproc)]
    cpu = [t for j in jobs for t in j["ranks"][0]["steps_cpu_s"]]
    return {"step_s": statistics.median(steps[0]), "step_s_min": min(steps[0]), "step_cpu_s": statistics.median(cpu),
            "step_s_per_rank": [statistics.median(s) for s in steps],
            "step_s_per_job": [j["ranks"][0]["step_s"] for j in jobs],
            "peak_rss_mb_per_rank": [max(j["ranks"][r]["peak_rss_mb"] for j in jobs) for r in range(nproc)],
            "command": jobs[0]["command"], "jobs": jobs}


# ------------------------------------------------------------------ the workers (one per rank)
def _rank_setup():
    import torch
    torch.set_num_threads(1)
    return torch, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _write_rank(out: str, rank: int, times: list[float], cfg: dict, cpu_s: list[float], **extra) -> None:
    """This rank's report: wall time per step, the process's CPU time per step (all its threads;
    less moved by other work on a shared machine than wall time) and its peak RSS."""
    report = {"rank": rank, "step_s": statistics.median(times), "steps_s": times,
              "step_cpu_s": statistics.median(cpu_s), "steps_cpu_s": cpu_s, "peak_rss_mb": peak_rss_mb(),
              "peak_rss_source": "resource.getrusage(RUSAGE_SELF).ru_maxrss of this rank", **extra,
              "versions": versions()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def ds_facts(engine) -> dict:
    """What DeepSpeed actually runs (read from its engine, not from our config): ZeRO stage,
    optimizer offload device, bf16, and the optimizer class it wraps."""
    if engine is None or not hasattr(engine, "zero_optimization_stage"):
        return {"deepspeed": False}
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    offload = engine.zero_offload_optimizer()
    return {"deepspeed": True, "zero_stage": engine.zero_optimization_stage(),
            "offload_optimizer": str(getattr(offload, "device", None)) if offload else None,
            "bf16": engine.bfloat16_enabled(), "optimizer": type(inner).__name__,
            "zero_optimizer": type(engine.optimizer).__name__}


def _bf16(torch) -> bool:
    """bf16 where our trainer's "auto" picks it (CUDA with bf16), fp32 otherwise (CPU)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def worker_trl(config: str, cfg: dict, out: str) -> None:
    torch, rank, world = _rank_setup()
    from datasets import Dataset
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from models import QwenVLAdapter
    from models.loading import freeze_vision

    proc = processor(cfg["model"], cfg)
    n = cfg["prompts"] * (cfg["steps"] + cfg["warmup"])
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(i)}]}],
             "image": img} for i, img in enumerate(images(n, cfg["image_px"], cfg["seed"]))]

    def length_reward(completions, **_):
        return [length_reward_value(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    times, cpu = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

    gas = cfg["prompts"] * cfg["g"] // (cfg["micro_batch"] * world)
    # The arguments come first, so that under ZeRO-3 from_pretrained builds the model partitioned
    # (zero.Init), as a TRL script does.
    args = GRPOConfig(output_dir=os.path.join(out, "run"), per_device_train_batch_size=cfg["micro_batch"],
                      gradient_accumulation_steps=gas, num_generations=cfg["g"],
                      max_completion_length=cfg["tokens"], beta=cfg["beta"], loss_type="grpo", scale_rewards="group",
                      epsilon=0.2, learning_rate=cfg["lr"], max_grad_norm=1.0, temperature=1.0, top_p=1.0, top_k=0,
                      use_cpu=not torch.cuda.is_available(), bf16=_bf16(torch), max_steps=cfg["steps"] + cfg["warmup"],
                      logging_steps=1, report_to="none", save_strategy="no", seed=cfg["seed"],
                      dataloader_num_workers=0, shuffle_dataset=False, disable_tqdm=True,
                      generation_kwargs={"suppress_tokens": forced_length_ids(QwenVLAdapter(proc))})
    torch.manual_seed(cfg["seed"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(cfg["model"],
                                                               dtype=torch.bfloat16 if _bf16(torch) else torch.float32,
                                                               attn_implementation="sdpa")
    freeze_vision(model)
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=proc, callbacks=[Timer()])
    trainer.train()
    lengths = [h["completions/min_length"] for h in trainer.state.log_history if "completions/min_length" in h]
    assert lengths and all(x == cfg["tokens"] for x in lengths), f"TRL completions not all {cfg['tokens']}: {lengths}"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    _write_rank(out, rank, times[cfg["warmup"]:], cfg, cpu_s=cpu[cfg["warmup"]:], world_size=world,
                gradient_accumulation_steps=gas,
                engine=ds_facts(trainer.model_wrapped if trainer.is_deepspeed_enabled else None),
                loss_last=losses[-1] if losses else None)


def worker_ours(config: str, cfg: dict, out: str) -> None:
    torch, rank, world = _rank_setup()
    from grpo import GRPOConfig, GRPOTrainer
    from models import ModelConfig, load_policy

    LengthReward, ForcedLength = our_bench_parts()

    proc = processor(cfg["model"], cfg)
    torch.manual_seed(cfg["seed"])
    model = load_policy(ModelConfig(cfg["model"], freeze_vision=True))
    n = cfg["prompts"] * (cfg["steps"] + cfg["warmup"])
    items = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(i)}]}],
              "images": [img], "question": question(i), "answer": "A"}
             for i, img in enumerate(images(n, cfg["image_px"], cfg["seed"]))]
    gas = cfg["prompts"] * cfg["g"] // (cfg["micro_batch"] * world)
    args = GRPOConfig(num_generations=cfg["g"], per_device_train_batch_size=cfg["micro_batch"],
                      gradient_accumulation_steps=gas, max_steps=cfg["steps"] + cfg["warmup"],
                      max_completion_length=cfg["tokens"], beta=cfg["beta"], loss_type="grpo", scale_rewards="group",
                      epsilon=0.2, max_grad_norm=1.0, temperature=1.0, top_p=1.0, learning_rate=cfg["lr"],
                      seed=cfg["seed"], deepspeed=None if config == "none" else str(CONFIGS[config]),
                      output_dir=os.path.join(out, "run"), disable_tqdm=True)
    trainer = GRPOTrainer(model, [LengthReward()], args=args, train_dataset=items, adapter=ForcedLength(proc))
    times, cpu, parts = [], [], []
    for step in range(cfg["steps"] + cfg["warmup"]):
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = trainer.training_step(step)
        elapsed, used = time.perf_counter() - t0, time.process_time() - c0
        assert metrics["completion/length_min"] == cfg["tokens"], "completions must all have `tokens` tokens"
        if step >= cfg["warmup"]:
            times.append(elapsed)
            cpu.append(used)
            parts.append({k: v for k, v in metrics.items() if k.startswith("time/")})
    phases = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    _write_rank(out, rank, times, cfg, cpu_s=cpu, world_size=world, gradient_accumulation_steps=gas, phases_s=phases,
                engine={"class": type(trainer.engine).__name__, **ds_facts(getattr(trainer.engine, "engine", None))},
                loss_last=metrics["loss"])


WORKERS = {"ours": worker_ours, "trl": worker_trl}


# ------------------------------------------------------------------ the driver
def main(argv=None):
    p = bench_parser(__doc__, steps=5, warmup=2)
    p.add_argument("--tokens", type=int, default=192, help="completion tokens, forced equal on both sides (paper: 192)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=2, help="jobs per side and configuration, in ABBA order")
    a = p.parse_args(argv)
    cfg = {"model": ensure_model(a.model), "prompts": 2, "g": 4, "micro_batch": 4, "tokens": a.tokens, "beta": 0.04,
           "mu": 1, "image_px": 224, "lr": 1e-6, "seed": 0, "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds}
    # Each round runs TRL's job and ours back to back, in alternating order (ABBA over two rounds),
    # so that load from other work on a shared machine falls on both sides alike.
    jobs = {name: {"trl": [], "ours": []} for name in a.configs}
    for rnd in range(a.rounds):
        for name in a.configs:
            for side in (("trl", "ours") if rnd % 2 == 0 else ("ours", "trl")):
                jobs[name][side].append(run_job(side, name, cfg))
    runs = {name: {"ds_config_file": str(CONFIGS[name].relative_to(ROOT)),
                   "ds_config": json.loads(CONFIGS[name].read_text()),
                   "trl": pooled(jobs[name]["trl"]), "ours": pooled(jobs[name]["ours"])} for name in a.configs}
    # Our 1-process step on the same global batch (2 micro-batches of 4 accumulated, plain PyTorch):
    # the comparison when TRL cannot run, and what 2 processes cost or save either way.
    baseline = pooled([run_job("ours", "none", cfg, nproc=1)])
    ratios = {}
    for name, r in runs.items():
        if "error" in r["ours"]:
            continue
        if "error" not in r["trl"]:
            ratios[f"{name}: ours/trl step"] = r["ours"]["step_s"] / r["trl"]["step_s"]
            ratios[f"{name}: ours/trl step CPU time"] = r["ours"]["step_cpu_s"] / r["trl"]["step_cpu_s"]
            ratios[f"{name}: ours/trl peak RSS (max over ranks)"] = (max(r["ours"]["peak_rss_mb_per_rank"])
                                                                   / max(r["trl"]["peak_rss_mb_per_rank"]))
        if "error" not in baseline:
            ratios[f"{name}: ours {NPROC} proc / ours 1 proc step"] = r["ours"]["step_s"] / baseline["step_s"]
    report = {"benchmark": "zero3", "config": cfg, "runs": runs, "ours_1proc": baseline, "ratios": ratios,
              "trl_errors": {n: {**r["trl"]["error"], "command": r["trl"]["command"]}
                             for n, r in runs.items() if "error" in r["trl"]},
              "ours_errors": {n: {**r["ours"]["error"], "command": r["ours"]["command"]}
                              for n, r in runs.items() if "error" in r["ours"]},
              "versions": versions(),
              "method": f"{NPROC} ranks per job, each configuration and side --rounds fresh jobs, TRL's and ours "
                        "back to back in ABBA order; step_s = the median of rank 0's step times over all jobs "
                        "(--steps per job after --warmup; every rank's in step_s_per_rank, the least in step_s_min); "
                        "step_cpu_s = the median of rank 0's process CPU time per step (time.process_time); "
                        "peak RSS = each rank's own ru_maxrss in MiB, written by the rank (largest over the jobs)"}
    write("zero3", report, a.out)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        w = argparse.ArgumentParser()
        w.add_argument("--worker", choices=sorted(WORKERS))
        w.add_argument("--config", choices=[*CONFIGS, "none"])
        w.add_argument("--cfg")
        w.add_argument("--dir")
        wa = w.parse_args()
        WORKERS[wa.worker](wa.config, json.loads(wa.cfg), wa.dir)
    else:
        main()
