"""grpo.core against a second, deliberately naive implementation (numpy + Python loops written
straight from the papers' formulas) on random tensors, plus gradient identities.

Reference formulas:
  GRPO advantage   A_i = (r_i - mean(r)) / (std(r) + eps)         DeepSeekMath arXiv 2402.03300
  clipped surrogate  -min(r A, clip(r, 1-el, 1+eh) A)              PPO / DAPO arXiv 2503.14476
  dual clip        A < 0: -max(min(...), c A)                      arXiv 1912.09729
  GSPO-token       s_i = exp(mean_t log r_it), d loss_t/d logp_t = -A s_i (unclipped) arXiv 2507.18071
"""
import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from grpo.core import (
    aggregate_loss,
    combine_rewards,
    group_advantages,
    kl_penalty,
    policy_loss,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- reference: advantages

def ref_group_advantages(rewards: np.ndarray, scale: str, eps: float) -> np.ndarray:
    B, G = rewards.shape
    allvalid = rewards[~np.isnan(rewards)]
    batch_std = np.std(allvalid, ddof=1) if allvalid.size > 1 else 0.0
    out = np.zeros((B, G))
    for b in range(B):
        vals = [rewards[b, g] for g in range(G) if not math.isnan(rewards[b, g])]
        if len(vals) < 2 or max(vals) == min(vals):
            continue  # no spread -> every advantage of the group is 0
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for g in range(G):
            r = rewards[b, g]
            if math.isnan(r):
                continue
            denom = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
            out[b, g] = (r - mean) / denom
    return out


reward_values = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, float("nan")]) | st.floats(-3, 3)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), B=st.integers(1, 5), G=st.integers(1, 6), scale=st.sampled_from(["group", "batch", "none"]))
def test_group_advantages_vs_reference(data, B, G, scale):
    r = np.array(data.draw(st.lists(reward_values, min_size=B * G, max_size=B * G)), dtype=np.float64).reshape(B, G)
    adv, m = group_advantages(torch.from_numpy(r), scale, eps=1e-4)
    np.testing.assert_allclose(adv.numpy(), ref_group_advantages(r, scale, 1e-4), rtol=1e-9, atol=1e-9)
    valid = ~np.isnan(r)
    # advantages of each group sum to 0 over its valid members (mean baseline)
    np.testing.assert_allclose(np.where(valid, adv.numpy(), 0).sum(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(m["abstain_frac"].item(), 1 - valid.mean())
    if valid.any():
        np.testing.assert_allclose(m["reward_mean"].item(), r[valid].mean(), rtol=1e-6, atol=1e-9)


def test_combine_rewards_vs_reference():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(40, 3))
    r[rng.random((40, 3)) < 0.4] = np.nan
    w = rng.normal(size=3)
    ref = []
    for row in r:
        terms = [wj * x for wj, x in zip(w, row) if not math.isnan(x)]
        ref.append(sum(terms) if terms else float("nan"))
    got = combine_rewards(torch.from_numpy(r), torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-12, atol=1e-12)
    assert np.isnan(got).any()  # the random draw contains all-NaN rows


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_vs_reference(est):
    rng = np.random.default_rng(1)
    lp, rp = rng.normal(-2, 3, size=(6, 9)), rng.normal(-2, 3, size=(6, 9))
    lp[0, 0], rp[0, 0] = 0.0, -25.0   # beyond the clamp
    ref = np.zeros_like(lp)
    for i in range(6):
        for t in range(9):
            d = lp[i, t] - rp[i, t]
            if est == "k1":
                ref[i, t] = d
            elif est == "k2":
                ref[i, t] = d * d / 2
            else:
                x = min(max(-d, -10.0), 10.0)
                ref[i, t] = math.exp(x) - x - 1
    got = kl_penalty(torch.from_numpy(lp), torch.from_numpy(rp), est, clamp=10.0).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- reference: policy loss

def ref_policy(logp, old, adv, mask, el, eh, dual, level):
    """Per-token loss, d loss_t / d logp_t (own token only: true for both levels, see GSPO-token),
    and the metrics, by explicit loops."""
    N, T = logp.shape
    loss, dloss = np.zeros((N, T)), np.zeros((N, T))
    n_low = n_high = n_dual = 0
    ratios = []
    for i in range(N):
        valid = [t for t in range(T) if mask[i, t]]
        A = adv[i]
        s = math.exp(sum(logp[i, t] - old[i, t] for t in valid) / max(len(valid), 1))
        for t in valid:
            r = s if level == "sequence" else math.exp(logp[i, t] - old[i, t])
            ratios.append(r)
            unclipped = r * A
            clipped = min(max(r, 1 - el), 1 + eh) * A
            if unclipped <= clipped:
                obj, g = unclipped, A * r        # d(r A)/dlogp_t = A r
            else:
                obj, g = clipped, 0.0
            if dual is not None and A < 0 and obj < dual * A:
                obj, g = dual * A, 0.0
                n_dual += 1
            n_low += A < 0 and r < 1 - el
            n_high += A > 0 and r > 1 + eh
            loss[i, t], dloss[i, t] = -obj, -g
    n = max(len(ratios), 1)
    metrics = {"clipfrac_low": n_low / n, "clipfrac_high": n_high / n, "ratio_mean": sum(ratios) / n,
               "ratio_min": min(ratios), "ratio_max": max(ratios)}
    if dual is not None:
        metrics["clipfrac_delta"] = n_dual / n
    return loss, dloss, metrics


def ref_aggregate_weights(mask, mode, L):
    """w_it such that aggregate = sum_it w_it * loss_it (so also d agg / d loss_it = w_it)."""
    N, T = mask.shape
    w = np.zeros((N, T))
    lens = mask.sum(1)
    if mode == "grpo":
        n_seq = int((lens > 0).sum())
        for i in range(N):
            for t in range(T):
                if mask[i, t]:
                    w[i, t] = 1.0 / (n_seq * lens[i])
    elif mode == "dapo":
        w[mask] = 1.0 / mask.sum()
    else:  # Dr. GRPO
        w[mask] = 1.0 / (N * L)
    return w


def _random_batch(seed, N=7, T=9):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 1.0, size=(N, T))
    logp = old + rng.normal(0, 0.45, size=(N, T))       # ratios ~ exp(N(0, 0.45)): many clipped
    logp[0, :3] = old[0, :3] + np.log([3.5, 4.0, 0.1])  # well past dual clip / lower clip
    logp[1, :3] = old[1, :3] + 1.4                      # a sequence whose GSPO ratio is large
    adv = rng.normal(size=N)
    adv[0] = -abs(adv[0]) - 0.5
    adv[1] = -abs(adv[1]) - 0.5
    logp[2] = old[2] + 0.6                              # GSPO ratio e^0.6 = 1.82 with A > 0: upper clip
    logp[3] = old[3] - 0.5                              # GSPO ratio e^-0.5 = 0.61 with A < 0: lower clip
    adv[2], adv[3] = abs(adv[2]) + 0.1, -abs(adv[3]) - 0.1
    mask = rng.random((N, T)) < 0.75
    mask[0, :3] = mask[1, :3] = mask[2, :2] = mask[3, :2] = True
    mask[1, 3:] = False
    mask[-1] = False                                    # an empty sequence
    logp[~mask] = np.nan                                # padding garbage must not leak
    return logp, old, adv, mask


@pytest.mark.parametrize("mode", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_policy_loss_and_aggregation_vs_reference(mode, level, dual, eps):
    el, eh = eps
    L = 12
    logp, old, adv, mask = _random_batch(seed=zlib.crc32(repr((mode, level, dual, eps)).encode()))
    ref_loss, ref_dloss, ref_m = ref_policy(logp, old, adv, mask, el, eh, dual, level)
    w = ref_aggregate_weights(mask, mode, L)

    lp = torch.from_numpy(logp).requires_grad_(True)
    m_t = torch.from_numpy(mask)
    loss, metrics = policy_loss(lp, torch.from_numpy(old), torch.from_numpy(adv), m_t, el, eh, dual, level)
    agg = aggregate_loss(loss, m_t, mode, max_completion_length=L)
    agg.backward()

    np.testing.assert_allclose(loss.detach().numpy(), ref_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(agg.item(), (w * ref_loss).sum(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lp.grad.numpy(), w * ref_dloss, rtol=1e-9, atol=1e-12)
    assert set(metrics) == set(ref_m)
    for k, v in ref_m.items():
        np.testing.assert_allclose(metrics[k].item(), v, rtol=1e-10, atol=1e-12, err_msg=k)
    # the random batch really exercises the branches
    assert ref_m["clipfrac_low"] + ref_m["clipfrac_high"] > 0
    if dual is not None:
        assert ref_m["clipfrac_delta"] > 0


@pytest.mark.parametrize("dual", [None, 3.0])
def test_gspo_token_seq_mean_equals_gspo_sequence_objective(dual):
    # GSPO (arXiv 2507.18071): J = 1/G sum_i min(s_i A_i, clip(s_i) A_i) with the gradient through
    # s_i = exp(1/|y_i| sum_t log r_it), i.e. d s_i / d logp_it = s_i / |y_i|. GSPO-token gives every
    # token d loss/d logp_it = -A s_i; averaged with 1/|y_i| (seq_mean_token_mean) the gradients agree.
    logp, old, adv, mask = _random_batch(seed=7)
    m_t = torch.from_numpy(mask)
    lp = torch.from_numpy(logp).requires_grad_(True)
    loss, _ = policy_loss(lp, torch.from_numpy(old), torch.from_numpy(adv), m_t, 0.2, 0.2, dual, "sequence")
    aggregate_loss(loss, m_t, "grpo").backward()

    lp2 = torch.from_numpy(np.nan_to_num(logp)).requires_grad_(True)
    terms = []
    for i in range(mask.shape[0]):
        idx = torch.from_numpy(np.nonzero(mask[i])[0])
        if len(idx) == 0:
            continue
        s = torch.exp((lp2[i, idx] - torch.from_numpy(old[i])[idx]).mean())   # gradient flows through the mean
        A = float(adv[i])
        obj = torch.min(s * A, s.clamp(0.8, 1.2) * A)
        if dual is not None and A < 0:
            obj = torch.max(obj, torch.tensor(dual * A, dtype=obj.dtype))
        terms.append(-obj)
    J = torch.stack(terms).mean()
    J.backward()
    np.testing.assert_allclose(lp.grad.numpy(), np.where(mask, lp2.grad.numpy(), 0.0), rtol=1e-9, atol=1e-12)
    assert lp.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["dapo", "dr_grpo", "grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_microbatch_gradient_accumulation_equals_full_batch(mode, level):
    # Gradient accumulation: sum over micro-batches of aggregate(..., global counts) must equal the
    # full-batch loss, and so must the accumulated gradient.
    logp, old, adv, mask = _random_batch(seed=11, N=10, T=8)
    m_t, old_t, adv_t = torch.from_numpy(mask), torch.from_numpy(old), torch.from_numpy(adv)
    L = 8
    kw = dict(num_tokens=int(mask.sum()), max_completion_length=L)
    kw["num_sequences"] = int((mask.sum(1) > 0).sum())   # non-empty rows (seq_mean_token_mean)
    kw["num_rows"] = mask.shape[0]                         # every row (Dr. GRPO's constant normaliser)

    lp = torch.from_numpy(logp).requires_grad_(True)
    full = aggregate_loss(policy_loss(lp, old_t, adv_t, m_t, importance_sampling_level=level)[0], m_t, mode, max_completion_length=L)
    full.backward()
    g_full = lp.grad.clone()

    lp.grad = None
    total = 0.0
    for sl in [slice(0, 3), slice(3, 4), slice(4, 10)]:
        pl, _ = policy_loss(lp[sl], old_t[sl], adv_t[sl], m_t[sl], importance_sampling_level=level)
        part = aggregate_loss(pl, m_t[sl], mode, **kw)
        part.backward()
        total += part.item()
    np.testing.assert_allclose(total, full.item(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lp.grad.numpy(), g_full.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mode", ["dapo", "dr_grpo"])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_gspo_token_equals_trl_sequence_level_under_token_weighted_aggregations(mode, dual):
    # TRL GRPOTrainer, importance_sampling_level="sequence": one ratio per sequence,
    # s_i = exp(sum_t m_it log r_it / |o_i|) with the gradient through the mean, a per-sequence loss
    # (N, 1) broadcast over the mask, then bnpo (token_mean) / dr_grpo. Each sequence's loss then
    # counts |o_i| times, and d(|o_i| l_i)/d logp_it = |o_i| * (-A s_i / |o_i|) = -A s_i: the loss
    # and gradient of GSPO-token (ours) under the same aggregation.
    logp, old, adv, mask = _random_batch(seed=5)
    m_t, L = torch.from_numpy(mask), 12
    lp = torch.from_numpy(logp).requires_grad_(True)
    loss, _ = policy_loss(lp, torch.from_numpy(old), torch.from_numpy(adv), m_t, 0.2, 0.28, dual, "sequence")
    ours = aggregate_loss(loss, m_t, mode, max_completion_length=L)
    ours.backward()

    lp2 = torch.from_numpy(np.nan_to_num(logp)).requires_grad_(True)
    m = m_t.to(lp2.dtype)
    log_ratio = (lp2 - torch.from_numpy(old)) * m
    coef = torch.exp((log_ratio.sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1))         # (N, 1)
    a = torch.from_numpy(adv).unsqueeze(1)
    per_seq = -torch.min(coef * a, coef.clamp(0.8, 1.28) * a)                            # (N, 1)
    if dual is not None:
        per_seq = torch.where(a < 0, torch.min(per_seq, -dual * a), per_seq)
    total = (per_seq * m).sum()                                                          # broadcast over tokens
    trl = total / m.sum() if mode == "dapo" else total / (m.shape[0] * L)
    trl.backward()
    np.testing.assert_allclose(ours.item(), trl.item(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lp.grad.numpy(), lp2.grad.numpy() * mask, rtol=1e-9, atol=1e-14)
    assert lp.grad.abs().sum() > 0
