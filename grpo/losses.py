"""GRPO policy loss, KL penalty and loss aggregation: pure tensor functions.

Shapes: N sequences (completions) x T completion tokens. ``mask`` ``(N, T)`` is treated as
boolean (nonzero = valid completion token). Values at padded positions may be garbage
(even inf/NaN): they are replaced *before* any nonlinearity, so neither the loss nor its
gradient is polluted. Metrics are detached 0-dim tensors (no host sync).

References: GRPO, DeepSeekMath arXiv 2402.03300; PPO clipping arXiv 1707.06347; DAPO
(clip-higher, token-level loss) arXiv 2503.14476; Dr. GRPO arXiv 2503.20783; GSPO arXiv
2507.18071; dual-clip PPO arXiv 1912.09729; k1/k2/k3 from J. Schulman, "Approximating KL
divergence" (joschu.net/blog/kl-approx.html, 2020).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from grpo.registry import lookup, registrar

__all__ = [
    "KL_ESTIMATORS", "RATIO_LEVELS", "LOSS_AGGREGATIONS",
    "register_kl_estimator", "register_ratio_level", "register_loss_aggregation",
    "masked_sum", "masked_mean", "kl_penalty", "policy_loss", "grpo_token_loss", "aggregate_loss",
]

Number = Union[int, float, Tensor]

KL_ESTIMATORS: Dict[str, Callable[..., Tensor]] = {}      # name -> fn(logp, ref_logp, clamp) -> (N, T)
RATIO_LEVELS: Dict[str, Callable[..., Tensor]] = {}       # name -> fn(log_ratio, logp, mask) -> (N, T)
LOSS_AGGREGATIONS: Dict[str, Callable[..., Tensor]] = {}  # name -> fn(loss, mask, *, num_tokens, num_sequences, max_completion_length) -> ()


register_kl_estimator = registrar(KL_ESTIMATORS)
register_ratio_level = registrar(RATIO_LEVELS)
register_loss_aggregation = registrar(LOSS_AGGREGATIONS)


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


# --------------------------------------------------------------------------- KL estimators
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
    return lookup(KL_ESTIMATORS, estimator, "KL estimator")(logp, ref_logp, clamp)


# --------------------------------------------------------------------------- ratio levels

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


# --------------------------------------------------------------------------- policy loss

def policy_loss(
    logp: Tensor,
    old_logp: Optional[Tensor],
    adv: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: Optional[float] = None,
    ratio_level: str = "token",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped surrogate loss per token (PPO / GRPO / DAPO / GSPO).

    ``loss_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)``; with ``dual_clip = c``
    and ``A < 0``: ``loss_t = -max(min(r_t A, clip(r_t) A), c A)``, i.e. the loss is capped at
    ``c |A|`` (dual-clip PPO arXiv 1912.09729; verl's ``clip_ratio_c``).

    Args:
        logp: ``(N, T)`` log-probs under the current policy (requires grad).
        old_logp: ``(N, T)`` log-probs under the sampling policy; ``None`` = on-policy
            (``logp.detach()``, ratio 1).
        adv: ``(N,)`` per-sequence advantage (``(N, T)`` per-token also accepted).
        mask: ``(N, T)`` valid completion tokens.
        eps_low, eps_high: clip range; ``eps_high > eps_low`` is DAPO's clip-higher.
        dual_clip: ``c > 1`` or ``None``.
        ratio_level: name in ``RATIO_LEVELS``: "token" (GRPO), "sequence" (GSPO-token;
            aliases "sequence_token", "gspo"): every token of sequence i uses
            ``s_i = exp(mean_{valid t}(logp - old_logp))`` as its ratio (value), while the
            gradient w.r.t. ``logp_t`` is that of ``sg[s_i] * exp(logp_t - sg[logp_t])``.

    Returns:
        per_token_loss: ``(N, T)``, 0 at masked positions.
        metrics (means over valid tokens): ``clipfrac_low`` (A < 0 and r < 1 - eps_low),
        ``clipfrac_high`` (A > 0 and r > 1 + eps_high), ``clipfrac_dual`` (dual cap active;
        only when ``dual_clip``), ``ratio_mean`` / ``ratio_min`` / ``ratio_max`` (r is the
        sequence ratio s_i at sequence level; 1 when no token is valid).
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    level_fn = lookup(RATIO_LEVELS, ratio_level, "ratio level")
    m = mask.bool()                                                           # (N, T)
    if old_logp is None:
        old_logp = logp.detach()
    a = adv.unsqueeze(-1) if adv.dim() == 1 else adv                          # (N, 1) or (N, T)
    a = a.to(logp.dtype)
    log_ratio = torch.where(m, logp - old_logp, torch.zeros_like(logp))       # (N, T)
    ratio = torch.exp(level_fn(log_ratio, logp, m))                           # (N, T)
    surr = ratio * a                                                          # (N, T)
    surr_clip = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a                # (N, T)
    obj = torch.min(surr, surr_clip)                                          # pessimistic bound (PPO)
    neg = a < 0                                                               # (N, 1) or (N, T)
    metrics: Dict[str, Tensor] = {}
    if dual_clip is not None:
        floor = dual_clip * a                                                 # objective >= c*A for A < 0
        metrics["clipfrac_dual"] = masked_mean((neg & (obj < floor)).expand_as(m).to(logp.dtype), m).detach()
        obj = torch.where(neg, torch.max(obj, floor), obj)
    loss = torch.where(m, -obj, torch.zeros_like(obj))                        # (N, T)

    with torch.no_grad():
        r = ratio.detach()
        f = logp.dtype
        metrics["clipfrac_low"] = masked_mean((neg & (r < 1.0 - eps_low)).to(f), m)
        metrics["clipfrac_high"] = masked_mean(((a > 0) & (r > 1.0 + eps_high)).to(f), m)
        metrics["ratio_mean"] = masked_mean(r, m)
        metrics["ratio_min"], metrics["ratio_max"] = _masked_min_max(r, m)
    return loss, metrics


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
    dual_clip: Optional[float] = None,
    ratio_level: str = "token",
    kl_estimator: str = "k3",
    kl_clamp: Optional[float] = 10.0,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """GRPO per-token loss: :func:`policy_loss` + ``beta * KL`` (DeepSeekMath eq. 3).

    Shapes as in :func:`policy_loss`; ``ref_logp`` ``(N, T)`` or ``None``. The KL term is
    added when ``beta > 0`` and ``ref_logp`` is given. ``kl_mean`` (mean over valid tokens,
    detached) is reported whenever ``ref_logp`` is given, even with ``beta == 0``; it is 0
    when ``ref_logp`` is ``None``.

    Returns ``(per_token_loss (N, T), metrics)`` with the metrics of :func:`policy_loss`
    plus ``kl_mean``.
    """
    loss, metrics = policy_loss(logp, old_logp, adv, mask, eps_low, eps_high, dual_clip, ratio_level)
    m = mask.bool()
    if ref_logp is None:
        metrics["kl_mean"] = torch.zeros((), dtype=logp.dtype, device=logp.device)
        return loss, metrics
    zero = torch.zeros_like(logp)
    lp = torch.where(m, logp, zero)                                           # sanitise before exp
    rp = torch.where(m, ref_logp.to(logp.dtype), zero)
    if beta > 0:
        kl = torch.where(m, kl_penalty(lp, rp, kl_estimator, kl_clamp), zero)  # (N, T)
        loss = loss + beta * kl
    else:
        with torch.no_grad():
            kl = torch.where(m, kl_penalty(lp, rp, kl_estimator, kl_clamp), zero)
    metrics["kl_mean"] = masked_mean(kl.detach(), m)
    return loss, metrics


# --------------------------------------------------------------------------- aggregation

def _count(x: Optional[Number], default: Tensor, like: Tensor) -> Tensor:
    """Denominator as a tensor, clamped to >= 1 (an empty batch gives loss 0, not NaN)."""
    v = default if x is None else torch.as_tensor(x, device=like.device)
    return v.to(like.dtype).clamp(min=1)


@register_loss_aggregation("seq_mean_token_mean", "grpo")
def _agg_seq_mean_token_mean(loss, m, *, num_tokens=None, num_sequences=None, max_completion_length=None):
    # Paper GRPO (DeepSeekMath eq. 3): 1/G sum_i 1/|o_i| sum_t. Empty sequences are skipped.
    tok = m.sum(-1)                                                           # (N,)
    per_seq = masked_sum(loss, m, -1) / tok.clamp(min=1).to(loss.dtype)       # (N,)
    return per_seq.sum() / _count(num_sequences, (tok > 0).sum(), loss)


@register_loss_aggregation("token_mean", "bnpo", "dapo")
def _agg_token_mean(loss, m, *, num_tokens=None, num_sequences=None, max_completion_length=None):
    # DAPO token-level loss (arXiv 2503.14476): sum over all tokens / number of tokens.
    return masked_sum(loss, m) / _count(num_tokens, m.sum(), loss)


@register_loss_aggregation("seq_mean_token_sum_norm", "dr_grpo")
def _agg_dr_grpo(loss, m, *, num_tokens=None, num_sequences=None, max_completion_length=None):
    # Dr. GRPO (arXiv 2503.20783): constant normaliser G * L_max, no length bias.
    if max_completion_length is None:
        raise ValueError("seq_mean_token_sum_norm / dr_grpo needs max_completion_length")
    n = _count(num_sequences, torch.tensor(loss.shape[0], device=loss.device), loss)
    return masked_sum(loss, m) / (n * float(max_completion_length))


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str = "seq_mean_token_mean",
    *,
    num_tokens: Optional[Number] = None,
    num_sequences: Optional[Number] = None,
    max_completion_length: Optional[int] = None,
) -> Tensor:
    """Reduce a ``(N, T)`` per-token loss to a scalar.

    Modes (``LOSS_AGGREGATIONS``):

    * "seq_mean_token_mean" (alias "grpo"): ``1/N' sum_i (1/|o_i| sum_t l_it)``, N' = number
      of sequences with at least one valid token (or ``num_sequences``). Empty sequences add 0.
    * "token_mean" ("bnpo", "dapo"): ``sum_it l_it / num_tokens``. ``num_tokens`` should be the
      GLOBAL number of valid tokens of the whole optimizer step (all gradient-accumulation
      micro-batches and all data-parallel ranks); ``None`` -> ``mask.sum()`` of this call.
      Why: the full-batch loss is ``sum_{all tokens} l / N_tok``. If every micro-batch divided
      by its own token count, summing (or averaging) the micro-batch losses would weight
      tokens of short micro-batches more and the gradient would depend on how the batch was
      split. With a global denominator the micro-batch losses sum exactly to the full-batch
      loss, so accumulated gradients equal the full-batch gradient.
    * "seq_mean_token_sum_norm" ("dr_grpo"): ``sum_it l_it / (num_sequences * max_completion_length)``;
      ``max_completion_length`` is required; ``num_sequences`` defaults to N (this call's rows).
      Same convention: pass the GLOBAL number of sequences of the optimizer step so
      micro-batch losses sum to the full-batch loss.

    For "seq_mean_token_mean" too, passing the global number of non-empty sequences as
    ``num_sequences`` makes micro-batch losses sum to the full-batch loss.

    Data parallel: DDP / FSDP / DeepSpeed *average* gradients over ranks, so with global
    counts multiply the loss by ``world_size`` (sum over ranks = full-batch loss); with
    gradient accumulation, do not divide by the number of accumulation steps again.
    Counts (given or computed) below 1 are treated as 1, so an empty batch gives 0, not NaN.

    Returns a 0-dim tensor.
    """
    fn = lookup(LOSS_AGGREGATIONS, mode, "loss aggregation")
    return fn(per_token_loss, mask.bool(), num_tokens=num_tokens, num_sequences=num_sequences,
              max_completion_length=max_completion_length)
