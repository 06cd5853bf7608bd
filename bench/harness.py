"""What the step-time benchmarks share: one worker process per measured configuration.

Each configuration runs in a fresh ``python bench/harness.py WORKER '<json>'`` process, so its
peak memory (``ru_maxrss``, the resident-set high-water mark of that process; torch's CPU
allocator keeps no statistics of its own) is its own, and no state (caches, allocator pools,
RNG) leaks from one configuration into the next. Every worker pins one torch thread, fixes its
seeds and reports JSON on its last stdout line.

Workers:
  ours   our GRPOTrainer: median step time over ``steps`` after ``warmup`` steps
  trl    TRL's GRPOTrainer on the same model, data and settings
  bare   the model work of one step timed alone: HF generate + reference forward + policy
         forward/backward + AdamW, with plain transformers calls and no library code
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
TINY = Path(os.environ.get("GRPO_BENCH_TINY", "/tmp/grpo-bench/tiny-qwen25vl"))

# Target 3 of the performance issue: 4 prompts x G 4, 64 completion tokens, beta 0.04, seq-mean loss.
DEFAULTS = dict(prompts=4, g=4, tokens=64, beta=0.04, image_px=224, steps=5, warmup=2, lr=1e-5, seed=0)


def bench_parser(doc: str, **defaults) -> argparse.ArgumentParser:
    """The options every step benchmark takes: --model, --out, --steps, --warmup (defaults from
    DEFAULTS unless overridden)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a local Qwen2.5-VL checkpoint (default: the tiny one)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<name>.json)")
    p.add_argument("--steps", type=int, default=defaults.get("steps", DEFAULTS["steps"]))
    p.add_argument("--warmup", type=int, default=defaults.get("warmup", DEFAULTS["warmup"]))
    return p


def setup_torch():
    import torch
    torch.set_num_threads(1)
    return torch


def versions() -> dict:
    import torch
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import trl
        out["trl"] = trl.__version__
    except ImportError:
        out["trl"] = None
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def ensure_model(path: str | None) -> str:
    if path:
        return path
    from models.tiny import ensure_tiny_checkpoint
    return str(ensure_tiny_checkpoint(TINY))


def run_worker(kind: str, cfg: dict, timeout: int = 900) -> dict:
    """Run one configuration in a fresh process; returns its JSON report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, __file__, kind, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"worker {kind} exited {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    return json.loads(lines[-1])


def write(name: str, report: dict, out: str | None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k in ("ratio", "ratios", "target", "target_met")}, indent=2))
    print(f"written to {path}")
    return path


# ------------------------------------------------------------------ shared data
def images(n: int, px: int, seed: int):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(n)]


def question(i: int) -> str:
    return f"Case {i}: which tissue is shown? Answer A, B, C or D."


def length_reward_value(text: str) -> float:
    """A cheap deterministic reward in [0, 1] (the benchmark measures training, not rewards)."""
    return (len(text) % 7) / 6


def processor(path: str, cfg: dict):
    from models import load_processor
    return load_processor(path, max_pixels=max(cfg["image_px"] ** 2, 65536))


def forced_length_ids(adapter) -> list[int]:
    """Ids never sampled in either trainer: the vision placeholders and EOS, so that every
    completion has exactly ``tokens`` tokens and both sides do identical work."""
    return sorted(set(adapter.never_sample_ids) | set(adapter.eos_token_ids))


def our_bench_parts():
    """``(LengthReward, ForcedLength)``: the reward and the adapter every benchmark of our trainer
    uses (``length_reward_value``; completions of exactly ``tokens`` tokens, ``forced_length_ids``).
    Built on first call, so this module imports without the library."""
    from models import QwenVLAdapter
    from rewards import Reward

    class LengthReward(Reward):
        name = "length"

        def score(self, sample):
            return length_reward_value(sample.completion)

    class ForcedLength(QwenVLAdapter):
        def __init__(self, proc):
            super().__init__(proc)
            self.never_sample_ids = forced_length_ids(self)

    return LengthReward, ForcedLength


def median_report(times: list[float], cfg: dict, **extra) -> dict:
    return {"config": cfg, "step_s": statistics.median(times), "steps_s": times,
            "peak_rss_mb": peak_rss_mb(), **extra, "versions": versions()}


# ------------------------------------------------------------------ workers
def worker_ours(cfg: dict) -> dict:
    torch = setup_torch()
    from grpo import GRPOConfig, GRPOTrainer
    from models import ModelConfig, load_policy

    LengthReward, ForcedLength = our_bench_parts()

    path = ensure_model(cfg.get("model"))
    proc = processor(path, cfg)
    torch.manual_seed(cfg["seed"])
    model = load_policy(ModelConfig(path, freeze_vision=not cfg.get("train_vision", False)))
    n = cfg["prompts"] * (cfg["steps"] + cfg["warmup"])
    items = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(i)}]}],
              "images": [img], "question": question(i), "answer": "A"}
             for i, img in enumerate(images(n, cfg["image_px"], cfg["seed"]))]
    args = GRPOConfig(num_generations=cfg["g"], per_device_train_batch_size=cfg["prompts"] * cfg["g"],
                      max_steps=cfg["steps"] + cfg["warmup"], max_completion_length=cfg["tokens"], beta=cfg["beta"],
                      learning_rate=cfg["lr"], loss_type="grpo", seed=cfg["seed"],
                      reuse_prompts=cfg.get("reuse", True), output_dir="/tmp/grpo-bench/ours", disable_tqdm=True)
    trainer = GRPOTrainer(model, [LengthReward()], args=args, train_dataset=items, adapter=ForcedLength(proc))
    if cfg.get("sampler") == "hf":  # the "before": HF generate on every row, kept with the tests
        sys.path.insert(0, str(ROOT / "tests" / "grpo"))
        from hf_reference import sample_hf
        trainer.sampler = sample_hf
    times, parts = [], []
    for step in range(cfg["steps"] + cfg["warmup"]):
        t0 = time.perf_counter()
        metrics = trainer.training_step(step)
        if step >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
            parts.append({k: v for k, v in metrics.items() if k.startswith("time/")})
        assert metrics["completion/length_min"] == cfg["tokens"], "completions must all have `tokens` tokens"
    split = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    return median_report(times, cfg, phases_s=split)


def worker_trl(cfg: dict) -> dict:
    torch = setup_torch()
    from datasets import Dataset
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from models import QwenVLAdapter
    from models.loading import freeze_vision

    path = ensure_model(cfg.get("model"))
    proc = processor(path, cfg)
    torch.manual_seed(cfg["seed"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    freeze_vision(model)
    n = cfg["prompts"] * (cfg["steps"] + cfg["warmup"])
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(i)}]}],
             "image": img} for i, img in enumerate(images(n, cfg["image_px"], cfg["seed"]))]

    def length_reward(completions, **_):
        return [length_reward_value(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(output_dir="/tmp/grpo-bench/trl", per_device_train_batch_size=cfg["prompts"] * cfg["g"],
                      num_generations=cfg["g"], max_completion_length=cfg["tokens"], beta=cfg["beta"],
                      loss_type="grpo", scale_rewards="group", epsilon=0.2, learning_rate=cfg["lr"],
                      max_grad_norm=1.0, temperature=1.0, top_p=1.0, top_k=0, use_cpu=not torch.cuda.is_available(),
                      bf16=False, max_steps=cfg["steps"] + cfg["warmup"], logging_steps=1, report_to="none",
                      save_strategy="no", seed=cfg["seed"], dataloader_num_workers=0, shuffle_dataset=False,
                      generation_kwargs={"suppress_tokens": forced_length_ids(QwenVLAdapter(proc))})
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=proc, callbacks=[Timer()])
    trainer.train()
    lengths = [h["completions/min_length"] for h in trainer.state.log_history if "completions/min_length" in h]
    assert all(x == cfg["tokens"] for x in lengths), f"TRL completions not all {cfg['tokens']} tokens: {lengths}"
    return median_report(times[cfg["warmup"]:], cfg)


def worker_bare(cfg: dict) -> dict:
    """The model work of one GRPO step, plain transformers, no library: generate the N = B*G
    completions, a reference forward and a policy forward/backward over the same tokens, an
    AdamW step. What any GRPO implementation must at least pay without prompt reuse."""
    torch = setup_torch()
    import copy

    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from models import QwenVLAdapter
    from models.loading import freeze_vision

    path = ensure_model(cfg.get("model"))
    proc = processor(path, cfg)
    adapter = QwenVLAdapter(proc)
    torch.manual_seed(cfg["seed"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    freeze_vision(model)
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"])
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=cfg["tokens"],
                           suppress_tokens=forced_length_ids(adapter), pad_token_id=adapter.pad_token_id,
                           eos_token_id=adapter.eos_token_ids)
    times, parts = [], []
    for step in range(cfg["steps"] + cfg["warmup"]):
        idx = range(step * cfg["prompts"], (step + 1) * cfg["prompts"])
        msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(i)}]}] for i in idx]
        batch = adapter.encode_prompts(msgs, [[im] for im in images(len(msgs), cfg["image_px"], step)])
        batch = batch.repeat_interleave(cfg["g"])
        t0 = time.perf_counter()
        with torch.no_grad():
            model.eval()
            out = model.generate(**adapter.generate_inputs(batch), generation_config=gen)
            model.train()
        t1 = time.perf_counter()
        comp = out[:, batch.input_ids.shape[1]:]
        inputs = adapter.forward_inputs(batch, comp, torch.ones_like(comp))
        t = comp.shape[1]
        with torch.no_grad():
            ref_logits = ref(**inputs).logits[:, -t - 1:-1]
            ref_logp = ref_logits.log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1)
        t2 = time.perf_counter()
        logits = model(**inputs).logits[:, -t - 1:-1]
        logp = logits.log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1)
        ((logp - ref_logp).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= cfg["warmup"]:
            times.append(t3 - t0)
            parts.append({"generate": t1 - t0, "ref_forward": t2 - t1, "policy_fwd_bwd_adamw": t3 - t2})
    split = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    return median_report(times, cfg, phases_s=split)


WORKERS = {"ours": worker_ours, "trl": worker_trl, "bare": worker_bare}

if __name__ == "__main__":
    kind, cfg = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(WORKERS[kind](cfg)))
