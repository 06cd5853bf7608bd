"""Issue 17 (dynamic sampling, multi-reward aggregation, soft overlong punishment, entropy) against
independent implementations: plain-Python loops written from the papers' / TRL's formulas on random
tensors, and the dynamic-sampling loop run by two threads joined by a fake all-reduce.

    GDPO / TRL normalize_then_sum   A = (S - mean(S)) / (std(S) + eps),  S = sum_k w_k z_k,
                                    z_k = (r_k - mean_group(r_k)) / (std_group(r_k) + eps)   arXiv 2601.05242
    TRL top_entropy_quantile        mask = entropy >= quantile(valid entropies, 1 - q)        arXiv 2506.01939
    DAPO soft overlong punishment   0 | ((L - C) - |y|) / C | -1                              arXiv 2503.14476 Sec. 3.4
"""
import math
import threading

import numpy as np
import pytest
import torch

from grpo.core import (advantage_contributions, advantage_shares, aggregate_rewards, entropy_threshold,
                       group_advantages, high_entropy_mask)
from grpo.rollout import sample_informative_groups
from rewards import OverlongPenalty, RewardSample
from rewards.overlong import soft_overlong_penalty

torch.set_num_threads(1)


def _mean_std(vals):
    """Mean and unbiased std of a list (std 0 below two values)."""
    if not vals:
        return 0.0, 0.0
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _random_rewards(seed, B=5, G=6, R=3, nan_frac=0.15, levels=3):
    """Rewards on a few levels (so flat groups and ties happen), some NaN, one all-NaN row."""
    rng = np.random.default_rng(seed)
    r = rng.integers(0, levels, size=(B, G, R)).astype(np.float64) / (levels - 1)
    r[rng.random((B, G, R)) < nan_frac] = np.nan
    r[0, 0, :] = np.nan
    r[1, :, 0] = 0.5                                  # reward 0 flat in group 1
    return r, rng.uniform(0.2, 2.0, size=R)


def ref_gdpo_advantages(r, w, eps):
    """TRL's multi_objective_aggregation="normalize_then_sum", written as loops."""
    B, G, R = r.shape
    S = np.full((B, G), np.nan)
    for b in range(B):
        z = np.full((G, R), np.nan)
        for k in range(R):
            vals = [r[b, g, k] for g in range(G) if not math.isnan(r[b, g, k])]
            m, s = _mean_std(vals)
            for g in range(G):
                if not math.isnan(r[b, g, k]):
                    z[g, k] = (r[b, g, k] - m) / (s + eps)
        for g in range(G):
            parts = [w[k] * z[g, k] for k in range(R) if not math.isnan(z[g, k])]
            if parts:
                S[b, g] = sum(parts)
    valid = [S[b, g] for b in range(B) for g in range(G) if not math.isnan(S[b, g])]
    m, s = _mean_std(valid)
    return np.where(np.isnan(S), 0.0, (S - m) / (s + eps))


@pytest.mark.parametrize("seed", range(6))
def test_normalize_then_sum_with_batch_scale_equals_trl_gdpo(seed):
    r, w = _random_rewards(seed)
    combined, _ = aggregate_rewards(torch.tensor(r), torch.tensor(w), "normalize_then_sum", eps=1e-4)
    adv, _ = group_advantages(combined, "batch", eps=1e-4)
    np.testing.assert_allclose(adv.numpy(), ref_gdpo_advantages(r, w, 1e-4), atol=1e-9, rtol=1e-9)


def ref_contributions(terms, scale, eps):
    """Per reward: its term minus its group mean over the samples that have a combined reward,
    times the same scale factor as the combined reward's advantage; 0 in groups without spread."""
    B, G, R = terms.shape
    has = ~np.all(np.isnan(terms), axis=2)                                     # (B, G)
    t = np.where(np.isnan(terms), 0.0, terms)
    comb = np.where(has, t.sum(2), np.nan)
    _, batch_std = _mean_std([v for v in comb.ravel() if not math.isnan(v)])
    out = np.zeros((B, G, R))
    for b in range(B):
        rows = [g for g in range(G) if has[b, g]]
        vals = [comb[b, g] for g in rows]
        if len(vals) < 2 or max(vals) == min(vals):
            continue
        _, s = _mean_std(vals)
        factor = {"group": 1 / (s + eps), "batch": 1 / (batch_std + eps), "none": 1.0}[scale]
        for k in range(R):
            mk = sum(t[b, g, k] for g in rows) / len(rows)
            for g in rows:
                out[b, g, k] = (t[b, g, k] - mk) * factor
    return out


@pytest.mark.parametrize("mode", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", range(3))
def test_advantage_contributions_match_loops_and_sum_to_the_advantage(mode, scale, seed):
    r, w = _random_rewards(100 + seed)
    combined, terms = aggregate_rewards(torch.tensor(r), torch.tensor(w), mode, eps=1e-4)
    c = advantage_contributions(terms, scale, eps=1e-4)
    np.testing.assert_allclose(c.numpy(), ref_contributions(terms.numpy(), scale, 1e-4), atol=1e-9)
    adv, _ = group_advantages(combined, scale, eps=1e-4)
    np.testing.assert_allclose(c.sum(-1).numpy(), adv.numpy(), atol=1e-9)
    a = np.abs(ref_contributions(terms.numpy(), scale, 1e-4)).sum((0, 1))
    np.testing.assert_allclose(advantage_shares(c).numpy(), a / a.sum(), atol=1e-12)


def trl_high_entropy_mask(entropies, mask, top_quantile):
    """TRL GRPOTrainer.get_high_entropy_mask in one process (threshold = 1 - top_entropy_quantile)."""
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    thr = torch.quantile(local, 1 - top_quantile)
    return (entropies * mask.float() >= thr) & mask.bool()


@pytest.mark.parametrize("q", [0.05, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_high_entropy_selection_equals_trl(q, seed):
    g = torch.Generator().manual_seed(seed)
    ent = torch.rand(6, 11, generator=g) * 3
    mask = torch.rand(6, 11, generator=g) > 0.3
    ent_padded = torch.where(mask, ent, torch.full_like(ent, float("nan")))
    thr = entropy_threshold(ent_padded, q)
    torch.testing.assert_close(thr, torch.quantile(ent[mask], 1 - q))
    ours = high_entropy_mask(torch.where(mask, ent, torch.full_like(ent, 1e6)), mask, thr)  # garbage padding
    assert torch.equal(ours, trl_high_entropy_mask(ent, mask, q))
    # the fraction kept is the quantile's: ceil-ish of q * tokens (no ties in continuous entropies)
    n = int(mask.sum())
    assert abs(int(ours.sum()) - q * n) <= 1


def test_soft_overlong_penalty_hand():
    # L_max 10, buffer 4: 0 up to 6 tokens, then (6 - |y|) / 4: 7 -> -.25, 8 -> -.5, 9 -> -.75, 10 -> -1
    assert [soft_overlong_penalty(n, 10, 4) for n in (0, 5, 6, 7, 8, 9, 10, 11)] == \
        [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]
    reward = OverlongPenalty(buffer=4)
    sample = RewardSample(question="q", completion="c", answer="a",
                          extra={"completion_tokens": 8, "max_completion_length": 10})
    assert reward.score(sample) == -0.5
    assert OverlongPenalty(buffer=4, max_length=12).score(sample) == 0.0       # (8 <= 12 - 4)
    with pytest.raises(KeyError, match="completion_tokens"):
        reward.score(RewardSample(question="q", completion="c", answer="a"))
    with pytest.raises(ValueError, match="buffer must be an integer >= 1"):
        OverlongPenalty(buffer=0)
    assert reward.range == (-1.0, 0.0) and reward.name == "overlong"


class FakeCollective:
    """all_reduce_sum across threads: each rank deposits its tensor, waits for all, sums."""

    def __init__(self, world):
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world)
        self.calls = [0] * world

    def for_rank(self, rank):
        def all_reduce_sum(t):
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before everyone has summed
            return total
        return all_reduce_sum


def _run_ranks(patterns, needed, max_extra):
    """patterns[rank][attempt] = list of informative flags; returns per-rank (picks, stats, attempts)."""
    world = len(patterns)
    coll, out = FakeCollective(world), [None] * world

    def rank_main(rank):
        made = []

        def generate(attempt):
            made.append(attempt)
            return torch.tensor(patterns[rank][attempt])
        picks, stats = sample_informative_groups(generate, needed, max_extra, coll.for_rank(rank))
        out[rank] = (picks, stats, made)
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(o is not None for o in out), "a rank hung"
    return out, coll


def test_dynamic_sampling_decision_is_global_across_ranks():
    T_, F_ = True, False
    # 3 groups needed per rank. Rank 0: 2 informative groups in attempt 0, none in 1 and 2, 3 in 3.
    # Rank 1: 1 in attempt 0, 1 in attempt 2, 3 in attempt 3.
    patterns = [[[T_, T_, F_], [F_, F_, F_], [F_, F_, F_], [T_, T_, T_]],
                [[T_, F_, F_], [F_, F_, F_], [F_, F_, T_], [T_, T_, T_]]]
    (r0, r1), coll = _run_ranks(patterns, needed=3, max_extra=3)
    # Both ranks are short until attempt 3; the loop stops at the first attempt after which no rank
    # is short, and both ranks make the same attempts.
    assert r0[2] == r1[2] == [0, 1, 2, 3]
    assert r0[1]["extra_rounds"] == r1[1]["extra_rounds"] == 3.0
    assert r0[0] == [(0, 0), (0, 1), (3, 0)]
    assert r1[0] == [(0, 0), (2, 2), (3, 0)]
    # before refilling: attempt 0 had 2 + 1 informative of 6 groups -> 3/6 zero-std
    assert r0[1]["zero_std_fraction"] == r1[1]["zero_std_fraction"] == pytest.approx(3 / 6)
    assert r0[1]["generated_groups"] == 4 * 6
    assert coll.calls == [4, 4]                        # one all-reduce per attempt, same count on both


def test_dynamic_sampling_stops_at_max_rounds_and_fills():
    T_, F_ = True, False
    patterns = [[[T_, T_], [F_, F_], [F_, F_]], [[F_, F_], [F_, T_], [F_, F_]]]
    (r0, r1), _ = _run_ranks(patterns, needed=2, max_extra=1)
    # rank 1 is still short after 1 extra round: both stop (max), rank 1 fills with zero-std groups
    assert r0[2] == r1[2] == [0, 1]
    assert r0[0] == [(0, 0), (0, 1)] and r0[1]["filled_frac"] == 0.0
    assert r1[0] == [(0, 0), (1, 1)] and r1[1]["filled_frac"] == 0.5
    assert r0[1]["zero_std_fraction"] == pytest.approx(2 / 4)
    # rank 0 complete at once, rank 1 not: rank 0 still generates the extra round (in step), keeps its own
    (r0, r1), coll = _run_ranks([[[T_, T_], [T_, T_]], [[F_, F_], [T_, T_]]], needed=2, max_extra=3)
    assert r0[2] == r1[2] == [0, 1] and coll.calls == [2, 2]
    assert r0[0] == [(0, 0), (0, 1)] and r1[0] == [(1, 0), (1, 1)]
    # all ranks complete after attempt 0: no extra round at all
    (r0, r1), coll = _run_ranks([[[T_, T_]], [[T_, T_]]], needed=2, max_extra=5)
    assert r0[2] == r1[2] == [0] and r0[1]["extra_rounds"] == 0.0 and coll.calls == [1, 1]
