"""GRPOConfig: every knob of a GRPO run, with defaults that reproduce PathVLM-R1.

Batch layout, per process and optimizer step:

    prompts_per_step (B) prompts  x  num_generations (G) samples  =  B*G completions
    B*G completions  =  micro_batch_size  x  gradient accumulation (derived)

so a group never straddles processes or micro-batches' advantage computation. The global batch
is B * G * world_size completions. Each generation batch is reused for ``num_iterations`` (mu)
optimizer passes.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from . import core


@dataclass(frozen=True)
class TrainingConfig:
    """What every trainer here shares: optimisation, numerics, output, back-end."""
    micro_batch_size: int = 8           # samples per forward/backward (per process)
    max_steps: int = 100                # optimizer steps
    learning_rate: float = 1e-6         # paper (GRPO): 1e-6
    lr_scheduler: str = "constant"      # "constant", "linear", "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0   # None disables clipping
    seed: int = 42                      # paper: 42
    logprob_chunk_size: int = 1024      # rows of the output projection computed at once
    skip_nonfinite_steps: bool = True   # a NaN/inf grad norm skips the update (counted)
    output_dir: str = "runs/grpo"
    logging_steps: int = 1
    save_steps: int = 0                 # 0 = only at the end
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "auto" = latest in output_dir
    deepspeed: str | None = None        # path to a DeepSpeed JSON config; None = plain PyTorch
    progress_bar: bool = True
    preflight: bool = True              # check output folder, rewards and judge before the first rollout

    def __post_init__(self):
        errors = validate(self)
        if errors:
            raise ValueError(f"{type(self).__name__} is invalid:\n  - " + "\n  - ".join(errors))

    @property
    def samples_per_step(self) -> int:
        """Samples (completions) per process per optimizer step."""
        raise NotImplementedError

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.samples_per_step // self.micro_batch_size

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class GRPOConfig(TrainingConfig):
    # --- batch layout ---
    num_generations: int = 4            # G, samples per prompt (paper: 4)
    prompts_per_step: int = 2           # B, prompts per process per optimizer step
    generation_batch_size: int | None = None  # completions per generate() call; None = B*G
    # --- sampling ---
    max_completion_length: int = 192    # paper: 192 new tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    mask_truncated_completions: bool = False  # drop completions that never emitted EOS from the loss (DAPO overlong filtering)
    dynamic_sampling: bool = False      # DAPO: drop groups whose rewards all agree, sample more prompts to refill
    max_resample_rounds: int = 3        # extra generation rounds per step at most; then zero-std groups fill the batch
    # --- objective ---
    beta: float = 0.04                  # KL coefficient (paper: 0.04); 0 = no reference model
    kl_estimator: str = "k3"            # "k1", "k2", "k3" (paper: k3); any name in core.KL_ESTIMATORS
    kl_clamp: float = 10.0              # clamp on the log-ratio inside the KL estimator
    epsilon_low: float = 0.2            # lower clip 1 - eps_low
    epsilon_high: float = 0.2           # upper clip 1 + eps_high (DAPO clip-higher: 0.28)
    dual_clip: float | None = None      # c > 1 caps the loss of negative-advantage tokens (arXiv 1912.09729)
    ratio_level: str = "token"          # "token" (GRPO) or "sequence" (GSPO, arXiv 2507.18071)
    num_iterations: int = 1             # mu, optimizer passes per generation batch (paper: 1)
    advantage_scale: str = "group"      # "group" (paper), "batch", "none" (Dr. GRPO)
    advantage_eps: float = 1e-4
    loss_aggregation: str = "seq_mean_token_mean"  # or "token_mean" (DAPO), "seq_mean_token_sum_norm" (Dr. GRPO)
    reward_weights: tuple[float, ...] | None = None  # None: each reward's own .weight
    reward_aggregation: str = "sum_then_normalize"  # or "normalize_then_sum" (GDPO: z-score each reward per group first)
    # --- entropy ---
    entropy_top_k: int = 20             # also log the entropy of the k most likely tokens' distribution; 0 = off
    entropy_coef: float = 0.0           # entropy bonus: the loss gets -entropy_coef * H per token; 0 = off
    top_entropy_quantile: float = 1.0   # only this top fraction of tokens by entropy gets the policy gradient (1 = all)
    log_completions: int = 0            # write this many sample completions per step to completions.jsonl
    # --- judge outages ---
    max_abstain_rate: float | None = None  # stop (AbstainRateError) when a reward's abstain rate,
    abstain_window: int = 1             # averaged over this many generation rounds, exceeds it
    # --- performance (docs/performance.md) ---
    reuse_prompts: bool = True          # encode each prompt's image and prefill it once per group, not G times

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def samples_per_step(self) -> int:
        return self.completions_per_step


@dataclass(frozen=True)
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning (the paper's stage 1): cross-entropy on the assistant's tokens only."""
    batch_size: int = 8                 # examples per process per optimizer step
    learning_rate: float = 1e-5
    max_target_length: int = 256        # target tokens kept per example (prompts are never cut)
    output_dir: str = "runs/sft"

    @property
    def samples_per_step(self) -> int:
        return self.batch_size


# Fields whose value names a function of grpo.core: the valid values are that registry's names, so a
# newly registered variant is configurable at once.
_CHOICES = {
    "lr_scheduler": core.LR_SCHEDULES,
    "kl_estimator": core.KL_ESTIMATORS,
    "ratio_level": core.RATIO_LEVELS,
    "advantage_scale": core.ADVANTAGE_SCALES,
    "loss_aggregation": core.LOSS_AGGREGATIONS,
    "reward_aggregation": core.REWARD_AGGREGATIONS,
}


def _choice_error(name: str, value, registry: core.Registry) -> str:
    aliases = f" (aliases: {', '.join(registry.aliases)})" if registry.aliases else ""
    return f"{name}={value!r}: choose one of {', '.join(registry.canonical)}{aliases}"


def _type_errors(cfg) -> list[str]:
    errors = []
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        if value is None:
            if "None" not in kind:
                errors.append(f"{f.name}=None: a value is required")
            continue
        if kind.startswith("int") and (isinstance(value, bool) or not isinstance(value, int)):
            errors.append(f"{f.name}={value!r}: expected an integer")
        elif kind.startswith("float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            errors.append(f"{f.name}={value!r}: expected a number")
        elif kind.startswith("bool") and not isinstance(value, bool):
            errors.append(f"{f.name}={value!r}: expected true or false")
        elif kind.startswith("str") and not isinstance(value, str):
            errors.append(f"{f.name}={value!r}: expected a string")
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{f.name}={value!r}: must be finite")
    return errors


def validate(cfg: TrainingConfig) -> list[str]:
    """All problems with a config, each naming the field and what would fix it."""
    errors = _type_errors(cfg)
    if errors:
        return errors
    for name, registry in _CHOICES.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in registry:
            errors.append(_choice_error(name, getattr(cfg, name), registry))
    positive = ("num_generations", "prompts_per_step", "batch_size", "micro_batch_size", "max_steps",
                "max_completion_length", "max_target_length", "num_iterations", "logprob_chunk_size",
                "logging_steps")
    errors += [f"{n}={getattr(cfg, n)}: must be >= 1" for n in positive
               if hasattr(cfg, n) and getattr(cfg, n) < 1]
    errors += _common_errors(cfg)
    if errors or not isinstance(cfg, GRPOConfig):
        return errors
    return _grpo_errors(cfg)


def _common_errors(cfg: TrainingConfig) -> list[str]:
    errors = []
    if cfg.micro_batch_size >= 1 and cfg.samples_per_step % cfg.micro_batch_size:
        what = ("prompts_per_step * num_generations" if isinstance(cfg, GRPOConfig) else "batch_size")
        errors.append(f"{what} = {cfg.samples_per_step} is not a multiple of micro_batch_size="
                      f"{cfg.micro_batch_size}; set micro_batch_size to a divisor of {cfg.samples_per_step}")
    if cfg.learning_rate <= 0:
        errors.append(f"learning_rate={cfg.learning_rate}: must be > 0")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        errors.append(f"max_grad_norm={cfg.max_grad_norm}: must be > 0 or None")
    if cfg.warmup_steps < 0 or cfg.save_steps < 0:
        errors.append(f"warmup_steps={cfg.warmup_steps}, save_steps={cfg.save_steps}: must be >= 0")
    b = cfg.adam_betas
    if not (isinstance(b, (tuple, list)) and len(b) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in b)):
        errors.append(f"adam_betas={b!r}: expected two numbers in [0, 1), e.g. (0.9, 0.999)")
    return errors + _deepspeed_errors(cfg.deepspeed)


def _deepspeed_errors(path: str | None) -> list[str]:
    if path is None:
        return []
    if not Path(path).is_file():
        return [f"deepspeed={path!r}: no such file; pass a DeepSpeed JSON config "
                f"(e.g. examples/configs/zero3.json) or None"]
    try:
        ds = json.loads(Path(path).read_text())
    except ValueError as err:
        return [f"deepspeed={path!r}: not valid JSON ({err}); fix the file or pass None"]
    if not isinstance(ds, dict):
        return [f"deepspeed={path!r}: the JSON must be an object of DeepSpeed settings"]
    return []


def _grpo_errors(cfg: GRPOConfig) -> list[str]:
    errors = []
    if cfg.num_generations < 2:
        errors.append(f"num_generations={cfg.num_generations}: GRPO needs at least 2 samples per prompt "
                      f"for a group baseline")
    gbs = cfg.generation_batch_size
    if gbs is not None and (gbs < 1 or cfg.completions_per_step % gbs):
        errors.append(f"generation_batch_size={gbs}: must divide prompts_per_step * num_generations = "
                      f"{cfg.completions_per_step}")
    if cfg.beta < 0:
        errors.append(f"beta={cfg.beta}: must be >= 0 (0 disables the KL term)")
    if cfg.temperature <= 0:
        errors.append(f"temperature={cfg.temperature}: must be > 0")
    if not 0 < cfg.top_p <= 1:
        errors.append(f"top_p={cfg.top_p}: must be in (0, 1]")
    if cfg.top_k < 0:
        errors.append(f"top_k={cfg.top_k}: must be >= 0 (0 = off)")
    if not 0 <= cfg.epsilon_low < 1:
        errors.append(f"epsilon_low={cfg.epsilon_low}: must be in [0, 1)")
    if cfg.epsilon_high < 0:
        errors.append(f"epsilon_high={cfg.epsilon_high}: must be >= 0")
    if cfg.dual_clip is not None and cfg.dual_clip <= 1:
        errors.append(f"dual_clip={cfg.dual_clip}: must be > 1 (e.g. 3.0) or None")
    if cfg.advantage_eps < 0 or cfg.kl_clamp <= 0:
        errors.append(f"advantage_eps={cfg.advantage_eps}, kl_clamp={cfg.kl_clamp}: need eps >= 0, clamp > 0")
    mu = cfg.num_iterations
    if mu > 1 and (cfg.max_steps % mu or cfg.save_steps % mu):
        errors.append(f"max_steps={cfg.max_steps} and save_steps={cfg.save_steps} must be multiples of "
                      f"num_iterations={mu}: checkpoints are written only between generation rounds")
    if cfg.log_completions < 0:
        errors.append(f"log_completions={cfg.log_completions}: must be >= 0")
    w = cfg.reward_weights
    if w is not None and not (isinstance(w, (tuple, list)) and w and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in w)):
        errors.append(f"reward_weights={w!r}: expected a tuple of finite numbers, one per reward, or None")
    if cfg.max_abstain_rate is not None and not 0 <= cfg.max_abstain_rate < 1:
        errors.append(f"max_abstain_rate={cfg.max_abstain_rate}: must be in [0, 1) (e.g. 0.5), or None "
                      f"to never stop on abstentions")
    if cfg.abstain_window < 1:
        errors.append(f"abstain_window={cfg.abstain_window}: must be >= 1 generation round")
    if cfg.max_resample_rounds < 0:
        errors.append(f"max_resample_rounds={cfg.max_resample_rounds}: must be >= 0 extra generation rounds")
    if cfg.entropy_top_k < 0:
        errors.append(f"entropy_top_k={cfg.entropy_top_k}: must be >= 0 (0 = off)")
    if cfg.entropy_coef < 0:
        errors.append(f"entropy_coef={cfg.entropy_coef}: must be >= 0 (0 = no entropy bonus)")
    if not 0 < cfg.top_entropy_quantile <= 1:
        errors.append(f"top_entropy_quantile={cfg.top_entropy_quantile}: must be in (0, 1], e.g. 0.2 for the "
                      f"top 20 % of tokens by entropy; 1.0 = every token")
    if getattr(core.REWARD_AGGREGATIONS[cfg.reward_aggregation], "normalizes_within_group", False) \
            and cfg.advantage_scale == "group":
        allowed = [n for n in core.ADVANTAGE_SCALES.canonical if n != "group"]
        errors.append(f"reward_aggregation={cfg.reward_aggregation!r} already normalises each reward within its "
                      f"group; advantage_scale={cfg.advantage_scale!r} would normalise the sum again: choose "
                      f"advantage_scale one of {', '.join(allowed)} (batch = GDPO / TRL)")
    return errors
