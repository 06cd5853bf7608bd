"""ZeRO-3 parameter prefetch across generation rounds (issue 15): the GRPO step with 2 processes,
before and after the fix, side by side.

"before" is the engine's generation context as it was (``_remove_module_hooks`` then a plain
re-registration: the start-of-forward hook that resets the parameter-fetch trace was never put
back, so the trace stayed invalid and every module gathered its parameters on demand); "after" is
``grpo.engine.DeepSpeedEngine.generation_model`` as it is now. Each variant runs in its own fresh
``torch.distributed.run`` job (2 ranks, gloo on CPU, NCCL on GPUs): same model, data, seed and
DeepSpeed config (ZeRO-3, bucket sizes and persistence threshold "auto"), a reference engine
(beta 0.04), exactly ``--tokens`` tokens per completion (EOS and vision placeholders suppressed),
``--mu`` optimizer steps per generation round. Reported per variant (rank 0; the ranks run in
lockstep): median step time (rollout + update), median update time (the policy's forwards and
backwards, where the prefetch acts), and per update the coordinator's events, read through
tests/grpo/ds_common.ZeroFetchProbe: all-gathers issued, on-demand fetches (a module waited for
parameters nobody had prefetched) and prefetches. Ratios are after / before.

    python bench/zero3_prefetch.py [--mu 1 2] [--steps 6] [--warmup 2]
        [--out bench/results/zero3_prefetch.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, our_bench_parts, bench_parser, ensure_model, images, processor, question, versions, write

VARIANTS = ("before", "after")
DS_CONFIG = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                   "stage3_param_persistence_threshold": "auto"},
             "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "train_batch_size": "auto", "gradient_clipping": "auto", "steps_per_print": 1000000}


@contextlib.contextmanager
def generation_model_before_issue15(self):
    """``DeepSpeedEngine.generation_model`` before the fix, verbatim: the "before" variant."""
    if self.zero_stage != 3:
        yield self.model
        return
    import deepspeed
    offload = self.engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
        offload._remove_module_hooks()
        try:
            yield self.model
        finally:
            offload._register_deepspeed_module(offload.module)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(variant: str, cfg: dict, timeout: int = 1800) -> dict:
    """One 2-rank job; returns rank 0's report (with rank 1's events compared)."""
    with tempfile.TemporaryDirectory(prefix="zero3_prefetch_") as out:
        Path(out, "ds.json").write_text(json.dumps(DS_CONFIG))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT),
               "MASTER_ADDR": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), __file__, "--worker", variant, "--cfg", json.dumps(cfg),
               "--dir", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        reports = [Path(out, f"rank{r}.json") for r in (0, 1)]
        if proc.returncode != 0 or not all(p.is_file() for p in reports):
            return {"error": f"{variant}: 2-rank job exited {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
        r0, r1 = (json.loads(p.read_text()) for p in reports)
        r0["ranks_same_events"] = r0["events_per_step"] == r1["events_per_step"]
        return r0


# ------------------------------------------------------------------ the worker (one per rank)
def worker(variant: str, cfg: dict, out: str) -> None:
    if "DS_ACCELERATOR" not in os.environ and not _cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests" / "grpo"))
    from ds_common import ZeroFetchProbe

    from grpo import GRPOConfig, GRPOTrainer
    from grpo.engine import DeepSpeedEngine
    from models import ModelConfig, load_policy

    if variant == "before":
        DeepSpeedEngine.generation_model = generation_model_before_issue15

    LengthReward, ForcedLength = our_bench_parts()

    rank = int(os.environ["RANK"])
    proc = processor(cfg["model"], cfg)
    torch.manual_seed(cfg["seed"])
    model = load_policy(ModelConfig(cfg["model"], freeze_vision=True))
    rounds = -(-(cfg["steps"] + cfg["warmup"]) // cfg["mu"])
    n = cfg["prompts"] * rounds * 2
    items = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(i)}]}],
              "images": [img], "question": question(i), "answer": "A"}
             for i, img in enumerate(images(n, cfg["image_px"], cfg["seed"]))]
    args = GRPOConfig(num_generations=cfg["g"], per_device_train_batch_size=cfg["micro_batch"],
                      gradient_accumulation_steps=cfg["prompts"] * cfg["g"] // cfg["micro_batch"],
                      max_steps=cfg["steps"] + cfg["warmup"], max_completion_length=cfg["tokens"], beta=cfg["beta"],
                      num_iterations=cfg["mu"], learning_rate=cfg["lr"], seed=cfg["seed"],
                      deepspeed=os.path.join(out, "ds.json"), output_dir=os.path.join(out, "run"), disable_tqdm=True)
    trainer = GRPOTrainer(model, [LengthReward()], args=args, train_dataset=items, adapter=ForcedLength(proc))
    probe = ZeroFetchProbe(trainer.engine)
    steps, updates, events = [], [], []  # events: the policy coordinator's, per training step
    for step in range(cfg["steps"] + cfg["warmup"]):
        before = probe.snapshot()
        t0 = time.perf_counter()
        metrics = trainer.training_step(step)
        elapsed = time.perf_counter() - t0
        assert metrics["completion/length_min"] == cfg["tokens"], "completions must all have `tokens` tokens"
        if step >= cfg["warmup"]:
            steps.append(elapsed)
            updates.append(metrics["time/update"])
            events.append(ZeroFetchProbe.delta(probe.snapshot(), before))
    per_step = {k: statistics.median(e.get(k, 0) for e in events)
                for k in sorted({k for e in events for k in e} | {"forward_fetch_submit", "backward_fetch_submit"})}
    report = {"variant": variant, "step_s": statistics.median(steps), "steps_s": steps,
              "update_s": statistics.median(updates), "updates_s": updates,
              "all_gathers_per_step": per_step.get("forward_all_gather", 0) + per_step.get("backward_all_gather", 0),
              "on_demand_fetches_per_step": per_step["forward_fetch_submit"] + per_step["backward_fetch_submit"],
              "prefetches_per_step": per_step.get("forward_prefetch_submit", 0)
              + per_step.get("backward_prefetch_submit", 0),
              "events_median_per_step": per_step, "events_per_step": events, "trace_at_end": probe.trace(),
              "peak_rss_mb": _peak_rss_mb(), "loss_last": metrics["loss"], "versions": versions()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ the driver
def main(argv=None):
    p = bench_parser(__doc__, steps=6, warmup=2)
    p.add_argument("--mu", type=int, nargs="+", default=[1, 2], help="optimizer steps per generation round")
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args(argv)
    model = ensure_model(a.model)
    runs = {}
    for mu in a.mu:
        cfg = {"model": model, "prompts": 2, "g": 4, "micro_batch": 4, "tokens": a.tokens, "beta": 0.04, "mu": mu,
               "image_px": 56, "lr": 1e-5, "seed": 0, "steps": a.steps, "warmup": a.warmup}
        res = {v: run_variant(v, cfg) for v in VARIANTS}
        run = {"config": cfg, **res}
        b, f = res["before"], res["after"]
        if "error" not in b and "error" not in f:
            run["ratios"] = {"step_s": f["step_s"] / b["step_s"], "update_s": f["update_s"] / b["update_s"],
                             "all_gathers_per_step": f["all_gathers_per_step"] / max(1, b["all_gathers_per_step"])}
            run["same_loss"] = b["loss_last"] == f["loss_last"]
        runs[f"mu{mu}"] = run
    report = {"benchmark": "zero3_prefetch", "runs": runs, "ds_config": DS_CONFIG, "versions": versions(),
              "ratios": {k: r.get("ratios") for k, r in runs.items()},
              "method": "2 ranks per variant, each variant a fresh torch.distributed.run job; rank 0's medians "
                        "over --steps steps after --warmup; events per step from ZeroFetchProbe "
                        "(tests/grpo/ds_common.py)"}
    write("zero3_prefetch", report, a.out)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        w = argparse.ArgumentParser()
        w.add_argument("--worker", choices=VARIANTS)
        w.add_argument("--cfg")
        w.add_argument("--dir")
        wa = w.parse_args()
        worker(wa.worker, json.loads(wa.cfg), wa.dir)
    else:
        main()
