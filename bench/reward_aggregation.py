"""Multi-reward aggregation on PathVLM-R1's three rewards: where does the advantage come from?

The embedded pipeline's tiny model (examples/pathvlm_r1.py, TINY profile: the caption-pretrained
base, cached under $GRPO_VLM_CACHE, built in ~2 min if absent), a short SFT on the SFT split so that
it answers in the <think>/<answer> format part of the time, then a few GRPO steps on the RL split
with accuracy + format + process (the local rubric judge on 127.0.0.1), once per aggregation:

    sum_then_normalize  (scale_rewards "group": the paper's GRPO)
    normalize_then_sum  (scale_rewards "batch": GDPO / TRL multi_objective_aggregation)

Reported per run: ``advantage_share/<reward>`` (sum over samples of |reward r's part of the
advantage| / sum over rewards; grpo.core.advantage_contributions) per step and averaged, and the
rewards. Because the two runs sample different completions after their first update, the shares
are also computed under both aggregations on the very same rollouts (those of the
sum_then_normalize run): ``same_rollouts``. Writes bench/results/reward_aggregation.json.

    python bench/reward_aggregation.py [--grpo-steps 10] [--sft-steps 60] [--prompts-per-step 8] [--out PATH]

About 2-3 minutes on 2 CPU cores with the base cached (most of it the SFT).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402

import pathvlm_r1 as pipe  # noqa: E402
from grpo import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from grpo.core import advantage_contributions, advantage_shares, aggregate_rewards  # noqa: E402
from rewards import AccuracyReward, FormatReward, JudgeConfig, ProcessReward  # noqa: E402
from rewards.judge.server import start_local_judge  # noqa: E402

RUNS = {"sum_then_normalize": "group", "normalize_then_sum": "batch"}


def shares_of(scores: torch.Tensor, weights: torch.Tensor, mode: str, scale: str, g: int, eps: float) -> list[float]:
    """advantage_share per reward of one rollout's scores (N, R) under an aggregation."""
    _, terms = aggregate_rewards(scores.view(-1, g, scores.shape[1]).double(), weights.double(), mode, eps)
    return advantage_shares(advantage_contributions(terms, scale, eps)).tolist()


def spread_stats(rollouts: list[torch.Tensor], g: int, names: list[str]) -> dict:
    """Per reward, over all groups of the rollouts: the share of groups in which it varies, and its
    mean within-group std (unbiased) over those groups: what decides its share of the advantage."""
    groups = torch.cat([s.view(-1, g, s.shape[1]) for s in rollouts]).double()        # (groups, G, R)
    out = {}
    for k, name in enumerate(names):
        stds = []
        for grp in groups[:, :, k]:
            vals = grp[~torch.isnan(grp)]
            if len(vals) > 1 and vals.max() > vals.min():
                stds.append(float(vals.std()))
        out[name] = {"groups_with_spread": len(stds) / len(groups), "mean_std_where_spread": mean(stds)}
    return out


def mean(xs):
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grpo-steps", type=int, default=10)
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "reward_aggregation.json"))
    opts = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(opts.seed)
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-reward-agg-"))
    args = pipe.parse_args(["--out", str(work), "--seed", str(opts.seed), "--no-progress"])
    profile = pipe.TINY
    parts = pipe.load_splits(args, profile, work)
    base = pipe.base_model(args, parts, work, profile)

    # a short SFT (the pipeline's Alpha stage, shortened) so that formats and answers vary
    model, processor = pipe.load(base, profile, args)
    sft = SFTConfig(**pipe.config_fields(profile, SFTConfig, prefix="sft_"), max_steps=opts.sft_steps,
                    warmup_steps=2, seed=opts.seed, output_dir=str(work / "sft"), disable_tqdm=True)
    t0 = time.time()
    sft_trainer = SFTTrainer(model, sft, train_dataset=parts["sft"], processing_class=processor)
    sft_trainer.train()
    sft_trainer.save_model(work / "alpha")
    sft_seconds = time.time() - t0

    result = {"model": "embedded TINY profile (examples/pathvlm_r1.py), caption-pretrained base + "
                       f"{opts.sft_steps} SFT steps", "grpo_steps": opts.grpo_steps,
              "prompts_per_step": opts.prompts_per_step, "num_generations": profile.num_generations,
              "rewards": ["accuracy", "format", "process"], "weights": [1.0, 1.0, 1.0],
              "sft_seconds": round(sft_seconds, 1), "runs": {}}
    rollouts: dict[str, list] = {}
    with start_local_judge("rubric") as judge:
        for mode, scale in RUNS.items():
            torch.manual_seed(opts.seed)
            rl_profile = replace(profile, freeze_vision=profile.grpo_freeze_vision)
            model, processor = pipe.load(work / "alpha", rl_profile, args)
            rewards = [AccuracyReward(), FormatReward(),
                       ProcessReward(JudgeConfig(base_url=judge.url, model="rubric",
                                                 cache_path=str(work / f"judge-{mode}.sqlite")))]
            cfg = GRPOConfig(**pipe.config_fields(profile, GRPOConfig), max_steps=opts.grpo_steps,
                             seed=opts.seed, output_dir=str(work / mode), disable_tqdm=True,
                             multi_objective_aggregation=mode, scale_rewards=scale)
            cfg = cfg.replace(per_device_train_batch_size=opts.prompts_per_step * cfg.num_generations,
                              gradient_accumulation_steps=1)
            trainer = GRPOTrainer(model, rewards, args=cfg, train_dataset=parts["rl"], processing_class=processor)
            rollout, seen = trainer.rollout, []

            def recording_rollout(round_idx, rollout=rollout, seen=seen):
                batch = rollout(round_idx)
                seen.append(batch.scores.clone())
                return batch
            trainer.rollout = recording_rollout
            t0 = time.time()
            history = trainer.train()
            names = [r.name for r in rewards]
            result["runs"][mode] = {
                "scale_rewards": scale, "seconds": round(time.time() - t0, 1),
                "advantage_share_mean": {n: mean([h.get(f"advantage_share/{n}") for h in history]) for n in names},
                "advantage_share_per_step": [{n: h.get(f"advantage_share/{n}") for n in names} for h in history],
                "reward_mean": {n: mean([h.get(f"reward/{n}/mean") for h in history]) for n in names},
                "frac_zero_std_groups": mean([h["frac_zero_std_groups"] for h in history]),
            }
            rollouts[mode] = seen
            weights, eps, g = trainer.weights, cfg.advantage_eps, cfg.num_generations
    base_rollouts = rollouts["sum_then_normalize"]
    result["same_rollouts"] = {
        "note": "the sum_then_normalize run's rollouts, scored under each aggregation",
        "spread": spread_stats(base_rollouts, g, ["accuracy", "format", "process"]),
        **{mode: dict(zip(["accuracy", "format", "process"],
                          [mean(col) for col in zip(*(shares_of(s, weights, mode, scale, g, eps) for s in base_rollouts))]))
           for mode, scale in RUNS.items()}}
    result["seconds"] = round(time.time() - t_start, 1)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("same_rollouts", "seconds")}, indent=1))
    for mode, run in result["runs"].items():
        print(mode, "advantage_share_mean", run["advantage_share_mean"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
