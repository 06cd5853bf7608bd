"""GRPO step time and peak memory: our GRPOTrainer against TRL's GRPOTrainer, side by side.

Same model (the tiny Qwen2.5-VL by default, or --model PATH), same prompts and images (64 image
tokens each), 4 prompts x G = 4, exactly 64 completion tokens on both sides (EOS and the vision
placeholders are suppressed in both samplers), beta 0.04, the GRPO sequence-mean loss, fp32,
one thread, 16 completions per forward/backward, vision tower frozen. Each trainer runs in its
own fresh process (peak memory = that process's ru_maxrss); median of --steps steps after
--warmup. Target: ours / TRL <= 0.5.

    python bench/step_vs_trl.py [--model PATH] [--out bench/results/step_vs_trl.json]
"""
from __future__ import annotations

from harness import DEFAULTS, bench_parser, run_worker, versions, write

TARGET = 0.5


def main(argv=None):
    a = bench_parser(__doc__).parse_args(argv)
    cfg = {**DEFAULTS, "steps": a.steps, "warmup": a.warmup, "model": a.model}
    trl = run_worker("trl", cfg)
    ours = run_worker("ours", cfg)
    report = {"benchmark": "step_vs_trl", "config": cfg, "ours": ours, "trl": trl, "target": f"ours/trl <= {TARGET}",
              "versions": versions(), "memory_method": "ru_maxrss of a fresh process per trainer (MiB)"}
    if "error" in trl or "error" in ours:
        report.update(ratio=None, target_met=False, why="a worker failed; see its error and stderr_tail")
    else:
        report.update(ratio=ours["step_s"] / trl["step_s"], peak_rss_ratio=ours["peak_rss_mb"] / trl["peak_rss_mb"])
        report["target_met"] = report["ratio"] <= TARGET
    write("step_vs_trl", report, a.out)


if __name__ == "__main__":
    main()
