"""GRPO, DAPO and Dr. GRPO from the same post-SFT checkpoint, same budget, several seeds.

    python examples/recipe_comparison.py --seeds 42,43,44 --out runs/recipes

For each seed, the PathVLM-R1 pipeline's Alpha (SFT) is built first (or reused: ``--alpha-root``
holds ``seed-<S>/models/alpha`` from ``examples/pathvlm_r1.py --seeds``), then each recipe trains
with the accuracy and format rewards on the RL split for the same number of optimizer steps and
is evaluated greedily on the test split. Written to ``<out>``:

* ``<recipe>-seed<S>/metrics.jsonl``: every step's metrics;
* ``summary.json``: per recipe and seed, the accuracy-reward curve, the fraction of zero-std
  groups, the completion length, completions generated, and the test accuracy;
* ``summary.md``: the table (mean ± sample std over seeds) that docs/algorithms.md quotes.

Recipes (the tiny profile's Beta settings otherwise: lr, sampling, G, batch, frozen vision):

* ``grpo``: the paper's GRPO: sequence-mean of token means, group-std advantages, beta 0.04, eps 0.2;
* ``dapo``: DAPO (arXiv 2503.14476): token mean, clip-higher eps_high 0.28, dynamic sampling, soft
  overlong punishment (buffer = a quarter of the completion limit), no KL (beta 0);
* ``dr_grpo``: Dr. GRPO (arXiv 2503.20783): no std scaling, the constant normaliser G * L_max, no KL.

"Same budget" is the same number of optimizer steps on the same prompts per step; DAPO's extra
generation rounds are its own cost and are reported (``completions_generated``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pathvlm_r1 as pipeline  # noqa: E402  (examples/, next to this file)
from grpo import GRPOConfig, GRPOTrainer, evaluate  # noqa: E402
from models import load_policy, load_processor  # noqa: E402
from rewards import AccuracyReward, FormatReward, OverlongPenalty  # noqa: E402

RECIPES = {
    "grpo": dict(loss_type="grpo", scale_rewards="group", beta=0.04,
                 epsilon=0.2, epsilon_high=0.2),
    "dapo": dict(loss_type="dapo", scale_rewards="group", beta=0.0, epsilon=0.2,
                 epsilon_high=0.28, dynamic_sampling=True, max_resample_rounds=3),
    "dr_grpo": dict(loss_type="dr_grpo", scale_rewards="none", beta=0.0,
                    epsilon=0.2, epsilon_high=0.2),
}


def alpha_for(seed: int, args) -> Path:
    """The seed's Alpha: reused from --alpha-root, else built by the pipeline under <out>/pipeline."""
    if args.alpha_root:
        found = Path(args.alpha_root) / f"seed-{seed}" / "models" / "alpha"
        if (found / "DONE.json").is_file():
            return found
    out = Path(args.out) / "pipeline" / f"seed-{seed}"
    pipeline.main(["--stages", "alpha", "--seed", str(seed), "--out", str(out), "--no-progress",
                   "--profile", args.profile])
    return out / "models" / "alpha"


def rewards_for(recipe: str, profile) -> list:
    outcome = [AccuracyReward(), FormatReward()]
    if recipe == "dapo":
        outcome.append(OverlongPenalty(buffer=max(1, profile.max_completion_length // 4)))
    return outcome


def run_recipe(recipe: str, seed: int, alpha: Path, parts: dict, profile, args) -> dict:
    out = Path(args.out) / f"{recipe}-seed{seed}"
    cache = out / "result.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    profile = replace(profile, freeze_vision=profile.grpo_freeze_vision)
    steps = max(1, round(profile.grpo_epochs * len(parts["rl"]) / profile.prompts_per_step))
    fields = pipeline.config_fields(profile, GRPOConfig) | RECIPES[recipe]
    cfg = GRPOConfig(**fields, max_steps=steps, seed=seed, output_dir=str(out), save_steps=0,
                     disable_tqdm=args.no_progress)
    processor = load_processor(alpha, profile.min_pixels, profile.max_pixels)
    model = load_policy(pipeline.model_config(alpha, profile))
    t0 = time.time()
    trainer = GRPOTrainer(model, rewards_for(recipe, profile), args=cfg, train_dataset=parts["rl"],
                          processing_class=processor)
    trainer.train()
    seconds = time.time() - t0
    model = trainer.engine.model.eval()
    result = evaluate(model, processor, parts["test"], batch_size=profile.eval_batch,
                      max_new_tokens=profile.max_completion_length, progress=False)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    generated = sum(m.get("dynamic_sampling/extra_rounds", 0.0) + 1 for m in metrics) \
        * profile.prompts_per_step * profile.num_generations
    summary = {
        "recipe": recipe, "seed": seed, "steps": steps, "train_seconds": round(seconds, 1),
        "test_accuracy": result.accuracy, "test_by_difficulty": result.by_difficulty,
        "test_format_rate": result.format_rate, "completions_generated": int(generated),
        "curve": {k: [m.get(k) for m in metrics] for k in
                  ("reward/accuracy/mean", "frac_zero_std_groups", "completion/length_mean",
                   "dynamic_sampling/zero_std_fraction", "dynamic_sampling/extra_rounds")},
    }
    cache.write_text(json.dumps(summary))
    pipeline.log(f"{recipe} seed {seed}: test {100 * result.accuracy:.2f} % ({seconds:.0f} s)")
    return summary


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def _curve_mean(curve: list, part: slice) -> float | None:
    kept = [v for v in curve[part] if v is not None]
    return statistics.fmean(kept) if kept else None


def _zero_std_curve(run: dict) -> list:
    """Zero-std groups among those generated: with dynamic sampling, before they were replaced."""
    before = run["curve"].get("dynamic_sampling/zero_std_fraction") or []
    return before if any(v is not None for v in before) else run["curve"]["frac_zero_std_groups"]


def write_summary(out: Path, results: list[dict], alpha_acc: dict) -> Path:
    (out / "summary.json").write_text(json.dumps({"alpha_test_accuracy": alpha_acc, "runs": results}, indent=1))
    rows = ["| recipe | test accuracy % | change vs Alpha | accuracy reward, first → last 10 steps | "
            "zero-std groups (generated) | completion length | completions generated | train s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows.append(f"| Alpha (SFT, the start) | {_mean_std([100 * a for a in alpha_acc.values()])} | — | — | — | — | — | — |")
    for recipe in RECIPES:
        mine = [r for r in results if r["recipe"] == recipe]
        if not mine:
            continue
        acc = [100 * r["test_accuracy"] for r in mine]
        delta = [100 * (r["test_accuracy"] - alpha_acc[r["seed"]]) for r in mine]
        curve = [r["curve"]["reward/accuracy/mean"] for r in mine]
        first = _mean_std([_curve_mean(c, slice(0, 10)) for c in curve])
        last = _mean_std([_curve_mean(c, slice(-10, None)) for c in curve])
        zero = _mean_std([_curve_mean(_zero_std_curve(r), slice(None)) for r in mine])
        length = _mean_std([_curve_mean(r["curve"]["completion/length_mean"], slice(None)) for r in mine])
        gen = _mean_std([r["completions_generated"] for r in mine])
        secs = _mean_std([r["train_seconds"] for r in mine])
        rows.append(f"| {recipe} | {_mean_std(acc)} | {_mean_std(delta)} | {first} → {last} | {zero} | "
                    f"{length} | {gen} | {secs} |")
    seeds = sorted({r["seed"] for r in results})
    text = (f"# Recipe comparison (seeds {', '.join(map(str, seeds))}; mean ± sample std)\n\n"
            + "\n".join(rows) + "\n")
    path = out / "summary.md"
    path.write_text(text)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--out", default="runs/recipes")
    p.add_argument("--alpha-root", help="a pathvlm_r1.py --seeds output folder whose Alphas to reuse")
    p.add_argument("--profile", choices=("tiny", "quick"), default="tiny")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    profile = {"tiny": pipeline.TINY, "quick": pipeline.QUICK}[args.profile]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, alpha_acc = [], {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        alpha = alpha_for(seed, args)
        split_args = pipeline.parse_args(["--seed", str(seed), "--profile", args.profile])
        (out / f"data-seed{seed}").mkdir(exist_ok=True)
        parts = pipeline.load_splits(split_args, profile, out / f"data-seed{seed}")
        alpha_eval = out / f"alpha-seed{seed}.json"
        if not alpha_eval.is_file():
            processor = load_processor(alpha, profile.min_pixels, profile.max_pixels)
            model = load_policy(pipeline.model_config(alpha, profile)).eval()
            alpha_eval.write_text(json.dumps({"accuracy": evaluate(
                model, processor, parts["test"], batch_size=profile.eval_batch,
                max_new_tokens=profile.max_completion_length, progress=False).accuracy}))
        alpha_acc[seed] = json.loads(alpha_eval.read_text())["accuracy"]
        for recipe in args.recipes.split(","):
            results.append(run_recipe(recipe, seed, alpha, parts, profile, args))
    pipeline.log(f"recipe comparison: {write_summary(out, results, alpha_acc)}")


if __name__ == "__main__":
    main()
