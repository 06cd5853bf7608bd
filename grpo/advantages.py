"""Reward combination and group-relative advantages (GRPO, DeepSeekMath arXiv 2402.03300).

Pure tensor functions. Conventions (see docs/algorithms.md):

* NaN in a reward tensor means "abstained" (e.g. a judge call failed). An abstained
  sample is left out of its group's mean / std and gets advantage exactly 0.
* Standard deviations are Bessel-corrected (unbiased, divide by n - 1), the
  ``torch.std`` default that TRL's GRPOTrainer and verl's GRPO advantage use. With fewer
  than two valid rewards the std is defined as 0 (such a group gets advantage 0 anyway).
* Metrics are detached 0-dim tensors (no host sync; all-reduce friendly).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from grpo.registry import lookup, registrar

__all__ = ["ADVANTAGE_SCALES", "register_advantage_scale", "group_advantages", "combine_rewards"]

# name -> fn(centred (B, G), group_std (B, 1), batch_std (), eps) -> adv (B, G)
ADVANTAGE_SCALES: Dict[str, Callable[..., Tensor]] = {}


register_advantage_scale = registrar(ADVANTAGE_SCALES)  # decorator: @register_advantage_scale("name")


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
    fn = lookup(ADVANTAGE_SCALES, scale, "advantage scale")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, G), got shape {tuple(rewards.shape)}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    valid = ~torch.isnan(r)                                     # (B, G)
    mean_g, std_g, n_g = _nan_std(r, valid, dim=1, keepdim=True)  # (B, 1) each
    mean_b, std_b, _ = _nan_std(r, valid)                       # () each
    centred = torch.where(valid, r - mean_g, torch.zeros_like(r))  # (B, G)
    adv = fn(centred, std_g, std_b, eps)                         # (B, G)
    # A group without spread must give exactly 0: (r - mean) can be ~1e-9 instead of 0 in floating point.
    big = torch.finfo(r.dtype).max
    hi = torch.where(valid, r, torch.full_like(r, -big)).amax(dim=1, keepdim=True)  # (B, 1)
    lo = torch.where(valid, r, torch.full_like(r, big)).amin(dim=1, keepdim=True)   # (B, 1)
    flat = (hi <= lo) | (n_g < 2)                                # (B, 1)
    adv = torch.where(valid & ~flat, adv, torch.zeros_like(adv))
    metrics = {
        "frac_zero_std_groups": flat.float().mean(),
        "reward_mean": mean_b.float(),
        "reward_std": std_b.float(),
        "abstain_frac": (~valid).float().mean(),
    }
    return adv, metrics


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
