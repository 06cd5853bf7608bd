"""Hand-computed checks of grpo.core. Every expected number is worked out in a comment.

The independent re-implementation comparisons on random tensors live in
test_core_reference.py; the chunked token log-probs in test_logprobs.py.
"""
import math

import pytest
import torch

from grpo.config import GRPOConfig, SFTConfig
from grpo.core import (
    ADVANTAGE_SCALES,
    KL_ESTIMATORS,
    LOSS_TYPES,
    LR_SCHEDULES,
    RATIO_LEVELS,
    REWARD_AGGREGATIONS,
    advantage_contributions,
    advantage_shares,
    aggregate_loss,
    aggregate_rewards,
    combine_rewards,
    entropy_threshold,
    grpo_token_loss,
    group_advantages,
    high_entropy_mask,
    kl_penalty,
    masked_mean,
    policy_loss,
    select_groups,
    token_logprobs_from_hidden,
    zero_std_groups,
)
from grpo.engine import lr_lambda

torch.set_num_threads(1)
NAN = float("nan")
LN2 = math.log(2.0)


def T(x, **kw):
    return torch.tensor(x, dtype=kw.pop("dtype", torch.float64), **kw)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=tol, rtol=tol, equal_nan=True)


# --------------------------------------------------------------------------- group_advantages

# group 0: [1, 0, 1, 0] -> mean 0.5, deviations +-0.5, sum sq = 4 * 0.25 = 1,
#          unbiased var = 1/3, std = 0.577350
# group 1: [2, NaN, 0, 1] -> valid [2, 0, 1], mean 1, deviations [1, -1, 0], sum sq = 2,
#          var = 2/2 = 1, std = 1
# batch:   valid [1,0,1,0,2,0,1]: n = 7, sum 5, mean 5/7; sum sq of deviations =
#          sum r^2 - n mean^2 = 7 - 25/7 = 24/7; var = (24/7)/6 = 4/7; std = 0.755929
REWARDS = [[1.0, 0.0, 1.0, 0.0], [2.0, NAN, 0.0, 1.0]]


def test_group_advantages_group_scale_hand():
    adv, m = group_advantages(T(REWARDS), "group", eps=0.0)
    s3 = math.sqrt(3) / 2  # 0.5 / sqrt(1/3) = 0.866025
    close(adv, [[s3, -s3, s3, -s3], [1.0, 0.0, -1.0, 0.0]])
    close(m["frac_zero_std_groups"], 0.0)
    close(m["reward_mean"], 5 / 7)
    close(m["reward_std"], math.sqrt(4 / 7))
    close(m["abstain_frac"], 1 / 8)


def test_group_advantages_default_eps_hand():
    adv, _ = group_advantages(T(REWARDS))  # eps = 1e-4
    # 0.5 / (0.5773503 + 0.0001) = 0.8658754 ; 1 / (1 + 1e-4) = 0.99990001
    close(adv[0, 0], 0.8658754297607016)
    close(adv[1], [0.99990001, 0.0, -0.99990001, 0.0])


def test_group_advantages_batch_scale_hand():
    adv, _ = group_advantages(T(REWARDS), "batch", eps=0.0)
    a = 0.5 / math.sqrt(4 / 7)  # = sqrt(7)/4 = 0.661438
    b = 1.0 / math.sqrt(4 / 7)  # = sqrt(7)/2 = 1.322876
    close(adv, [[a, -a, a, -a], [b, 0.0, -b, 0.0]])


def test_group_advantages_none_scale_hand():
    adv, _ = group_advantages(T(REWARDS), "none")
    # Dr. GRPO: r - mean only: [1,0,1,0] - 0.5 ; [2,.,0,1] - 1
    close(adv, [[0.5, -0.5, 0.5, -0.5], [1.0, 0.0, -1.0, 0.0]])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_group_advantages_degenerate_groups_exact_zero(scale, dtype):
    r = torch.tensor([
        [1.0, 0.0, 1.0, 0.0],       # normal group (gives the batch a nonzero std)
        [0.1, 0.1, 0.1, NAN],       # all valid equal -> exactly 0
        [NAN, NAN, NAN, NAN],       # all abstained -> 0
        [NAN, 3.0, NAN, NAN],       # single valid -> 0
    ], dtype=dtype)
    adv, m = group_advantages(r, scale)
    assert adv.dtype == dtype
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[1:], torch.zeros_like(adv[1:]))      # exactly 0, not 1e-9
    assert (adv[0] != 0).all()
    close(m["frac_zero_std_groups"], 3 / 4)
    close(m["abstain_frac"], 8 / 16)  # 1 + 4 + 3 NaN out of 16


def test_group_advantages_all_equal_float_roundoff_exact_zero():
    # fp32: 0.7 - sum([0.7]*7)/7 = 5.96e-8 (0.3 -> 2.98e-8, 0.9 -> -5.96e-8), which divided by
    # (std 0 + eps 1e-4) would give |adv| ~ 6e-4; flat groups must still give exactly 0
    r = torch.full((3, 7), 0.7, dtype=torch.float32)
    r[1], r[2] = 0.3, 0.9
    for scale in ADVANTAGE_SCALES:
        adv, m = group_advantages(r, scale)
        assert torch.equal(adv, torch.zeros_like(adv))
        close(m["frac_zero_std_groups"], 1.0)


def test_group_advantages_all_nan_batch():
    adv, m = group_advantages(torch.full((2, 3), NAN), "batch")
    assert torch.equal(adv, torch.zeros(2, 3))
    close(m["abstain_frac"], 1.0)
    assert all(torch.isfinite(v) for v in m.values())


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="valid names.*batch.*group.*none"):
        group_advantages(torch.zeros(2, 2), "bogus")
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), "group")


# --------------------------------------------------------------------------- combine_rewards

def test_combine_rewards_hand():
    r = T([[1.0, 0.5], [NAN, 1.0], [NAN, NAN], [0.0, NAN]])
    w = T([1.0, 2.0])
    # row0: 1*1 + 2*0.5 = 2 ; row1: NaN skipped -> 2*1 = 2 ; row2: all NaN -> NaN ; row3: 1*0 = 0
    close(combine_rewards(r, w), [2.0, 2.0, NAN, 0.0])


def test_combine_rewards_errors():
    with pytest.raises(ValueError):
        combine_rewards(torch.zeros(3, 2), torch.ones(3))


# --------------------------------------------------------------------------- kl_penalty

def test_kl_estimators_hand():
    logp, ref = T([[0.0, -1.0, -2.0]]), T([[-1.0, -1.0, 0.0]])
    # d = logp - ref = [1, 0, -2]
    close(kl_penalty(logp, ref, "k1"), [[1.0, 0.0, -2.0]])
    close(kl_penalty(logp, ref, "k2"), [[0.5, 0.0, 2.0]])             # d^2 / 2
    # x = ref - logp = [-1, 0, 2]; exp(x) - x - 1 = [e^-1 + 1 - 1, 0, e^2 - 3]
    close(kl_penalty(logp, ref, "k3"), [[math.exp(-1), 0.0, math.exp(2) - 3]])
    for alias, name in [("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")]:
        assert KL_ESTIMATORS[alias] is KL_ESTIMATORS[name]


def test_kl_k3_clamp_hand():
    logp, ref = T([[0.0, -100.0]], dtype=torch.float32), T([[-30.0, 0.0]], dtype=torch.float32)
    # x = [-30, 100] -> clamped [-10, 10]: e^-10 + 10 - 1 = 9.0000454 ; e^10 - 10 - 1 = 22015.4658
    close(kl_penalty(logp, ref, "k3", clamp=10.0), [[9.000045399929762, 22015.465794806718]], tol=1e-5)
    # without the clamp e^100 overflows fp32
    assert torch.isinf(kl_penalty(logp, ref, "k3", clamp=None)[0, 1])


def test_kl_k3_gradient_hand():
    logp = T([[0.0, 0.0]], requires_grad=True)
    ref = T([[-1.0, -30.0]])
    kl_penalty(logp, ref, "k3", clamp=10.0).sum().backward()
    # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref-logp) = 1 - e^-1 = 0.632121 ; clamped -> 0
    close(logp.grad, [[1 - math.exp(-1), 0.0]])


def test_kl_unknown():
    with pytest.raises(ValueError, match="valid names"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# --------------------------------------------------------------------------- policy_loss

def _lp(ratios, requires_grad=True):
    """logp with old_logp = 0 so that exp(logp - old_logp) = ratio."""
    lp = torch.log(T(ratios))
    return lp.requires_grad_(requires_grad)


RATIOS = [0.5, 0.9, 1.0, 1.1, 1.5]


def test_policy_loss_token_hand():
    logp = _lp([RATIOS, RATIOS])
    old = torch.zeros_like(logp)
    adv = T([1.0, -1.0])
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, m = policy_loss(logp, old, adv, mask, 0.2, 0.2)
    # A=+1: -min(r, clip(r, .8, 1.2)) = -[0.5, 0.9, 1, 1.1, min(1.5,1.2)=1.2]
    # A=-1: -min(-r, -clip(r)) = max(r, clip(r)) = [max(.5,.8)=.8, .9, 1, 1.1, max(1.5,1.2)=1.5]
    close(loss, [[-0.5, -0.9, -1.0, -1.1, -1.2], [0.8, 0.9, 1.0, 1.1, 1.5]])
    close(m["clipfrac_low"], 0.1)   # only (A<0, r=0.5<0.8): 1 of 10 tokens
    close(m["clipfrac_high"], 0.1)  # only (A>0, r=1.5>1.2): 1 of 10
    close(m["ratio_mean"], 1.0)     # 2 * (0.5+0.9+1+1.1+1.5) / 10 = 10/10
    close(m["ratio_min"], 0.5)
    close(m["ratio_max"], 1.5)
    assert "clipfrac_delta" not in m
    loss.sum().backward()
    # d(-r A)/dlogp = -A r where the unclipped branch is active, 0 on clipped tokens
    close(logp.grad, [[-0.5, -0.9, -1.0, -1.1, 0.0], [0.0, 0.9, 1.0, 1.1, 1.5]])


def test_policy_loss_clip_higher_hand():
    logp = _lp([[1.25, 1.3]])
    loss, m = policy_loss(logp, torch.zeros_like(logp), T([1.0]), torch.ones(1, 2), eps_low=0.2, eps_high=0.28)
    # upper bound 1.28: r=1.25 unclipped -> -1.25 ; r=1.3 -> -1.28
    close(loss, [[-1.25, -1.28]])
    close(m["clipfrac_high"], 0.5)
    loss.sum().backward()
    close(logp.grad, [[-1.25, 0.0]])


def test_policy_loss_dual_clip_hand():
    logp = _lp([[0.5, 2.0, 4.0], [0.5, 2.0, 4.0]])
    adv = T([-2.0, 2.0])
    loss, m = policy_loss(logp, torch.zeros_like(logp), adv, torch.ones(2, 3), 0.2, 0.2, delta=3.0)
    # A=-2: PPO loss = 2 * max(r, clip(r)) = [2*.8=1.6, 2*2=4, 2*4=8]; dual cap -c A = 6 -> [1.6, 4, 6]
    # A=+2: -2 * min(r, clip(r)) = [-1.0, -2.4, -2.4] (dual clip never touches A > 0)
    close(loss, [[1.6, 4.0, 6.0], [-1.0, -2.4, -2.4]])
    close(m["clipfrac_delta"], 1 / 6)   # (A<0, r=4 > 3): 1 of 6
    close(m["clipfrac_low"], 1 / 6)    # (A<0, r=0.5)
    close(m["clipfrac_high"], 2 / 6)   # (A>0, r=2 and r=4)
    loss.sum().backward()
    # A=-2: r=.5 clipped -> 0 ; r=2: -A r = 4 ; r=4 dual-capped -> 0.  A=+2: r=.5: -A r = -1 ; others clipped
    close(logp.grad, [[0.0, 4.0, 0.0], [-1.0, 0.0, 0.0]])


def test_policy_loss_mask_garbage_and_on_policy():
    logp = T([[-0.3, float("-inf")], [-0.2, NAN]], requires_grad=True)
    mask = T([[1, 0], [1, 0]]).bool()
    adv = T([2.0, -1.0])
    loss, m = policy_loss(logp, None, adv, mask)   # old_logp None -> ratio 1
    # ratio 1 -> loss = -A on valid tokens, 0 on padding
    close(loss, [[-2.0, 0.0], [1.0, 0.0]])
    close(m["ratio_mean"], 1.0)
    loss.sum().backward()
    close(logp.grad, [[-2.0, 0.0], [1.0, 0.0]])   # -A r, finite zeros on padding


def test_policy_loss_errors():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="delta"):
        policy_loss(x, x, torch.zeros(1), x, delta=1.0)
    with pytest.raises(ValueError, match="valid names"):
        policy_loss(x, x, torch.zeros(1), x, importance_sampling_level="tokens")
    assert RATIO_LEVELS["gspo"] is RATIO_LEVELS["sequence"] is RATIO_LEVELS["sequence_token"]


def test_policy_loss_gspo_hand():
    # seq0: mask [1,1,0], log ratios [ln2, 0, 5 (padding: ignored)] -> mean = ln2/2 -> s0 = sqrt(2) = 1.414214
    # seq1: mask [1,1,1], log ratios [ln2, -ln2, 0] -> mean 0 -> s1 = 1
    logp = T([[LN2, 0.0, 5.0], [LN2, -LN2, 0.0]], requires_grad=True)
    mask = T([[1, 1, 0], [1, 1, 1]]).bool()
    adv = T([-1.0, 1.0])
    loss, m = policy_loss(logp, torch.zeros_like(logp), adv, mask, 0.2, 0.2, importance_sampling_level="sequence")
    s = math.sqrt(2)
    # seq0 A=-1: max(s, clip(s)=1.2) = s on both valid tokens ; seq1 A=+1: -min(1, 1) = -1
    close(loss, [[s, s, 0.0], [-1.0, -1.0, -1.0]])
    close(m["ratio_mean"], (2 * s + 3) / 5)   # 1.165685 (token-weighted)
    close(m["ratio_max"], s)
    close(m["ratio_min"], 1.0)
    close(m["clipfrac_low"], 0.0)
    close(m["clipfrac_high"], 0.0)
    loss.sum().backward()
    # GSPO-token: d/dlogp_t [-A sg(s) exp(logp_t - sg(logp_t))] = -A s at each valid token
    close(logp.grad, [[s, s, 0.0], [-1.0, -1.0, -1.0]])

    # same sequence with A=+1: s = 1.414 > 1.2 is clipped -> loss -1.2 at every token, zero gradient
    logp.grad = None
    loss, m = policy_loss(logp, torch.zeros_like(logp), T([1.0, 1.0]), mask, importance_sampling_level="sequence")
    close(loss[0], [-1.2, -1.2, 0.0])
    close(m["clipfrac_high"], 2 / 5)
    loss.sum().backward()
    close(logp.grad[0], [0.0, 0.0, 0.0])


@pytest.mark.parametrize("mode", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_gspo_equals_grpo_at_ratio_one(mode, dual):
    # With old_logp = logp every token ratio r_t = 1 and every sequence ratio s_i = 1, so both
    # levels give loss -A and d loss_t / d logp_t = -A * 1: identical values and gradients for
    # every aggregation (the first GRPO step after sampling is on-policy).
    g = torch.Generator().manual_seed(0)
    logp0 = torch.randn(5, 7, generator=g, dtype=torch.float64) - 2
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=g) > 0.3
    out = {}
    for level in ["token", "sequence"]:
        lp = logp0.clone().requires_grad_(True)
        loss, _ = policy_loss(lp, lp.detach(), adv, mask, delta=dual, importance_sampling_level=level)
        agg = aggregate_loss(loss, mask, mode, max_completion_length=7)
        agg.backward()
        out[level] = (agg.detach(), lp.grad)
    close(out["token"][0], out["sequence"][0], tol=1e-12)
    close(out["token"][1], out["sequence"][1], tol=1e-12)


# --------------------------------------------------------------------------- grpo_token_loss

def test_grpo_token_loss_hand():
    logp = T([[0.0, -1.0]], requires_grad=True)
    ref = T([[-1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = grpo_token_loss(logp, logp.detach(), ref, T([1.0]), mask, beta=0.1)
    # pg: ratio 1, A=1 -> -1 each. k3: x = ref - logp = [-1, 0] -> [e^-1, 0] = [0.367879, 0]
    # loss = [-1 + 0.1*0.367879, -1] = [-0.963212, -1]; kl_mean = 0.367879 / 2 = 0.183940
    close(loss, [[-1 + 0.1 * math.exp(-1), -1.0]])
    close(m["kl_mean"], math.exp(-1) / 2)
    loss.sum().backward()
    # d/dlogp_0 = -A r + beta (1 - e^(ref-logp)) = -1 + 0.1 * (1 - e^-1) = -0.936788
    close(logp.grad, [[-1 + 0.1 * (1 - math.exp(-1)), -1.0]])


def test_grpo_token_loss_beta_zero_and_no_ref():
    logp = T([[0.0, -1.0]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = grpo_token_loss(logp, None, T([[-1.0, -1.0]]), T([1.0]), mask, beta=0.0)
    close(loss, [[-1.0, -1.0]])                     # no KL term in the loss ...
    close(m["kl_mean"], math.exp(-1) / 2)           # ... but it is still monitored
    loss2, m2 = grpo_token_loss(logp, None, None, T([1.0]), mask, beta=0.1)
    close(loss2, [[-1.0, -1.0]])
    close(m2["kl_mean"], 0.0)


def test_grpo_token_loss_garbage_ref_on_padding():
    logp = T([[-0.5, 0.0]], requires_grad=True)
    ref = T([[-0.5, float("inf")]])
    loss, m = grpo_token_loss(logp, None, ref, T([1.0]), T([[1, 0]]), beta=0.5, kl_estimator="k3")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    close(m["kl_mean"], 0.0)


# --------------------------------------------------------------------------- aggregate_loss

LOSS = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0]]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]   # third sequence empty (its 7.0 is padding garbage)


def test_aggregate_hand():
    loss, mask = T(LOSS), T(MASK).bool()
    # seq means: (1+2+3+4)/4 = 2.5, (5+6)/2 = 5.5, empty excluded -> (2.5 + 5.5) / 2 = 4.0
    close(aggregate_loss(loss, mask, "grpo"), 4.0)
    # token mean: (1+2+3+4+5+6) / 6 = 21/6 = 3.5 ; with a global count of 12 tokens: 21/12 = 1.75
    close(aggregate_loss(loss, mask, "dapo"), 3.5)
    close(aggregate_loss(loss, mask, "dapo", num_tokens=12), 1.75)
    # bnpo (TRL's local token mean) ignores the global count: this call's 6 tokens -> 3.5
    close(aggregate_loss(loss, mask, "bnpo", num_tokens=torch.tensor(12)), 3.5)
    # Dr. GRPO: 21 / (3 sequences * L) ; L = 4 -> 1.75 ; L = 8 -> 0.875
    close(aggregate_loss(loss, mask, "dr_grpo", max_completion_length=4), 1.75)
    close(aggregate_loss(loss, mask, "dr_grpo", max_completion_length=8), 0.875)
    close(aggregate_loss(loss, mask, "dr_grpo", max_completion_length=4, num_rows=6), 0.875)  # 21/24


def test_aggregate_microbatch_split_hand():
    loss, mask = T(LOSS), T(MASK).bool()
    parts = [(loss[:1], mask[:1]), (loss[1:], mask[1:])]
    # token_mean with per-call counts: 10/4 + 11/2 = 8.0 (and their mean 4.0) != 3.5 = full batch ...
    local = sum(aggregate_loss(l, m, "dapo") for l, m in parts)
    close(local, 8.0)
    # ... with the global count 6: 10/6 + 11/6 = 21/6 = 3.5
    close(sum(aggregate_loss(l, m, "dapo", num_tokens=6) for l, m in parts), 3.5)
    # bnpo keeps the per-call counts whatever it is told; the trainer averages it over the
    # micro-batches (LOSS_TYPES["bnpo"].local): (10/4 + 11/2) / 2 = 4.0, as TRL's bnpo
    assert getattr(LOSS_TYPES["bnpo"], "local", False) and not getattr(LOSS_TYPES["dapo"], "local", False)
    close(sum(aggregate_loss(l, m, "bnpo", num_tokens=6) for l, m in parts) / len(parts), 4.0)
    # Dr. GRPO with num_sequences=3 (global), L=4: 10/12 + 11/12 = 1.75
    close(sum(aggregate_loss(l, m, "dr_grpo", num_rows=3, max_completion_length=4) for l, m in parts), 1.75)
    # seq-mean with the global number of non-empty sequences (2): 2.5/2 + 5.5/2 = 4.0
    close(sum(aggregate_loss(l, m, "grpo", num_sequences=2) for l, m in parts), 4.0)


@pytest.mark.parametrize("mode", sorted(LOSS_TYPES))
def test_aggregate_empty_is_zero(mode):
    loss = torch.full((2, 3), NAN)
    out = aggregate_loss(loss, torch.zeros(2, 3, dtype=torch.bool), mode, max_completion_length=3)
    assert out.item() == 0.0


def test_aggregate_errors():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"valid names: \[.bnpo., .dapo., .dr_grpo., .grpo.\]"):
        aggregate_loss(x, x, "mean")
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(x, x, "dr_grpo")


# --------------------------------------------------------------------------- masked_mean

def test_masked_mean_hand():
    x = T([[1.0, 2.0], [3.0, NAN], [5.0, 6.0]])
    mask = T([[1, 0], [1, 0], [0, 0]])
    close(masked_mean(x, mask), 2.0)                  # (1 + 3) / 2
    close(masked_mean(x, mask, dim=-1), [1.0, 3.0, 0.0])   # empty row -> 0, NaN padding ignored


# --------------------------------------------------------------------------- registries and the config

@pytest.mark.parametrize("field, registry", [
    ("scale_rewards", ADVANTAGE_SCALES), ("kl_estimator", KL_ESTIMATORS), ("importance_sampling_level", RATIO_LEVELS),
    ("loss_type", LOSS_TYPES), ("lr_scheduler_type", LR_SCHEDULES),
    ("multi_objective_aggregation", REWARD_AGGREGATIONS)])
def test_config_accepts_exactly_the_registered_names(field, registry, monkeypatch):
    for name in registry:
        # normalize_then_sum already normalises per group: it needs a batch (or no) advantage scale
        extra = {"scale_rewards": "batch"} if field == "multi_objective_aggregation" else {}
        assert getattr(GRPOConfig(**{field: name, **extra}), field) == name
    with pytest.raises(ValueError, match=f"{field}='bogus': choose one of {', '.join(registry.canonical)}"):
        GRPOConfig(**{field: "bogus"})
    # a newly registered variant is configurable at once, without touching grpo/config.py
    monkeypatch.setitem(registry, "bogus", registry[registry.canonical[0]])
    assert getattr(GRPOConfig(**{field: "bogus"}), field) == "bogus"


def test_registry_canonical_names_and_aliases():
    assert KL_ESTIMATORS.canonical == ["k1", "k2", "k3"]
    assert KL_ESTIMATORS.aliases == ["kl", "mse", "low_var_kl"]
    assert RATIO_LEVELS.canonical == ["token", "sequence"]
    assert LOSS_TYPES.canonical == ["grpo", "bnpo", "dapo", "dr_grpo"]
    assert ADVANTAGE_SCALES.canonical == ["group", "batch", "none"]
    assert REWARD_AGGREGATIONS.canonical == ["sum_then_normalize", "normalize_then_sum"]
    assert REWARD_AGGREGATIONS.aliases == ["gdpo"]
    with pytest.raises(ValueError, match="kl_estimator='k4': choose one of k1, k2, k3 .aliases: kl, mse, low_var_kl"):
        GRPOConfig(kl_estimator="k4")


def test_lr_schedules_hand():
    # warm-up 2 of 10 steps: (step + 1) / 3 for steps 0, 1; then progress = (step - 2) / 8
    def at(kind):
        f = lr_lambda(SFTConfig(lr_scheduler_type=kind, warmup_steps=2, max_steps=10))
        return [f(s) for s in (0, 1, 2, 6, 10, 12)]
    close(at("constant"), [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0])
    close(at("linear"), [1 / 3, 2 / 3, 1.0, 0.5, 0.0, 0.0])          # 1 - progress, floored at 0
    close(at("cosine"), [1 / 3, 2 / 3, 1.0, 0.5, 0.0, 0.0])          # (1 + cos(pi * min(1, p))) / 2


# --------------------------------------------------------------------------- reward aggregation (issue 17)
# Two rewards (accuracy, format), weights (1, 0.5), eps 0.
#   group 0  acc [1, 0, 0, 0]       mean 0.25, deviations [.75, -.25, -.25, -.25], sum sq 0.75, var 0.25,
#                                   std 0.5 -> z [1.5, -0.5, -0.5, -0.5]
#            fmt [1, 1, 0, NaN]     valid [1, 1, 0]: mean 2/3, sum sq 2/3, var 1/3, std 0.577350
#                                   -> z [0.577350, 0.577350, -1.154701, NaN]
#   group 1  acc [1, 1, 1, 1]       no spread -> z = 0 exactly
#            fmt [0, 1, NaN, NaN]   mean 0.5, std sqrt(0.5) = 0.707107 -> z [-0.707107, 0.707107, NaN, NaN]
#   group 2  acc [0, NaN, 1, 1]     mean 2/3, std 0.577350 -> z [-1.154701, NaN, 0.577350, 0.577350]
#            fmt [1, NaN, 1, 1]     no spread -> 0 ; sample 1 abstained on both -> combined NaN
AGG = [[[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, NAN]],
       [[1.0, 0.0], [1.0, 1.0], [1.0, NAN], [1.0, NAN]],
       [[0.0, 1.0], [NAN, NAN], [1.0, 1.0], [1.0, 1.0]]]
S3 = 1 / math.sqrt(3)


def test_aggregate_rewards_normalize_then_sum_hand():
    combined, terms = aggregate_rewards(T(AGG), T([1.0, 0.5]), "normalize_then_sum", eps=0.0)
    close(terms[..., 0], [[1.5, -0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0], [-2 * S3, NAN, S3, S3]])
    h = 0.5 * math.sqrt(0.5)  # 0.5 * 0.707107
    close(terms[..., 1], [[0.5 * S3, 0.5 * S3, -S3, NAN], [-h, h, NAN, NAN], [0.0, NAN, 0.0, 0.0]])
    # sum over rewards, abstained terms skipped; all-abstained sample stays NaN
    close(combined, [[1.5 + 0.5 * S3, -0.5 + 0.5 * S3, -0.5 - S3, -0.5], [-h, h, 0.0, 0.0],
                     [-2 * S3, NAN, S3, S3]])
    assert torch.equal(terms[1, :, 0], torch.zeros(4, dtype=torch.float64))   # exactly 0, not 1e-17
    assert REWARD_AGGREGATIONS["gdpo"] is REWARD_AGGREGATIONS["normalize_then_sum"]


def test_aggregate_rewards_sum_then_normalize_is_combine_rewards_hand():
    combined, terms = aggregate_rewards(T(AGG), T([1.0, 0.5]), "sum_then_normalize")
    # group 0: [1 + .5, 0 + .5, 0 + 0, 0 + (NaN skipped)] ; group 2 row 1: both NaN -> NaN
    close(combined[0], [1.5, 0.5, 0.0, 0.0])
    close(combined[2], [0.5, NAN, 1.5, 1.5])
    close(terms[0, :, 1], [0.5, 0.5, 0.0, NAN])
    close(combined.reshape(-1), combine_rewards(T(AGG).reshape(-1, 2), T([1.0, 0.5])))
    with pytest.raises(ValueError, match="valid names.*normalize_then_sum.*sum_then_normalize"):
        aggregate_rewards(T(AGG), T([1.0, 0.5]), "mean")
    with pytest.raises(ValueError, match="rewards .B, G, R."):
        aggregate_rewards(T(AGG)[0], T([1.0, 0.5]))


def test_advantage_contributions_and_shares_hand():
    # group 0 of AGG, sum_then_normalize, group scale, eps 0: combined [1.5, .5, 0, 0], mean .5,
    # centred [1, 0, -.5, -.5], sum sq 1.5, std sqrt(.5) = .707107 -> adv [1.414214, 0, -.707107, -.707107]
    # acc terms [1, 0, 0, 0]: mean .25 -> [.75, -.25, -.25, -.25] / .707107
    # fmt terms [.5, .5, 0, (NaN -> 0)]: mean .25 -> [.25, .25, -.25, -.25] / .707107
    _, terms = aggregate_rewards(T(AGG[:1]), T([1.0, 0.5]))
    c = advantage_contributions(terms, "group", eps=0.0)
    r2 = math.sqrt(0.5)
    close(c[0, :, 0], [0.75 / r2, -0.25 / r2, -0.25 / r2, -0.25 / r2])
    close(c[0, :, 1], [0.25 / r2, 0.25 / r2, -0.25 / r2, -0.25 / r2])
    close(c.sum(-1), group_advantages(aggregate_rewards(T(AGG[:1]), T([1.0, 0.5]))[0], "group", 0.0)[0])
    # shares: acc (.75 + 3 * .25) = 1.5, fmt 4 * .25 = 1.0 (same divisor) -> 1.5 / 2.5 = .6, .4
    close(advantage_shares(c), [0.6, 0.4])
    # a group whose combined reward is flat (1, 1, 1) although each reward varies: the rewards cancel,
    # the advantage is exactly 0, so is every contribution; nothing has an advantage -> shares NaN
    flat = T([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    _, t = aggregate_rewards(flat, T([1.0, 1.0]))
    c = advantage_contributions(t, "batch")
    assert torch.equal(c, torch.zeros_like(c))
    assert torch.isnan(advantage_shares(c)).all()


def test_zero_std_groups_hand():
    r = T([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [NAN, 2.0, NAN], [NAN, NAN, NAN], [3.0, NAN, 3.0]])
    assert zero_std_groups(r).tolist() == [True, False, True, True, True]
    # the same groups group_advantages sets to exactly 0
    adv, _ = group_advantages(r)
    assert ((adv == 0).all(1)).tolist() == [True, False, True, True, True]


def test_select_groups_hand():
    inf = [torch.tensor([True, False, True, False]), torch.tensor([False, True, False, False]),
           torch.tensor([True, True, False, False])]
    # informative in generation order: (0,0), (0,2), (1,1), (2,0), (2,1): the first 4
    assert select_groups(inf, 4) == ([(0, 0), (0, 2), (1, 1), (2, 0)], 0)
    # too few informative: (0,0) then the first uninformative ones (0,1), (0,2), (0,3) fill
    assert select_groups([torch.tensor([True, False, False, False]), torch.zeros(4, dtype=torch.bool)], 4) == \
        ([(0, 0), (0, 1), (0, 2), (0, 3)], 3)
    assert select_groups(inf[:1], 2) == ([(0, 0), (0, 2)], 0)
    with pytest.raises(ValueError, match="3 groups generated, 4 needed"):
        select_groups([torch.ones(3, dtype=torch.bool)], 4)


# --------------------------------------------------------------------------- entropy (issue 17)

def test_entropy_threshold_and_mask_hand():
    ent = T([[0.1, 0.5, 0.3, NAN], [0.9, 0.7, 7.0, 7.0]])
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    valid = torch.where(mask, ent, torch.full_like(ent, NAN))
    # sorted valid [.1, .3, .5, .7, .9]; top 40 % -> the 0.6 quantile: position .6 * 4 = 2.4
    # -> .5 + .4 * (.7 - .5) = .58
    thr = entropy_threshold(valid, 0.4)
    close(thr, 0.58)
    sel = high_entropy_mask(ent, mask, thr)
    assert sel.tolist() == [[False, False, False, False], [True, True, False, False]]   # padding 7.0 never
    close(entropy_threshold(valid, 1.0), 0.1)                 # 1.0: the minimum -> every valid token
    assert high_entropy_mask(ent, mask, entropy_threshold(valid, 1.0)).sum() == 5
    assert entropy_threshold(torch.full((3,), NAN), 0.2).item() == float("inf")
    with pytest.raises(ValueError, match="top_quantile=0"):
        entropy_threshold(valid, 0.0)


def test_token_entropy_top_k_and_gradient_hand():
    # logits z = log [4, 2, 1, 1] -> p = [.5, .25, .125, .125]
    # H = .5 ln2 + .25 ln4 + 2 * .125 ln8 = 1.75 ln2
    # top-2 renormalised [2/3, 1/3]: H2 = ln3 - (2/3) ln2 ; top-1: 0
    # dH/dz_v = -p_v (log p_v + H) = ln2 * [-.375, .0625, .15625, .15625]
    head = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4))
    z = torch.log(torch.tensor([[[4.0, 2.0, 1.0, 1.0]] * 3]))             # (1, 3, 4): 3 equal rows
    ids = torch.zeros(1, 3, dtype=torch.long)
    for k, want in [(2, math.log(3) - 2 / 3 * LN2), (1, 0.0), (9, 1.75 * LN2)]:
        logp, ent, top = token_logprobs_from_hidden(head, z, ids, chunk_size=2, entropy_top_k=k)
        close(ent, [[1.75 * LN2] * 3], tol=1e-5)
        close(top, [[want] * 3], tol=1e-5)
        close(logp, [[math.log(0.5)] * 3], tol=1e-5)
    assert len(token_logprobs_from_hidden(head, z, ids)) == 2           # no top-k: two outputs as before
    hidden = z.clone().requires_grad_(True)
    _, ent = token_logprobs_from_hidden(head, hidden, ids, chunk_size=2, entropy_grad=True)   # checkpointed
    ent.sum().backward()
    close(hidden.grad, [[[LN2 * g for g in (-0.375, 0.0625, 0.15625, 0.15625)]] * 3], tol=1e-5)
    _, ent = token_logprobs_from_hidden(head, z.clone().requires_grad_(True), ids)
    assert not ent.requires_grad                                         # a metric unless asked


def test_grpo_token_loss_pg_mask_and_entropy_bonus_hand():
    logp = T([[0.0, -1.0, -2.0]], requires_grad=True)
    ent = T([[2.0, 3.0, 5.0]], requires_grad=True)
    ref = T([[-1.0, -2.0, 0.0]])
    mask = T([[1, 1, 0]]).bool()
    pg = T([[1, 0, 1]]).bool()
    loss, m = grpo_token_loss(logp, None, ref, T([1.0]), mask, beta=0.1, pg_mask=pg, entropy=ent,
                              entropy_coef=0.1)
    # policy term (ratio 1, A = 1): -1 on token 0 only (token 1 unselected, token 2 padding)
    # KL (k3) on both valid tokens: x = ref - logp = [-1, -1] -> e^-1 each
    # bonus -0.1 * H on selected valid tokens: token 0 -> -0.2
    k = math.exp(-1)
    close(loss, [[-1 + 0.1 * k - 0.2, 0.1 * k, 0.0]])
    close(m["entropy_bonus"], 0.2)                    # 0.1 * mean entropy of the selected tokens (2.0)
    close(m["kl_mean"], k)
    loss.sum().backward()
    close(ent.grad, [[-0.1, 0.0, 0.0]])
    # d/dlogp: token 0: -A + beta (1 - e^-1) ; token 1: beta (1 - e^-1) only
    close(logp.grad, [[-1 + 0.1 * (1 - k), 0.1 * (1 - k), 0.0]])
    with pytest.raises(ValueError, match="entropy_coef"):
        grpo_token_loss(logp, None, None, T([1.0]), mask, entropy_coef=0.1)


# --------------------------------------------------------------------------- issue 17 config fields

def test_config_new_fields_validation_names_field_and_values():
    assert GRPOConfig(multi_objective_aggregation="gdpo", scale_rewards="batch").multi_objective_aggregation == "gdpo"
    cases = [
        (dict(multi_objective_aggregation="mean"), "multi_objective_aggregation='mean': choose one of sum_then_normalize, "
                                          "normalize_then_sum .aliases: gdpo."),
        (dict(multi_objective_aggregation="normalize_then_sum"), "scale_rewards one of batch, none"),
        (dict(max_resample_rounds=-1), "max_resample_rounds=-1: must be >= 0"),
        (dict(top_entropy_quantile=0.0), "top_entropy_quantile=0.0: must be in .0, 1., e.g. 0.2"),
        (dict(top_entropy_quantile=1.5), "top_entropy_quantile=1.5"),
        (dict(entropy_coef=-0.1), "entropy_coef=-0.1: must be >= 0"),
        (dict(entropy_top_k=-1), "entropy_top_k=-1: must be >= 0"),
        (dict(dynamic_sampling=1), "dynamic_sampling=1: expected true or false"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            GRPOConfig(**kw)


def test_dr_grpo_normaliser_is_constant_rows_times_max_length():
    """Dr. GRPO divides by (rows x L_max) whatever the mask holds: an empty row (a truncated
    completion masked out) still counts, so the normaliser does not follow the truncation rate."""
    from grpo.core import aggregate_loss
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])   # row 3: truncated, masked out
    # by hand: (1 + 2 + 5 + 6) / (3 rows * L_max 8) = 14 / 24
    got = aggregate_loss(loss, mask, "dr_grpo", max_completion_length=8)
    assert got.item() == pytest.approx(14 / 24)
    # the global row count of the step, passed per micro-batch: the pieces sum to the whole
    parts = [aggregate_loss(loss[i:i + 1], mask[i:i + 1], "dr_grpo", max_completion_length=8, num_rows=3)
             for i in range(3)]
    assert sum(p.item() for p in parts) == pytest.approx(14 / 24)
    # num_sequences (non-empty rows, 2 here) does not change it
    assert aggregate_loss(loss, mask, "dr_grpo", max_completion_length=8, num_sequences=2).item() \
        == pytest.approx(14 / 24)
