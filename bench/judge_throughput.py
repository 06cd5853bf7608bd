"""Judge throughput: how close does JudgeClient get to the ideal for a fixed-latency judge?

Starts the local rubric judge with a simulated latency (default 200 ms per reply), scores N
distinct completions (default 256) through ProcessReward at a given concurrency, and reports

    ratio = ideal / measured,  ideal = ceil(N / concurrency) * latency

(1.0 = no client overhead at all). Target: >= 0.8 at concurrency 32. Writes JSON to
bench/results/judge_throughput.json and prints the ratio.

    python bench/judge_throughput.py [--n 256] [--concurrency 32] [--latency-ms 200]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a plain checkout

from rewards import JudgeConfig, ProcessReward, RewardSample, score_all  # noqa: E402
from rewards.judge.server import start_local_judge  # noqa: E402


def make_samples(n: int) -> list[RewardSample]:
    """Distinct completions, so every one is a real request (no cache or dedup hits)."""
    return [RewardSample(question=f"Which lesion is shown? (case {i})", options=["Adenoma", "Carcinoma"],
                         answer="B", criteria=["glands invade the stroma"],
                         completion=f"<think>Case {i}: glands invade the stroma.</think><answer>B</answer>")
            for i in range(n)]


def run(n: int, concurrency: int, latency_ms: float, repeats: int) -> dict:
    samples = make_samples(n)
    ideal = math.ceil(n / concurrency) * latency_ms / 1000.0
    times = []
    with start_local_judge("rubric", delay_ms=latency_ms) as judge:
        for r in range(repeats + 1):  # run 0 warms up imports, the loop thread and connections
            reward = ProcessReward(JudgeConfig(base_url=judge.url, max_concurrency=concurrency, timeout=30.0))
            batch = [RewardSample(**{**s.__dict__, "question": f"{s.question} r{r}"}) for s in samples]
            start = time.perf_counter()
            scores, metrics = score_all([reward], batch)
            elapsed = time.perf_counter() - start
            assert metrics["judge/requests"] == n and not scores.isnan().any(), metrics
            if r:
                times.append(elapsed)
    best, median = min(times), sorted(times)[len(times) // 2]
    return {"n": n, "concurrency": concurrency, "latency_ms": latency_ms, "ideal_s": ideal,
            "measured_s": median, "best_s": best, "runs_s": times, "ratio": ideal / median,
            "target_ratio": 0.8, "python": platform.python_version(), "cpus": os.cpu_count()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--latency-ms", type=float, default=200.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "judge_throughput.json"))
    args = p.parse_args()
    result = run(args.n, args.concurrency, args.latency_ms, args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"judge throughput: {result['n']} judgments, concurrency {result['concurrency']}, "
          f"latency {result['latency_ms']:.0f} ms: measured {result['measured_s']:.3f}s vs ideal "
          f"{result['ideal_s']:.3f}s -> ratio {result['ratio']:.3f} (target >= 0.8)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
