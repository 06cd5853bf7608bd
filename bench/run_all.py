"""Run every performance benchmark in turn and print a summary (results in bench/results/).

    python bench/run_all.py [--model PATH]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["step_vs_trl", "overhead", "logprob_memory", "image_scaling", "zero3_prefetch", "zero3", "zero3_reuse",
           "lora_memory", "judge_throughput"]
TINY_ONLY = {"zero3_prefetch", "judge_throughput"}  # always the tiny model (2 CPU ranks) / no model at all: no --model
MEASURE_REWARDS = {"reward_aggregation", "judge_groupwise"}  # not speed: run them on their own

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    a = p.parse_args()
    extra = ["--model", a.model] if a.model else []
    summary = {}
    for name in BENCHES:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / f"{name}.py"), *([] if name in TINY_ONLY else extra)], check=False)
        path = HERE / "results" / f"{name}.json"
        if path.is_file():
            r = json.loads(path.read_text())
            summary[name] = {"ratio": r.get("ratio"), "target": r.get("target", r.get("target_ratio")),
                             "target_met": r.get("target_met")}
            if r.get("ratios"):  # benchmarks with several comparisons (zero3_prefetch, zero3, zero3_reuse, lora_memory)
                summary[name]["ratios"] = r["ratios"]
    print(json.dumps(summary, indent=2))
