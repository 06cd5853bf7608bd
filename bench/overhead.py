"""Library overhead: our GRPO step against the bare model work of the same step.

"Bare" is what the step's tokens cost with plain transformers calls and no library code
(``harness.worker_bare``): ``generate`` of the B*G completions, a reference forward and a policy
forward + backward over the same prompt + completion tokens, and an AdamW step. Ours is
``GRPOTrainer.training_step`` with everything it does around that (prompt encoding, rewards,
advantages, log-prob bookkeeping, metrics), on the same model, data and settings as
``step_vs_trl.py``. Target: ours / bare <= 1.15. Below 1 means prompt reuse saves more than the
library costs.

    python bench/overhead.py [--model PATH] [--out bench/results/overhead.json]
"""
from __future__ import annotations

from harness import DEFAULTS, bench_parser, run_worker, versions, write

TARGET = 1.15


def main(argv=None):
    a = bench_parser(__doc__).parse_args(argv)
    cfg = {**DEFAULTS, "steps": a.steps, "warmup": a.warmup, "model": a.model}
    bare = run_worker("bare", cfg)
    ours = run_worker("ours", cfg)
    ours_no_reuse = run_worker("ours", {**cfg, "reuse": False})
    report = {"benchmark": "overhead", "config": cfg, "ours": ours, "ours_without_reuse": ours_no_reuse,
              "bare": bare, "target": f"ours/bare <= {TARGET}", "versions": versions()}
    if any("error" in r for r in (bare, ours, ours_no_reuse)):
        report.update(ratio=None, target_met=False, why="a worker failed; see its error and stderr_tail")
    else:
        report["ratio"] = ours["step_s"] / bare["step_s"]
        report["ratio_without_reuse"] = ours_no_reuse["step_s"] / bare["step_s"]
        report["target_met"] = report["ratio"] <= TARGET
    write("overhead", report, a.out)


if __name__ == "__main__":
    main()
