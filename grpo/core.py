"""GRPO algorithm core: every formula of a GRPO step as a pure tensor function.

No model, tokenizer or config object comes in here; the one module argument is the output
projection ``head`` of :func:`token_logprobs_from_hidden`, used as a function of its input.
Each variant of the algorithm is a free function filed under a name in a :class:`Registry`
(``@KL_ESTIMATORS.register("k3", "low_var_kl")``), chosen by that name in ``GRPOConfig``, whose
validation accepts exactly the registered names; never an if-chain (the layout of verl's
``core_algos.py``). An unknown name raises ``ValueError`` listing the valid ones.

Sections, in the order one step uses them:

1. registries           ``Registry``, ``lookup``
2. rewards, advantages  ``combine_rewards``, ``aggregate_rewards``       (``REWARD_AGGREGATIONS``),
                        ``group_advantages``                             (``ADVANTAGE_SCALES``),
                        ``advantage_contributions``, ``advantage_shares``
2b. dynamic sampling    ``zero_std_groups``, ``select_groups``           (DAPO)
3. token log-probs      ``token_logprobs_from_hidden``: chunked log-softmax over the output head
                        (entropy, optionally differentiable; entropy of the top-k tokens)
3b. entropy selection   ``entropy_threshold``, ``high_entropy_mask``     (80/20, arXiv 2506.01939)
4. masked reductions    ``masked_sum``, ``masked_mean``
5. KL estimators        ``kl_penalty``                                    (``KL_ESTIMATORS``)
6. importance ratios    ``importance_ratio``                              (``RATIO_LEVELS``)
7. clipped surrogate    ``clipped_surrogate``, ``policy_loss``, ``grpo_token_loss`` (+ entropy bonus)
8. loss aggregation     ``aggregate_loss``                                (``LOSS_TYPES``)
9. LR schedules         multiplier on the base learning rate               (``LR_SCHEDULES``)

Shapes: B prompts x G completions each = N sequences, T completion tokens, V vocabulary, H hidden
size. ``mask`` ``(N, T)`` is treated as boolean (nonzero = valid completion token). Values at
padded positions may be garbage (even inf/NaN): they are replaced *before* any nonlinearity, so
neither a loss nor its gradient is polluted. NaN in a reward tensor means "abstained" (e.g. a
judge call failed). Metrics are detached 0-dim tensors (no host sync; all-reduce friendly).

Formulas, conventions and references: docs/algorithms.md. GRPO, DeepSeekMath arXiv 2402.03300;
PPO clipping arXiv 1707.06347; DAPO (clip-higher, token-level loss, dynamic sampling) arXiv
2503.14476; Dr. GRPO arXiv 2503.20783; GSPO arXiv 2507.18071; two-sided clip (INTELLECT-2) arXiv 2505.07291; GDPO
(per-reward normalisation) arXiv 2601.05242; high-entropy tokens ("Beyond the 80/20 Rule") arXiv
2506.01939; k1/k2/k3 from J. Schulman, "Approximating KL divergence" (joschu.net/blog/kl-approx.html).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "Registry", "lookup",
    "ADVANTAGE_SCALES", "REWARD_AGGREGATIONS", "KL_ESTIMATORS", "RATIO_LEVELS", "LOSS_TYPES",
    "LR_SCHEDULES",
    "register_advantage_scale", "register_reward_aggregation", "register_kl_estimator", "register_ratio_level",
    "register_loss_type",
    "combine_rewards", "aggregate_rewards", "group_advantages", "advantage_contributions", "advantage_shares",
    "nan_mean_std", "zero_std_groups", "select_groups",
    "token_logprobs_from_hidden", "MAX_CHUNK_LOGITS", "entropy_threshold", "high_entropy_mask",
    "masked_sum", "masked_mean", "kl_penalty", "importance_ratio", "clipped_surrogate", "policy_loss",
    "grpo_token_loss", "aggregate_loss",
]

Number = Union[int, float, Tensor]


# =========================================================================== 1. registries

class Registry(dict):
    """name -> function, filled by the :meth:`register` decorator. ``canonical`` lists the first
    name of each registered function in registration order; the other names are ``aliases``."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what                      # what a name names, for error messages
        self.canonical: list[str] = []

    def register(self, *names: str):
        """``@REGISTRY.register("name", "alias", ...)``: file the function under each name."""
        def deco(fn):
            for n in names:
                self[n] = fn
            if names[0] not in self.canonical:
                self.canonical.append(names[0])
            return fn
        return deco

    @property
    def aliases(self) -> list[str]:
        return [n for n in self if n not in self.canonical]


def lookup(registry: Registry, name: str):
    """``registry[name]``, or ``ValueError`` naming every valid name."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {registry.what} {name!r}; valid names: {sorted(registry)}") from None


# name -> fn(centred (B, G, ...), group_std (B, 1, ...), batch_std (), eps) -> adv, same shape as centred.
# Must be linear in ``centred`` (advantage_contributions relies on it; all registered scales are).
ADVANTAGE_SCALES = Registry("advantage scale")
# name -> fn(rewards (B, G, R), weights (R,), eps) -> terms (B, G, R): the weighted per-reward terms
# whose NaN-aware sum over R is the reward the advantage is computed on; NaN where abstained
REWARD_AGGREGATIONS = Registry("reward aggregation")
# name -> fn(logp (N, T), ref_logp (N, T), clamp) -> kl (N, T)
KL_ESTIMATORS = Registry("KL estimator")
# name -> fn(log_ratio (N, T), logp (N, T), mask (N, T) bool) -> log ratio used per token (N, T)
RATIO_LEVELS = Registry("ratio level")
# name -> fn(loss (N, T), mask (N, T) bool, *, num_tokens, num_sequences, max_completion_length, num_rows) -> ()
LOSS_TYPES = Registry("loss type")
# name -> fn(progress: float, 0 at the end of warm-up, 1 at max_steps) -> multiplier on the base LR
LR_SCHEDULES = Registry("lr scheduler")

register_advantage_scale = ADVANTAGE_SCALES.register    # decorator: @register_advantage_scale("name")
register_reward_aggregation = REWARD_AGGREGATIONS.register
register_kl_estimator = KL_ESTIMATORS.register
register_ratio_level = RATIO_LEVELS.register
register_loss_type = LOSS_TYPES.register


# =========================================================================== 2. rewards, advantages
# NaN = abstained: an abstained sample is left out of its group's mean / std and gets advantage
# exactly 0. Standard deviations are Bessel-corrected (unbiased, divide by n - 1), the
# ``torch.std`` default that TRL's GRPOTrainer and verl's GRPO advantage use. With fewer than two
# valid rewards the std is defined as 0 (such a group gets advantage 0 anyway).

def combine_rewards(rewards: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of several reward functions, NaN-aware.

    Args:
        rewards: ``(N, R)``: N samples x R reward functions, NaN = that function abstained.
        weights: ``(R,)``.

    Returns:
        ``(N,)``: sum over the non-NaN columns of ``w_j * r_j`` (an abstaining reward
        contributes nothing, like TRL's ``nansum``). A row where EVERY column is NaN stays
        NaN, so that :func:`group_advantages` treats the whole sample as abstained and leaves
        it out of its group's baseline, instead of scoring it 0 (which would be a real,
        usually punishing, reward).
    """
    if rewards.dim() != 2 or weights.dim() != 1 or weights.shape[0] != rewards.shape[1]:
        raise ValueError(f"need rewards (N, R) and weights (R,), got {tuple(rewards.shape)} and {tuple(weights.shape)}")
    valid = ~torch.isnan(rewards)                                               # (N, R)
    w = weights.to(rewards.dtype)
    contrib = torch.where(valid, rewards * w, torch.zeros_like(rewards))        # (N, R)
    combined = contrib.sum(dim=1)                                               # (N,)
    return torch.where(valid.any(dim=1), combined, torch.full_like(combined, float("nan")))


@register_advantage_scale("group")
def _scale_group(centred: Tensor, group_std: Tensor, batch_std: Tensor, eps: float) -> Tensor:
    # Paper GRPO: A_i = (r_i - mean(r)) / std(r) within the group (DeepSeekMath arXiv 2402.03300, Sec. 4.1.2)
    return centred / (group_std + eps)


@register_advantage_scale("batch")
def _scale_batch(centred: Tensor, group_std: Tensor, batch_std: Tensor, eps: float) -> Tensor:
    # Group mean baseline, batch-wide std (TRL scale_rewards="batch"; REINFORCE++-baseline, arXiv 2501.03262)
    return centred / (batch_std + eps)


@register_advantage_scale("none")
def _scale_none(centred: Tensor, group_std: Tensor, batch_std: Tensor, eps: float) -> Tensor:
    # Dr. GRPO drops std scaling (question-level difficulty bias), arXiv 2503.20783
    return centred


def _nan_std(x: Tensor, valid: Tensor, dim=None, keepdim=False) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, unbiased std and count over entries where ``valid``; std := 0 when count < 2."""
    xz = torch.where(valid, x, torch.zeros_like(x))
    n = valid.sum(dim=dim, keepdim=keepdim).to(x.dtype) if dim is not None else valid.sum().to(x.dtype)
    s = xz.sum(dim=dim, keepdim=keepdim) if dim is not None else xz.sum()
    mean = s / n.clamp(min=1)
    dev = torch.where(valid, x - mean, torch.zeros_like(x))
    ss = (dev * dev).sum(dim=dim, keepdim=keepdim) if dim is not None else (dev * dev).sum()
    std = torch.where(n > 1, (ss / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(ss))
    return mean, std, n


def _no_spread(x: Tensor, valid: Tensor, dim: int) -> Tensor:
    """True (kept dim) where the valid entries of ``x`` along ``dim`` are all equal, or fewer than
    two. Compares max and min, not the std: (r - mean) can be ~1e-9 instead of 0 in floating point."""
    big = torch.finfo(x.dtype).max
    hi = torch.where(valid, x, torch.full_like(x, -big)).amax(dim=dim, keepdim=True)
    lo = torch.where(valid, x, torch.full_like(x, big)).amin(dim=dim, keepdim=True)
    return (hi <= lo) | (valid.sum(dim=dim, keepdim=True) < 2)


def nan_mean_std(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and unbiased std over the non-NaN entries of ``x`` (any shape) -> two 0-dim tensors.
    The std is 0 with fewer than two entries, the mean 0 with none."""
    mean, std, _ = _nan_std(x, ~torch.isnan(x))
    return mean, std


def zero_std_groups(rewards: Tensor) -> Tensor:
    """Groups without learning signal.

    Args:
        rewards: ``(B, G)``, the reward the advantage is computed on (``aggregate_rewards``'s
            ``combined``); NaN = abstained.

    Returns:
        ``(B,)`` bool, True where the group's valid rewards are all equal or fewer than two: the
        groups :func:`group_advantages` gives advantage exactly 0 and DAPO's dynamic sampling drops.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, G), got shape {tuple(rewards.shape)}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    return _no_spread(r, ~torch.isnan(r), dim=1).squeeze(1)


@register_reward_aggregation("sum_then_normalize")
def _agg_sum_then_normalize(rewards: Tensor, weights: Tensor, eps: float) -> Tensor:
    # GRPO as published (and TRL's default): the weighted raw rewards; group_advantages normalises their sum.
    return rewards * weights.to(rewards.dtype)


@register_reward_aggregation("normalize_then_sum", "gdpo")
def _agg_normalize_then_sum(rewards: Tensor, weights: Tensor, eps: float) -> Tensor:
    # GDPO (arXiv 2601.05242; TRL multi_objective_aggregation="normalize_then_sum"): each reward is
    # z-scored within its group over its own non-abstained entries, then weighted. A reward without
    # spread in a group (or with < 2 entries) contributes exactly 0 there.
    valid = ~torch.isnan(rewards)                                               # (B, G, R)
    mean, std, _ = _nan_std(rewards, valid, dim=1, keepdim=True)                # (B, 1, R)
    z = (torch.where(valid, rewards, mean) - mean) / (std + eps)                # (B, G, R)
    z = torch.where(_no_spread(rewards, valid, dim=1), torch.zeros_like(z), z)
    z = torch.where(valid, z, torch.full_like(z, float("nan")))
    return z * weights.to(rewards.dtype)


_agg_normalize_then_sum.normalizes_within_group = True  # config: the advantage must not re-normalise per group


@torch.no_grad()
def aggregate_rewards(rewards: Tensor, weights: Tensor, mode: str = "sum_then_normalize",
                      eps: float = 1e-4) -> Tuple[Tensor, Tensor]:
    """Several rewards -> the one reward per sample that advantages are computed on.

    Args:
        rewards: ``(B, G, R)``: B groups x G samples x R reward functions, NaN = abstained.
        weights: ``(R,)``.
        mode: name in ``REWARD_AGGREGATIONS``: "sum_then_normalize" (weighted sum of the raw
            rewards, :func:`combine_rewards`) or "normalize_then_sum" (alias "gdpo": each reward
            z-scored within its group first, ``(r - mean) / (std + eps)``, unbiased std).
        eps: the z-score's ``eps`` (normalize_then_sum).

    Returns:
        combined: ``(B, G)``, the NaN-aware sum over R of ``terms``; NaN where every reward abstained.
        terms: ``(B, G, R)``, each reward's weighted term (NaN where it abstained), for
            :func:`advantage_contributions`.
    """
    if rewards.dim() != 3 or weights.dim() != 1 or weights.shape[0] != rewards.shape[2]:
        raise ValueError(f"need rewards (B, G, R) and weights (R,), got {tuple(rewards.shape)} and {tuple(weights.shape)}")
    fn = lookup(REWARD_AGGREGATIONS, mode)
    r = rewards if rewards.is_floating_point() else rewards.float()
    terms = fn(r, weights, eps)                                                 # (B, G, R)
    valid = ~torch.isnan(terms)
    combined = torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)       # (B, G)
    return torch.where(valid.any(-1), combined, torch.full_like(combined, float("nan"))), terms


@torch.no_grad()
def group_advantages(rewards: Tensor, scale: str = "group", eps: float = 1e-4) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Group-relative advantages.

    Args:
        rewards: ``(B, G)`` float, B prompts x G completions each; NaN = abstained.
        scale: name in ``ADVANTAGE_SCALES``: "group" (paper GRPO), "batch" (TRL
            scale_rewards="batch"), "none" (Dr. GRPO).
        eps: added to the std before dividing.

    Returns:
        adv: ``(B, G)``, same dtype as ``rewards``. 0 for NaN rewards; exactly 0 for every
            member of a group whose valid rewards are all equal (incl. 0 or 1 valid entries).
        metrics: ``frac_zero_std_groups`` (fraction of groups with no reward spread, i.e.
            no learning signal), ``reward_mean`` / ``reward_std`` (over all valid rewards,
            unbiased std), ``abstain_frac`` (fraction of NaN rewards).
    """
    fn = lookup(ADVANTAGE_SCALES, scale)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, G), got shape {tuple(rewards.shape)}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    valid = ~torch.isnan(r)                                     # (B, G)
    mean_g, std_g, n_g = _nan_std(r, valid, dim=1, keepdim=True)  # (B, 1) each
    mean_b, std_b, _ = _nan_std(r, valid)                       # () each
    centred = torch.where(valid, r - mean_g, torch.zeros_like(r))  # (B, G)
    adv = fn(centred, std_g, std_b, eps)                         # (B, G)
    # A group without spread must give exactly 0: (r - mean) can be ~1e-9 instead of 0 in floating point.
    flat = _no_spread(r, valid, dim=1)                           # (B, 1)
    adv = torch.where(valid & ~flat, adv, torch.zeros_like(adv))
    metrics = {
        "frac_zero_std_groups": flat.float().mean(),
        "reward_mean": mean_b.float(),
        "reward_std": std_b.float(),
        "abstain_frac": (~valid).float().mean(),
    }
    return adv, metrics


@torch.no_grad()
def advantage_contributions(terms: Tensor, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """How much of each sample's advantage each reward contributes.

    Args:
        terms: ``(B, G, R)`` per-reward terms of :func:`aggregate_rewards` (NaN = abstained).
        scale, eps: as in :func:`group_advantages`.

    Returns:
        ``(B, G, R)``: the centring and the scaling of :func:`group_advantages` applied to each
        reward's term separately (both are linear), so that ``sum over R`` equals
        ``group_advantages(combined, scale, eps)`` with ``combined`` the NaN-aware sum of ``terms``.
        An abstained term counts 0; samples where every reward abstained and groups without
        spread get 0 for every reward (their advantage is exactly 0).
    """
    if terms.dim() != 3:
        raise ValueError(f"terms must be (B, G, R), got shape {tuple(terms.shape)}")
    fn = lookup(ADVANTAGE_SCALES, scale)
    t = terms if terms.is_floating_point() else terms.float()
    valid = ~torch.isnan(t)                                                     # (B, G, R)
    row = valid.any(-1)                                                         # (B, G): has a combined reward
    t = torch.where(valid & row.unsqueeze(-1), t, torch.zeros_like(t))          # (B, G, R)
    combined = torch.where(row, t.sum(-1), torch.full_like(row, float("nan"), dtype=t.dtype))  # (B, G)
    n = row.sum(1, keepdim=True).clamp(min=1).to(t.dtype).unsqueeze(-1)         # (B, 1, 1)
    centred = torch.where(row.unsqueeze(-1), t - t.sum(1, keepdim=True) / n, torch.zeros_like(t))
    _, std_g, _ = _nan_std(combined, row, dim=1, keepdim=True)                  # (B, 1)
    _, std_b, _ = _nan_std(combined, row)                                       # ()
    contrib = fn(centred, std_g.unsqueeze(-1), std_b, eps)                      # (B, G, R)
    keep = row & ~_no_spread(combined, row, dim=1)                              # (B, G)
    return torch.where(keep.unsqueeze(-1), contrib, torch.zeros_like(contrib))


def advantage_shares(contributions: Tensor) -> Tensor:
    """``(..., R)`` contributions (:func:`advantage_contributions`) -> ``(R,)``: each reward's
    share of the total absolute advantage, ``sum_samples |c_r| / sum_{samples, r'} |c_r'|``
    (sums to 1); NaN when no sample has an advantage."""
    per_reward = contributions.abs().reshape(-1, contributions.shape[-1]).sum(0)  # (R,)
    total = per_reward.sum()
    return torch.where(total > 0, per_reward / total.clamp(min=torch.finfo(per_reward.dtype).tiny),
                       torch.full_like(per_reward, float("nan")))


# =========================================================================== 2b. dynamic sampling
# DAPO (arXiv 2503.14476, Sec. 3.2): groups whose rewards all agree give zero advantage, hence no
# gradient, and shrink the effective batch. They are dropped and more prompts are sampled until the
# batch holds the configured number of informative groups (the trainer's loop, which keeps the ranks
# in step, is grpo.rollout.sample_informative_groups; the choice of groups is this function).

def select_groups(informative: Sequence[Tensor], needed: int) -> Tuple[List[Tuple[int, int]], int]:
    """The groups of a dynamic-sampling batch.

    Args:
        informative: one ``(B_a,)`` bool tensor per generation attempt, in the order generated
            (attempt 0 = the round's own prompts); True = the group has reward spread
            (``~zero_std_groups``).
        needed: how many groups the batch holds (B).

    Returns:
        picks: ``needed`` pairs ``(attempt, group)``, sorted in generation order: the first
            ``needed`` informative groups; if there are fewer, the first uninformative groups fill
            the rest (their advantage is 0: they keep the batch size without adding signal).
        filled: how many uninformative groups were used.
    """
    flags = [(a, g, bool(f)) for a, inf in enumerate(informative) for g, f in enumerate(inf.tolist())]
    if len(flags) < needed:
        raise ValueError(f"{len(flags)} groups generated, {needed} needed")
    good = [(a, g) for a, g, f in flags if f][:needed]
    filler = [(a, g) for a, g, f in flags if not f][:needed - len(good)]
    return sorted(good + filler), len(filler)


# =========================================================================== 3. token log-probs
# A forward pass gives hidden states; only the T positions that predict completion tokens matter.
# Their logits (N, T, V) would be 2.4 GB in fp32 for N = 16, T = 192 at Qwen's V = 151,936, and a
# log-softmax over them another 2.4 GB. Here the output projection runs over chunks of rows; each
# chunk keeps only the chosen token's log-prob and the row's entropy, and under autograd each chunk
# is checkpointed, so the backward pass recomputes one chunk's logits at a time. Peak memory for
# the head is then O(chunk_size x V) instead of O(N x T x V).

MAX_CHUNK_LOGITS = 2 ** 26  # logits per chunk (256 MiB in fp32)


def _out_features(head: nn.Module) -> int:
    size = getattr(head, "out_features", None)
    return int(size) if size else 1


def _head_chunk(head: nn.Module, hidden: Tensor, ids: Tensor, temperature: float, entropy_grad: bool = False,
                top_k: int = 0):
    """hidden (R, H), ids (R,) -> (log-prob of ids (R,), entropy (R,)[, top-k entropy (R,)]), logits
    scaled by 1/temperature.

    Without ``entropy_grad`` at most two (R, V) buffers live at once (the logits and one work
    buffer: logsumexp's, then the entropy's, filled in place), so the head's peak stays about
    2 x R x V x 4 bytes; with it, autograd keeps the probabilities too."""
    logits = head(hidden).float()                                        # (R, V)
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)                                # (R,)
    logp = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse        # (R,)
    if entropy_grad:  # the entropy bonus differentiates H = lse - sum_v p_v z_v
        entropy = lse - ((logits - lse.unsqueeze(-1)).exp() * logits).sum(-1)
    else:
        with torch.no_grad():  # a metric: no gradient, computed in place
            plogp = (logits - lse.unsqueeze(-1)).exp_().mul_(logits)     # p * logit, in place
            entropy = lse - plogp.sum(-1)
    if not top_k:
        return logp, entropy
    with torch.no_grad():  # entropy of the k most likely tokens' distribution, renormalised
        top = logits.detach().topk(min(top_k, logits.shape[-1]), dim=-1).values   # (R, k)
        lse_k = torch.logsumexp(top, dim=-1)
        top_entropy = lse_k - ((top - lse_k.unsqueeze(-1)).exp() * top).sum(-1)
    return logp, entropy, top_entropy


def head_chunk_rows(head: nn.Module, chunk_size: int) -> int:
    """Rows the output head projects at once: ``chunk_size``, capped at ``MAX_CHUNK_LOGITS`` logits."""
    return max(1, min(chunk_size, MAX_CHUNK_LOGITS // _out_features(head)))


def token_logprobs_from_hidden(head: nn.Module, hidden: Tensor, ids: Tensor, temperature: float = 1.0,
                               chunk_size: int = 1024, *, entropy_grad: bool = False,
                               entropy_top_k: int = 0, min_head_calls: int = 0) -> Tuple[Tensor, ...]:
    """Selective log-softmax through the output head, chunked: log-probs of the chosen tokens.

    Args:
        head: the output projection ``(..., H) -> (..., V)`` (e.g. ``nn.Linear(H, V)``).
        hidden: ``(N, T, H)``; position t predicts ``ids[:, t]``.
        ids: ``(N, T)`` token ids.
        temperature: logits are divided by it first (use the sampling temperature, so the log-probs
            are those of the distribution the completions were sampled from).
        chunk_size: rows (token positions) projected at once; never more than ``MAX_CHUNK_LOGITS``
            logits at a time. With grad enabled each chunk is checkpointed.
        entropy_grad: make ``entropy`` differentiable (for an entropy bonus in the loss).
        entropy_top_k: k > 0 also returns the entropy of the k most likely tokens' distribution,
            renormalised over them (a tail-insensitive entropy; no gradient).
        min_head_calls: call the head at least this often, forward and backward, padding with
            chunks of one row whose outputs enter the result times 0. Under ZeRO-3 every call of
            the head gathers its partitioned weight, a collective, so all ranks must call it
            equally often however many rows each has (``CompletionLogProbs`` passes the
            ranks' maximum); the values are unchanged. The padding hangs on ``logp``: a loss
            must use the log-probs (GRPO's and SFT's do) for the backward to call it too.

    Returns:
        logp: ``(N, T)`` fp32, ``log_softmax(head(hidden) / temperature)[..., ids]``; differentiable
            w.r.t. ``hidden`` and the head's parameters.
        entropy: ``(N, T)`` fp32, entropy of ``softmax(head(hidden) / temperature)`` (gradient only
            with ``entropy_grad``).
        top_k_entropy: ``(N, T)`` fp32, only when ``entropy_top_k > 0``:
            ``H(softmax(topk_k(z)))`` with z the scaled logits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    if entropy_top_k < 0:
        raise ValueError(f"entropy_top_k={entropy_top_k}: must be >= 0 (0 = off)")
    n, t, h = hidden.shape
    flat_h, flat_ids = hidden.reshape(n * t, h), ids.reshape(n * t)
    # Bound the logits of one chunk, whatever the vocabulary: at Qwen's 151,936 rows a 1,024-row
    # chunk alone is 622 MB of fp32 logits, and its backward holds several such buffers.
    chunk_size = head_chunk_rows(head, chunk_size)

    def chunk(hs, ix):
        if torch.is_grad_enabled() and hs.requires_grad:
            return checkpoint(_head_chunk, head, hs, ix, temperature, entropy_grad, entropy_top_k, use_reentrant=False)
        return _head_chunk(head, hs, ix, temperature, entropy_grad, entropy_top_k)
    outs = [chunk(flat_h[s:s + chunk_size], flat_ids[s:s + chunk_size]) for s in range(0, n * t, chunk_size)]
    # padding calls (collective symmetry, see min_head_calls): a real row again (a zero row when
    # there is none), its log-prob x 0 in the result when a backward follows, so they run there too
    row_h, row_ids = (flat_h[:1], flat_ids[:1]) if n * t else (hidden.new_zeros(1, h), ids.new_zeros(1))
    pads = [chunk(row_h, row_ids)[0].sum() * 0 for _ in range(min_head_calls - len(outs))]
    k = 3 if entropy_top_k else 2
    if not outs:
        empty = hidden.new_zeros(n, t, dtype=torch.float32)
        return (empty,) * k
    logp = torch.cat([o[0] for o in outs]).view(n, t)
    if pads and logp.requires_grad:  # no backward, no need: the forward calls have been made
        logp = logp + sum(pads)
    return (logp,) + tuple(torch.cat([o[i] for o in outs]).view(n, t) for i in range(1, k))


# =========================================================================== 3b. entropy selection
# "Beyond the 80/20 Rule" (arXiv 2506.01939): a minority of high-entropy "forking" tokens carries
# the useful policy gradient; restricting the gradient to the top 20 % by entropy matched or beat
# full-token training. TRL's ``top_entropy_quantile``: the threshold is a quantile over the
# non-padded tokens of the batch, and tokens with entropy >= it keep their policy gradient.

def entropy_threshold(entropies: Tensor, top_quantile: float) -> Tensor:
    """The entropy at or above which a token is in the top ``top_quantile`` fraction.

    Args:
        entropies: any shape, the entropies of the batch's valid tokens (gather them over ranks
            first); NaN entries are ignored (use NaN for padding).
        top_quantile: in (0, 1]; 1.0 keeps every token, 0.2 the top 20 %.

    Returns:
        0-dim tensor: the ``1 - top_quantile`` quantile, linearly interpolated between order
        statistics (``torch.quantile``'s default, as TRL computes it); +inf when no entry is valid.
    """
    if not 0 < top_quantile <= 1:
        raise ValueError(f"top_quantile={top_quantile}: must be in (0, 1]")
    x = entropies.reshape(-1)
    x = x[~torch.isnan(x)]
    if x.numel() == 0:
        return torch.tensor(float("inf"), dtype=entropies.dtype, device=entropies.device)
    xs = x.sort().values                                                 # ascending
    pos = (1.0 - top_quantile) * (x.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, x.numel() - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def high_entropy_mask(entropy: Tensor, mask: Tensor, threshold: Number) -> Tensor:
    """``(N, T)`` bool: valid tokens (``mask``) whose ``entropy`` is >= ``threshold``; padding
    (any value, even NaN) is never selected."""
    m = mask.bool()
    return m & (torch.where(m, entropy, torch.full_like(entropy, -float("inf"))) >= threshold)


# =========================================================================== 4. masked reductions

def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Sum of ``x`` where ``mask`` (broadcastable) is nonzero; masked entries may be NaN/inf."""
    xz = torch.where(mask.bool(), x, torch.zeros_like(x))
    return xz.sum() if dim is None else xz.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is nonzero; 0 (not NaN) where nothing is valid.

    ``x`` and ``mask`` have the same shape, e.g. ``(N, T)``; ``dim=None`` -> scalar,
    ``dim=-1`` -> ``(N,)``.
    """
    m = mask.bool()
    cnt = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / cnt.clamp(min=1).to(x.dtype)


def _masked_min_max(x: Tensor, m: Tensor) -> Tuple[Tensor, Tensor]:
    inf = torch.full_like(x, float("inf"))
    lo = torch.where(m, x, inf).amin()
    hi = torch.where(m, x, -inf).amax()
    one = torch.ones_like(lo)
    # no valid token: report the neutral ratio 1 instead of +-inf
    return torch.where(torch.isfinite(lo), lo, one), torch.where(torch.isfinite(hi), hi, one)


# =========================================================================== 5. KL estimators
# Estimators of KL(pi_theta || pi_ref) from samples y ~ pi_theta, with log r = ref_logp - logp
# (Schulman, "Approximating KL divergence"). All three are per token.

@register_kl_estimator("k1", "kl")
def _kl_k1(logp: Tensor, ref_logp: Tensor, clamp: Optional[float]) -> Tensor:
    # k1 = -log r = logp - ref_logp: unbiased, high variance, can be negative.
    return logp - ref_logp


@register_kl_estimator("k2", "mse")
def _kl_k2(logp: Tensor, ref_logp: Tensor, clamp: Optional[float]) -> Tensor:
    # k2 = (log r)^2 / 2: biased, low variance, >= 0.
    d = logp - ref_logp
    return 0.5 * d * d


@register_kl_estimator("k3", "low_var_kl")
def _kl_k3(logp: Tensor, ref_logp: Tensor, clamp: Optional[float]) -> Tensor:
    # k3 = r - 1 - log r: unbiased, low variance, >= 0; the estimator of DeepSeekMath eq. (4).
    x = ref_logp - logp
    if clamp is not None:
        # exp(x) overflows fp32 for x > ~88 (and bf16/fp16 much earlier): clamp the log-ratio
        # before exponentiating. Beyond the clamp the penalty is constant (zero gradient).
        x = x.clamp(-clamp, clamp)
    return torch.expm1(x) - x  # expm1 keeps precision near x = 0, where k3 ~ x^2/2


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3", clamp: Optional[float] = 10.0) -> Tensor:
    """Per-token KL estimate between the policy and the reference policy.

    Args:
        logp: ``(N, T)`` log pi_theta(y_t | ...) of the sampled tokens.
        ref_logp: ``(N, T)`` log pi_ref of the same tokens.
        estimator: name in ``KL_ESTIMATORS``: "k1" (alias "kl"), "k2" ("mse"),
            "k3" ("low_var_kl").
        clamp: k3 only: the log-ratio ``ref_logp - logp`` is clamped to ``[-clamp, clamp]``
            before ``exp`` (overflow guard); ``None`` disables. k1 / k2 have no exp and are
            left untouched.

    Returns:
        kl: ``(N, T)``, computed at every position (mask it yourself).
    """
    return lookup(KL_ESTIMATORS, estimator)(logp, ref_logp, clamp)


# =========================================================================== 6. importance ratios

@register_ratio_level("token")
def _log_ratio_token(log_ratio: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    # GRPO / PPO: one importance ratio per token, r_t = pi(y_t) / pi_old(y_t).
    return log_ratio


@register_ratio_level("sequence", "sequence_token", "gspo")
def _log_ratio_sequence(log_ratio: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    # GSPO-token (arXiv 2507.18071): value s_i = exp(mean_t log r_{i,t}) (length-normalised
    # sequence ratio) at every token; gradient as  s_i(θ)_t = sg[s_i] * pi(y_t) / sg[pi(y_t)], i.e.
    # d log s_{i,t} / d logp_{i,t'} = 1[t = t'].
    n = mask.sum(-1, keepdim=True).clamp(min=1).to(log_ratio.dtype)     # (N, 1)
    seq = (log_ratio.sum(-1, keepdim=True) / n).detach()                 # (N, 1); log_ratio is 0 off-mask
    lp = torch.where(mask, logp, torch.zeros_like(logp))                 # (N, T)
    return torch.where(mask, seq + (lp - lp.detach()), torch.zeros_like(lp))


def importance_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """Importance ratio pi_theta / pi_old per token.

    Args:
        logp: ``(N, T)`` current policy (requires grad); old_logp: ``(N, T)`` sampling policy.
        mask: ``(N, T)`` bool, valid completion tokens.
        level: name in ``RATIO_LEVELS``: "token" (GRPO): ``exp(logp_t - old_logp_t)``;
            "sequence" (GSPO-token; aliases "sequence_token", "gspo"): value
            ``s_i = exp(mean_{valid t}(logp - old_logp))`` at every token of sequence i, gradient
            that of ``sg[s_i] * exp(logp_t - sg[logp_t])``.

    Returns:
        ratio: ``(N, T)``, 1 at masked positions.
    """
    level_fn = lookup(RATIO_LEVELS, level)
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp))   # (N, T)
    return torch.exp(level_fn(log_ratio, logp, mask))                         # (N, T)


# =========================================================================== 7. clipped surrogate

def clipped_surrogate(
    ratio: Tensor,
    adv: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: Optional[float] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """PPO's clipped surrogate loss per token, with DAPO's asymmetric clip and the two-sided clip.

    ``loss_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)``; with ``delta`` the unclipped
    term uses ``min(r_t, delta)`` (two-sided GRPO, INTELLECT-2 arXiv 2505.07291; TRL's ``delta``).
    For ``delta > 1 + eps_high`` this is dual-clip PPO (arXiv 1912.09729; verl's ``clip_ratio_c``):
    for ``A < 0`` the loss is capped at ``delta |A|``, and nothing changes for ``A > 0``.

    Args:
        ratio: ``(N, T)`` importance ratio (:func:`importance_ratio`).
        adv: ``(N,)`` per-sequence advantage (``(N, T)`` per-token also accepted); its dtype is
            that of the loss and metrics.
        mask: ``(N, T)`` bool, valid completion tokens.
        eps_low, eps_high: clip range; ``eps_high > eps_low`` is DAPO's clip-higher.
        delta: ``> 1`` or ``None``.

    Returns:
        per_token_loss: ``(N, T)``, 0 at masked positions.
        metrics (means over valid tokens): ``clipfrac_low`` (A < 0 and r < 1 - eps_low),
        ``clipfrac_high`` (A > 0 and r > 1 + eps_high), ``clipfrac_delta`` (A < 0 and r > delta,
        the cap active; only when ``delta``), ``ratio_mean`` / ``ratio_min`` / ``ratio_max`` (1 when no
        token is valid).
    """
    m = mask
    a = adv.unsqueeze(-1) if adv.dim() == 1 else adv                          # (N, 1) or (N, T)
    f = a.dtype
    neg = a < 0                                                               # (N, 1) or (N, T)
    metrics: Dict[str, Tensor] = {}
    capped = ratio if delta is None else ratio.clamp(max=delta)               # (N, T)
    if delta is not None:
        metrics["clipfrac_delta"] = masked_mean((neg & (ratio.detach() > delta)).to(f), m).detach()
    surr = capped * a                                                         # (N, T)
    surr_clip = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a                # (N, T)
    obj = torch.min(surr, surr_clip)                                          # pessimistic bound (PPO)
    loss = torch.where(m, -obj, torch.zeros_like(obj))                        # (N, T)

    with torch.no_grad():
        r = ratio.detach()
        metrics["clipfrac_low"] = masked_mean((neg & (r < 1.0 - eps_low)).to(f), m)
        metrics["clipfrac_high"] = masked_mean(((a > 0) & (r > 1.0 + eps_high)).to(f), m)
        metrics["ratio_mean"] = masked_mean(r, m)
        metrics["ratio_min"], metrics["ratio_max"] = _masked_min_max(r, m)
    return loss, metrics


def policy_loss(
    logp: Tensor,
    old_logp: Optional[Tensor],
    adv: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: Optional[float] = None,
    importance_sampling_level: str = "token",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped surrogate loss per token (PPO / GRPO / DAPO / GSPO): :func:`importance_ratio`
    then :func:`clipped_surrogate`.

    Args:
        logp: ``(N, T)`` log-probs under the current policy (requires grad).
        old_logp: ``(N, T)`` log-probs under the sampling policy; ``None`` = on-policy
            (``logp.detach()``, ratio 1).
        adv: ``(N,)`` per-sequence advantage (``(N, T)`` per-token also accepted).
        mask: ``(N, T)`` valid completion tokens.
        eps_low, eps_high, delta: as in :func:`clipped_surrogate`.
        importance_sampling_level: name in ``RATIO_LEVELS`` (:func:`importance_ratio`); at sequence level the
            ratio metrics are those of the sequence ratio s_i, each token counting once.

    Returns:
        per_token_loss ``(N, T)`` (0 at masked positions) and the metrics of
        :func:`clipped_surrogate`.
    """
    if delta is not None and not delta > 1.0:
        raise ValueError(f"delta must be > 1 (or None), got {delta}")
    m = mask.bool()                                                           # (N, T)
    if old_logp is None:
        old_logp = logp.detach()
    ratio = importance_ratio(logp, old_logp, m, importance_sampling_level)    # (N, T)
    return clipped_surrogate(ratio, adv.to(logp.dtype), m, eps_low, eps_high, delta)


def grpo_token_loss(
    logp: Tensor,
    old_logp: Optional[Tensor],
    ref_logp: Optional[Tensor],
    adv: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: Optional[float] = None,
    importance_sampling_level: str = "token",
    kl_estimator: str = "k3",
    kl_clamp: Optional[float] = 10.0,
    pg_mask: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    entropy_coef: float = 0.0,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """GRPO per-token loss: :func:`policy_loss` + ``beta * KL`` (DeepSeekMath eq. 3), optionally
    restricted to high-entropy tokens and with an entropy bonus.

    Shapes as in :func:`policy_loss`; ``ref_logp`` ``(N, T)`` or ``None``. The KL term is
    added when ``beta > 0`` and ``ref_logp`` is given. ``kl_mean`` (mean over valid tokens,
    detached) is reported whenever ``ref_logp`` is given, even with ``beta == 0``; it is 0
    when ``ref_logp`` is ``None``.

    Args (besides those of :func:`policy_loss` and the KL):
        pg_mask: ``(N, T)`` bool or None: the tokens that keep their policy-gradient term (e.g.
            :func:`high_entropy_mask`, arXiv 2506.01939); the others keep only the KL term. They
            still count in the aggregation's denominator (as in TRL's ``top_entropy_quantile``).
        entropy: ``(N, T)`` differentiable per-token entropy (required when ``entropy_coef != 0``).
        entropy_coef: c >= 0 subtracts ``c * H_t`` at the tokens that receive the policy gradient
            (all valid tokens, or ``pg_mask``): an entropy bonus, aggregated like the rest of the loss.

    Returns ``(per_token_loss (N, T), metrics)`` with the metrics of :func:`policy_loss`
    plus ``kl_mean``, and ``entropy_bonus`` (``c`` x mean entropy of those tokens) when
    ``entropy_coef != 0``.
    """
    loss, metrics = policy_loss(logp, old_logp, adv, mask, eps_low, eps_high, delta, importance_sampling_level)
    m = mask.bool()
    zero = torch.zeros_like(logp)
    pg = m if pg_mask is None else m & pg_mask.bool()                        # (N, T)
    if pg_mask is not None:
        loss = torch.where(pg, loss, zero)
    if ref_logp is None:
        metrics["kl_mean"] = torch.zeros((), dtype=logp.dtype, device=logp.device)
    else:
        lp = torch.where(m, logp, zero)                                       # sanitise before exp
        rp = torch.where(m, ref_logp.to(logp.dtype), zero)
        if beta > 0:
            kl = torch.where(m, kl_penalty(lp, rp, kl_estimator, kl_clamp), zero)  # (N, T)
            loss = loss + beta * kl
        else:
            with torch.no_grad():
                kl = torch.where(m, kl_penalty(lp, rp, kl_estimator, kl_clamp), zero)
        metrics["kl_mean"] = masked_mean(kl.detach(), m)
    if entropy_coef:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs the per-token entropy (entropy=...)")
        ent = torch.where(pg, entropy.to(logp.dtype), zero)                  # (N, T)
        loss = loss - entropy_coef * ent
        metrics["entropy_bonus"] = (entropy_coef * masked_mean(ent.detach(), pg))
    return loss, metrics


# =========================================================================== 8. loss aggregation

def _count(x: Optional[Number], default: Tensor, like: Tensor) -> Tensor:
    """Denominator as a tensor, clamped to >= 1 (an empty batch gives loss 0, not NaN)."""
    v = default if x is None else torch.as_tensor(x, device=like.device)
    return v.to(like.dtype).clamp(min=1)


@register_loss_type("grpo")
def _agg_seq_mean_token_mean(loss, m, *, num_tokens=None, num_sequences=None, max_completion_length=None, num_rows=None):
    # Paper GRPO (DeepSeekMath eq. 3): 1/G sum_i 1/|o_i| sum_t. Empty sequences are skipped.
    tok = m.sum(-1)                                                           # (N,)
    per_seq = masked_sum(loss, m, -1) / tok.clamp(min=1).to(loss.dtype)       # (N,)
    return per_seq.sum() / _count(num_sequences, (tok > 0).sum(), loss)


@register_loss_type("bnpo")
def _agg_bnpo(loss, m, *, num_tokens=None, num_sequences=None, max_completion_length=None, num_rows=None):
    # TRL's "bnpo": sum over this call's tokens / this call's token count, whatever num_tokens says.
    # A local mean: the trainer averages it over micro-batches and ranks (see ``local`` below).
    return masked_sum(loss, m) / _count(None, m.sum(), loss)


_agg_bnpo.local = True  # normalised per micro-batch: averaged over micro-batches, not summed


@register_loss_type("dapo")
def _agg_token_mean(loss, m, *, num_tokens=None, num_sequences=None, max_completion_length=None, num_rows=None):
    # DAPO token-level loss (arXiv 2503.14476): sum over all tokens / number of tokens.
    return masked_sum(loss, m) / _count(num_tokens, m.sum(), loss)


@register_loss_type("dr_grpo")
def _agg_dr_grpo(loss, m, *, num_tokens=None, num_sequences=None, max_completion_length=None, num_rows=None):
    # Dr. GRPO (arXiv 2503.20783): the constant normaliser (rows) * L_max, no length bias. Rows, not
    # non-empty sequences: a row masked out (a truncated completion under mask_truncated_completions)
    # still counts, so the normaliser does not move with the truncation rate.
    if max_completion_length is None:
        raise ValueError("loss type dr_grpo needs max_completion_length")
    n = _count(num_rows, torch.tensor(loss.shape[0], device=loss.device), loss)
    return masked_sum(loss, m) / (n * float(max_completion_length))


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str = "grpo",
    *,
    num_tokens: Optional[Number] = None,
    num_sequences: Optional[Number] = None,
    max_completion_length: Optional[int] = None,
    num_rows: Optional[Number] = None,
) -> Tensor:
    """Reduce a ``(N, T)`` per-token loss to a scalar.

    Modes (``LOSS_TYPES``, TRL's ``loss_type`` names):

    * "grpo": ``1/N' sum_i (1/|o_i| sum_t l_it)``, N' = number of sequences with at least one
      valid token (or ``num_sequences``). Empty sequences add 0.
    * "dapo": ``sum_it l_it / num_tokens``. ``num_tokens`` should be the GLOBAL number of valid
      tokens of the whole optimizer step (all gradient-accumulation micro-batches and all
      data-parallel ranks); ``None`` -> ``mask.sum()`` of this call.
      Why: the full-batch loss is ``sum_{all tokens} l / N_tok``. If every micro-batch divided
      by its own token count, summing (or averaging) the micro-batch losses would weight
      tokens of short micro-batches more and the gradient would depend on how the batch was
      split. With a global denominator the micro-batch losses sum exactly to the full-batch
      loss, so accumulated gradients equal the full-batch gradient.
    * "bnpo": ``sum_it l_it / mask.sum()`` of THIS call (``num_tokens`` is ignored): TRL's local
      token mean, which does depend on how the batch is split. The function carries
      ``local = True``: the trainer averages these losses over micro-batches (and ranks, by
      the data-parallel gradient average) instead of summing global-normalised ones. With one
      micro-batch per rank and equal token counts on every rank it equals "dapo".
    * "dr_grpo": ``sum_it l_it / (num_rows * max_completion_length)``, a constant (G * L_max per
      prompt); ``max_completion_length`` is required; ``num_rows`` defaults to N (this call's
      rows). Every row counts, empty ones included (a completion masked out by
      ``mask_truncated_completions``), so the normaliser does not depend on the truncation rate.
      Same convention: pass the GLOBAL number of rows of the optimizer step so micro-batch
      losses sum to the full-batch loss.

    For "grpo" too, passing the global number of non-empty sequences as
    ``num_sequences`` makes micro-batch losses sum to the full-batch loss.

    Data parallel: DDP / FSDP / DeepSpeed *average* gradients over ranks, so with global
    counts multiply the loss by ``world_size`` (sum over ranks = full-batch loss); with
    gradient accumulation, do not divide by the number of accumulation steps again.
    Counts (given or computed) below 1 are treated as 1, so an empty batch gives 0, not NaN.

    Returns a 0-dim tensor.
    """
    fn = lookup(LOSS_TYPES, mode)
    return fn(per_token_loss, mask.bool(), num_tokens=num_tokens, num_sequences=num_sequences,
              max_completion_length=max_completion_length, num_rows=num_rows)


# =========================================================================== 9. LR schedules
# After ``warmup_steps`` of linear warm-up (grpo.engine.lr_lambda), the multiplier on the base
# learning rate as a function of progress = (step - warmup) / (max_steps - warmup).

@LR_SCHEDULES.register("constant")
def _lr_constant(progress: float) -> float:
    return 1.0


@LR_SCHEDULES.register("linear")
def _lr_linear(progress: float) -> float:
    return max(0.0, 1.0 - progress)


@LR_SCHEDULES.register("cosine")
def _lr_cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
