"""Group-wise vs per-chain judging on the embedded dataset: do the two agree, and what does each cost?

Builds GRPO-like steps from the embedded pathology items (B prompts per step, G chains per
prompt, the trainer's layout: each prompt repeated G times, group after group). Each chain is
drawn, with a seeded RNG, from a mix of kinds a policy produces mid-training:

    correct        every criterion stated, then "So the answer is X."
    reordered      the criteria in another order, concluded with "Therefore the answer is X."
    partial        a random strict subset of the criteria (all but the conclusion if only one)
    truncated      a correct chain cut off mid-reasoning (max_new_tokens hit: no closing tags)
    wrong_value    some criteria with an alternative value ("nuclear size is large, not small")
    wrong_answer   correct observations, but another option concluded and tagged
    both_values    every criterion with both values
    word_soup      every option's and criterion's terms run together (rewards/judge/audit.py)
    empty          only "So the answer is X."
    answer_only    no reasoning at all

Every step is scored twice through ``score_all`` with the local rubric judge server
(``python -m rewards.judge.server``): ``ProcessReward()`` (one request per distinct chain) and
``ProcessReward(group_judging=True)`` (one request per group). Reported:

* agreement within groups: Spearman rank correlation of the two modes' rewards in each group
  (average ranks for ties, computed in numpy; undefined for a group where either mode gives
  every chain the same reward), the largest reward difference, and the largest difference of the
  GRPO advantages ``(r - mean) / (std + 1e-4)`` the two modes lead to;
* cost per step, from each reward's judge ledger: requests, prompt / completion / total tokens
  (the rubric server counts whitespace-separated words, not BPE tokens) and wall time.

The rubric judge is absolute (each chain's verdict does not depend on the others), so with it the
two modes must agree exactly and the bench checks the plumbing and measures the cost. With
``--judge-url`` (any OpenAI-compatible LLM judge; the key from ``$JUDGE_API_KEY``) the same
numbers measure how far a real judge's relative verdicts move from its per-chain ones.

Writes JSON to bench/results/judge_groupwise.json.

    python bench/judge_groupwise.py [--steps 8] [--prompts 8] [--g 8] [--seed 0] [--latency-ms 0]
    python bench/judge_groupwise.py --judge-url http://HOST:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a plain checkout

import numpy as np  # noqa: E402

from data import load_embedded  # noqa: E402
from rewards import JudgeConfig, ProcessReward, RewardSample, score_all  # noqa: E402
from rewards.judge.audit import AuditRecord, build_chains, chain_text, sentence, wrong_claim  # noqa: E402
from rewards.judge.server import start_local_judge  # noqa: E402

KIND_WEIGHTS = {"correct": 0.22, "reordered": 0.10, "partial": 0.16, "truncated": 0.10, "wrong_value": 0.14,
                "wrong_answer": 0.08, "both_values": 0.05, "word_soup": 0.05, "empty": 0.05, "answer_only": 0.05}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "failures")


# --- chains ----------------------------------------------------------------------------------------

def kinds_for(record: AuditRecord, audit: dict[str, str], rng: random.Random) -> dict[str, str]:
    """One completion of every kind for ``record`` (fresh random choices on every call)."""
    crit, letter = list(record.criteria), record.choice
    so = f"So the answer is {letter}."
    out = {"correct": audit["correct"], "word_soup": audit["word_soup"], "both_values": audit["both_values"],
           "empty": audit["empty_reasoning"], "answer_only": audit["answer_only"]}
    shuffled = crit[:]
    rng.shuffle(shuffled)
    out["reordered"] = chain_text(shuffled, f"Therefore the answer is {letter}.", letter)
    if len(crit) > 1:
        keep = rng.sample(crit, rng.randint(1, len(crit) - 1))
        out["partial"] = chain_text([c for c in crit if c in keep], so, letter)
    else:
        out["partial"] = chain_text(crit, "", letter)               # observation without a conclusion
    full = audit["correct"]
    start, end = len("<think>"), full.index("</think>")
    out["truncated"] = full[:rng.randint(start + 10, max(start + 11, end - 5))]
    wrong = set(rng.sample(range(len(crit)), rng.randint(1, len(crit))))
    out["wrong_value"] = chain_text([wrong_claim(c) if i in wrong else c for i, c in enumerate(crit)], so, letter)
    others = [LETTERS[i] for i in range(len(record.options or [])) if LETTERS[i] != letter]
    other = rng.choice(others) if others else "no"
    out["wrong_answer"] = chain_text(crit, f"So the answer is {other}.", other)
    return out


def build_steps(n_steps: int, prompts: int, g: int, seed: int) -> list[dict]:
    """``n_steps`` steps of ``prompts`` x ``g`` samples in the trainer's order, with each chain's kind."""
    rng = random.Random(seed)
    items = [r for r in load_embedded(part="pathology") if r.options and r.criteria][:n_steps * prompts]
    if len(items) < n_steps * prompts:
        raise SystemExit(f"the embedded pathology part has only {len(items)} usable items")
    records = [AuditRecord(i + 1, r.id, r.question, r.answer, r.options, list(r.criteria), list(r.images))
               for i, r in enumerate(items)]
    audit_chains: dict[int, dict[str, str]] = {}
    for i, kind, completion in build_chains(records):
        audit_chains.setdefault(i, {})[kind] = completion
    names, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    steps = []
    for s in range(n_steps):
        samples, kinds = [], []
        for p in range(prompts):
            i = s * prompts + p
            r = records[i]
            for kind in rng.choices(names, weights, k=g):
                samples.append(RewardSample(question=r.question, completion=kinds_for(r, audit_chains[i], rng)[kind],
                                            answer=r.answer, options=r.options, images=list(r.images),
                                            criteria=list(r.criteria)))
                kinds.append(kind)
        steps.append({"samples": samples, "kinds": kinds})
    return steps


# --- statistics (by hand, numpy) -----------------------------------------------------------------

def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float | None:
    """Pearson correlation of the average ranks; None when either side is constant."""
    ra, rb = average_ranks(np.asarray(a, dtype=np.float64)), average_ranks(np.asarray(b, dtype=np.float64))
    da, db = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((da * da).sum() * (db * db).sum())
    return None if den == 0 else float((da * db).sum() / den)


def advantages(r: np.ndarray) -> np.ndarray:
    return (r - r.mean()) / (r.std(ddof=1) + 1e-4) if len(r) > 1 else np.zeros_like(r)


# --- run -----------------------------------------------------------------------------------------

def score_steps(config: JudgeConfig, steps: list[dict], group: bool) -> dict:
    reward = ProcessReward(config, group_judging=group)
    per_step, columns, before = [], [], {k: 0.0 for k in COUNTERS}
    for step in steps:
        start = time.perf_counter()
        scores, metrics = score_all([reward], step["samples"])
        elapsed = time.perf_counter() - start
        now = {k: metrics[f"judge/{k}"] for k in COUNTERS}
        per_step.append({**{k: now[k] - before[k] for k in COUNTERS}, "wall_s": elapsed})
        before = now
        columns.append(scores[:, 0].numpy().astype(np.float64))
    mean = {k: float(np.mean([s[k] for s in per_step])) for k in per_step[0]}
    return {"per_step_mean": mean, "per_step": per_step, "scores": columns}


def compare(steps: list[dict], chain: dict, group: dict, g: int) -> dict:
    rhos, undefined, max_diff, max_adv, n_groups = [], 0, 0.0, 0.0, 0
    nan = 0
    for a_col, b_col in zip(chain["scores"], group["scores"]):
        nan += int(np.isnan(a_col).sum() + np.isnan(b_col).sum())
        for start in range(0, len(a_col), g):
            a, b = a_col[start:start + g], b_col[start:start + g]
            n_groups += 1
            max_diff = max(max_diff, float(np.nanmax(np.abs(a - b))))
            max_adv = max(max_adv, float(np.nanmax(np.abs(advantages(a) - advantages(b)))))
            rho = spearman(a, b)
            if rho is None:
                undefined += 1
            else:
                rhos.append(rho)
    return {"groups": n_groups, "spearman_defined_groups": len(rhos), "spearman_undefined_groups": undefined,
            "spearman_mean": float(np.mean(rhos)) if rhos else None,
            "spearman_min": float(np.min(rhos)) if rhos else None,
            "max_abs_reward_diff": max_diff, "max_abs_advantage_diff": max_adv, "abstained": nan}


def kind_means(steps: list[dict], result: dict) -> dict:
    by_kind: dict[str, list[float]] = {}
    for step, col in zip(steps, result["scores"]):
        for kind, v in zip(step["kinds"], col):
            by_kind.setdefault(kind, []).append(float(v))
    return {k: {"n": len(v), "mean_reward": round(float(np.nanmean(v)), 4)} for k, v in sorted(by_kind.items())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (B)")
    p.add_argument("--g", type=int, default=8, help="chains per prompt (G)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--latency-ms", type=float, default=0.0, help="simulated judge latency per reply")
    p.add_argument("--judge-url", help="an OpenAI-compatible judge (default: start the local rubric server)")
    p.add_argument("--model", default="rubric", help="model name sent to --judge-url")
    p.add_argument("--no-images", action="store_true", help="do not send the tiles to the judge")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "judge_groupwise.json"))
    args = p.parse_args()
    steps = build_steps(args.steps, args.prompts, args.g, args.seed)

    def config(url: str) -> JudgeConfig:
        return JudgeConfig(base_url=url, model=args.model, max_concurrency=args.concurrency, timeout=120.0,
                           send_images=not args.no_images)

    if args.judge_url:
        chain = score_steps(config(args.judge_url), steps, group=False)
        group = score_steps(config(args.judge_url), steps, group=True)
    else:
        with start_local_judge("rubric", delay_ms=args.latency_ms) as judge:
            chain = score_steps(config(judge.url), steps, group=False)
            group = score_steps(config(judge.url), steps, group=True)
    distinct = [len(set(s["samples"][i].completion for i in range(k, k + args.g)))
                for s in steps for k in range(0, len(s["samples"]), args.g)]
    c, gm = chain["per_step_mean"], group["per_step_mean"]
    result = {
        "setup": {"steps": args.steps, "prompts_per_step": args.prompts, "g": args.g, "seed": args.seed,
                  "chains_per_step": args.prompts * args.g, "latency_ms": args.latency_ms,
                  "mean_distinct_chains_per_group": float(np.mean(distinct)),
                  "judge": args.judge_url or "local rubric server", "model": args.model,
                  "token_unit": ("whitespace-separated words (rubric server usage)" if not args.judge_url
                                 else "the judge's usage"),
                  "kind_weights": KIND_WEIGHTS, "python": platform.python_version(), "cpus": os.cpu_count()},
        "agreement": compare(steps, chain, group, args.g),
        "per_step": {
            "per_chain": {k: round(v, 3) for k, v in c.items()},
            "group": {k: round(v, 3) for k, v in gm.items()},
            "ratio_per_chain_over_group": {k: round(c[k] / gm[k], 3) if gm[k] else None
                                           for k in ("requests", "prompt_tokens", "completion_tokens",
                                                     "total_tokens", "wall_s")},
        },
        "mean_reward_by_kind": {"per_chain": kind_means(steps, chain), "group": kind_means(steps, group)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    a = result["agreement"]
    print(f"{a['groups']} groups of {args.g}: Spearman within groups mean {a['spearman_mean']} "
          f"(min {a['spearman_min']}, {a['spearman_undefined_groups']} groups constant), "
          f"max |reward diff| {a['max_abs_reward_diff']:.4f}, max |advantage diff| {a['max_abs_advantage_diff']:.4f}")
    for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "wall_s"):
        print(f"per step {k:<18} per-chain {c[k]:>10.1f}   group {gm[k]:>10.1f}   ratio "
              f"{result['per_step']['ratio_per_chain_over_group'][k]}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
