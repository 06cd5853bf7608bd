"""GRPOConfig and SFTConfig: every knob of a run, with defaults that reproduce PathVLM-R1.

Field names follow TRL's ``GRPOConfig`` / ``SFTConfig`` wherever the concept is the same, so a TRL
script ports by changing its imports (docs/training.md maps every field to TRL's).

Batch layout, per process and optimizer step (as in TRL):

    per_device_train_batch_size  x  gradient_accumulation_steps  =  completions per step
                                                                 =  prompts_per_step (B) x num_generations (G)

so a group never straddles processes (unlike TRL, whose groups may span devices: here each process
needs a whole number of groups). The global batch is B * G * world_size completions. Each
generation batch is reused for ``num_iterations`` (mu) optimizer passes. ``max_steps = -1`` (the
default, as in TRL) runs ``num_train_epochs`` passes over the prompts instead.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from . import core

# report_to backends (grpo.reporting); "all" = every installed one, "none" = only metrics.jsonl
REPORT_BACKENDS = ("jsonl", "tensorboard", "wandb")


@dataclass(frozen=True)
class TrainingConfig:
    """What every trainer here shares: optimisation, numerics, output, back-end."""
    per_device_train_batch_size: int = 8  # samples per forward/backward (per process)
    gradient_accumulation_steps: int = 1  # forward/backward passes per optimizer step
    num_train_epochs: float = 3.0       # passes over the dataset, used when max_steps = -1
    max_steps: int = -1                 # optimizer steps; -1 = from num_train_epochs
    learning_rate: float = 1e-6         # paper (GRPO): 1e-6
    lr_scheduler_type: str = "constant"  # "constant", "linear", "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
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
    report_to: str | list[str] = "jsonl"  # "jsonl", "tensorboard", "wandb", a list of them, "all", "none"
    disable_tqdm: bool = False          # no progress bar
    preflight: bool = True              # check output folder, rewards and judge before the first rollout

    def __post_init__(self):
        errors = validate(self)
        if errors:
            raise ValueError(f"{type(self).__name__} is invalid:\n  - " + "\n  - ".join(errors))

    @property
    def samples_per_step(self) -> int:
        """Samples (completions, or SFT examples) per process per optimizer step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def adam_betas(self) -> tuple[float, float]:
        return (self.adam_beta1, self.adam_beta2)

    def steps_for(self, num_items: int, world_size: int = 1) -> int:
        """Optimizer steps of the run: ``max_steps``, or when it is -1, ``num_train_epochs``
        passes over ``num_items`` dataset items shared by ``world_size`` processes."""
        if self.max_steps > 0:
            return self.max_steps
        per_step = self.items_per_round * world_size
        rounds = max(1, math.ceil(self.num_train_epochs * num_items / per_step))
        return rounds * self.steps_per_round

    @property
    def items_per_round(self) -> int:
        """Dataset items one process consumes per data round."""
        return self.samples_per_step

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps per data round."""
        return 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class GRPOConfig(TrainingConfig):
    # --- batch layout ---
    num_generations: int = 4            # G, samples per prompt (paper: 4)
    generation_chunk_size: int | None = None  # completions per generate() call; None = all B*G at once
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
    kl_estimator: str = "k3"            # "k1", "k2", "k3" / "low_var_kl" (paper: k3); any name in core.KL_ESTIMATORS
    kl_clamp: float = 10.0              # clamp on the log-ratio inside the KL estimator
    epsilon: float = 0.2                # lower clip 1 - epsilon (and upper, unless epsilon_high)
    epsilon_high: float | None = None   # upper clip 1 + epsilon_high; None = epsilon (DAPO clip-higher: 0.28)
    delta: float | None = None          # two-sided GRPO (INTELLECT-2): ratio capped at delta > 1 + epsilon_high
    importance_sampling_level: str = "token"  # "token" (GRPO) or "sequence" (GSPO, arXiv 2507.18071)
    num_iterations: int = 1             # mu, optimizer passes per generation batch (paper: 1)
    scale_rewards: str = "group"        # "group" (paper), "batch", "none" (Dr. GRPO); True/False = group/none
    advantage_eps: float = 1e-4
    loss_type: str = "grpo"             # "grpo" (paper), "bnpo", "dr_grpo", "dapo"; any name in core.LOSS_TYPES
    reward_weights: tuple[float, ...] | None = None  # None: each reward's own .weight
    multi_objective_aggregation: str = "sum_then_normalize"  # or "normalize_then_sum" (GDPO)
    # --- entropy ---
    entropy_top_k: int = 20             # also log the entropy of the k most likely tokens' distribution; 0 = off
    entropy_coef: float = 0.0           # entropy bonus: the loss gets -entropy_coef * H per token; 0 = off
    top_entropy_quantile: float = 1.0   # only this top fraction of tokens by entropy gets the policy gradient (1 = all)
    log_completions: bool = False       # log sample completions every logging_steps (completions.jsonl, report_to)
    num_completions_to_print: int | None = None  # how many of them; None = every completion of the step
    # --- judge outages ---
    max_abstain_rate: float | None = None  # stop (AbstainRateError) when a reward's abstain rate,
    abstain_window: int = 1             # averaged over this many generation rounds, exceeds it
    # --- performance (docs/performance.md) ---
    reuse_prompts: bool = True          # encode each prompt's image and prefill it once per group, not G times

    def __post_init__(self):
        # TRL accepts booleans for scale_rewards: True = "group", False = "none"
        if isinstance(self.scale_rewards, bool):
            object.__setattr__(self, "scale_rewards", "group" if self.scale_rewards else "none")
        super().__post_init__()

    @property
    def prompts_per_step(self) -> int:
        """B, prompts (groups) per process per optimizer step."""
        return self.completions_per_step // self.num_generations

    @property
    def completions_per_step(self) -> int:
        return self.samples_per_step

    @property
    def clip_high(self) -> float:
        """The upper clip epsilon in effect: ``epsilon_high``, or ``epsilon`` when it is None."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def items_per_round(self) -> int:
        return self.prompts_per_step

    @property
    def steps_per_round(self) -> int:
        return self.num_iterations


@dataclass(frozen=True)
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning (the paper's stage 1): cross-entropy on the assistant's tokens only."""
    learning_rate: float = 1e-5
    max_target_length: int = 256        # target tokens kept per example (prompts are never cut)
    output_dir: str = "runs/sft"

    @property
    def batch_size(self) -> int:
        """Examples per process per optimizer step."""
        return self.samples_per_step


# Fields whose value names a function of grpo.core: the valid values are that registry's names, so a
# newly registered variant is configurable at once.
_CHOICES = {
    "lr_scheduler_type": core.LR_SCHEDULES,
    "kl_estimator": core.KL_ESTIMATORS,
    "importance_sampling_level": core.RATIO_LEVELS,
    "scale_rewards": core.ADVANTAGE_SCALES,
    "loss_type": core.LOSS_TYPES,
    "multi_objective_aggregation": core.REWARD_AGGREGATIONS,
}


def _choice_error(name: str, value, registry: core.Registry) -> str:
    aliases = f" (aliases: {', '.join(registry.aliases)})" if registry.aliases else ""
    return f"{name}={value!r}: choose one of {', '.join(registry.canonical)}{aliases}"


def _type_errors(cfg) -> list[str]:
    errors = []
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        if "list" in kind:  # str | list[str] (report_to): checked by its own rule
            continue
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
    positive = ("num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
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
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        errors.append(f"max_steps={cfg.max_steps}: must be >= 1, or -1 to train num_train_epochs epochs")
    if cfg.max_steps == -1 and not cfg.num_train_epochs > 0:
        errors.append(f"num_train_epochs={cfg.num_train_epochs}: must be > 0 (or set max_steps >= 1)")
    if cfg.adam_epsilon <= 0 or not all(0 <= b < 1 for b in cfg.adam_betas):
        errors.append(f"adam_beta1={cfg.adam_beta1}, adam_beta2={cfg.adam_beta2}, adam_epsilon={cfg.adam_epsilon}: "
                      f"need betas in [0, 1) and epsilon > 0 (e.g. 0.9, 0.999, 1e-8)")
    if cfg.learning_rate <= 0:
        errors.append(f"learning_rate={cfg.learning_rate}: must be > 0")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        errors.append(f"max_grad_norm={cfg.max_grad_norm}: must be > 0 or None")
    if cfg.warmup_steps < 0 or cfg.save_steps < 0:
        errors.append(f"warmup_steps={cfg.warmup_steps}, save_steps={cfg.save_steps}: must be >= 0")
    from .reporting import report_to_errors  # (grpo.reporting imports this module)
    errors += report_to_errors(cfg.report_to)
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
    n = cfg.completions_per_step
    if n % cfg.num_generations:
        errors.append(f"per_device_train_batch_size * gradient_accumulation_steps = {cfg.per_device_train_batch_size}"
                      f" * {cfg.gradient_accumulation_steps} = {n} completions per step is not a multiple of "
                      f"num_generations={cfg.num_generations}: each process needs whole groups; e.g. set "
                      f"gradient_accumulation_steps to {cfg.num_generations // math.gcd(cfg.num_generations, cfg.per_device_train_batch_size)}")
    gcs = cfg.generation_chunk_size
    if gcs is not None and (gcs < 1 or n % gcs):
        errors.append(f"generation_chunk_size={gcs}: must divide the {n} completions per step "
                      f"(per_device_train_batch_size * gradient_accumulation_steps)")
    if cfg.beta < 0:
        errors.append(f"beta={cfg.beta}: must be >= 0 (0 disables the KL term)")
    if cfg.temperature <= 0:
        errors.append(f"temperature={cfg.temperature}: must be > 0")
    if not 0 < cfg.top_p <= 1:
        errors.append(f"top_p={cfg.top_p}: must be in (0, 1]")
    if cfg.top_k < 0:
        errors.append(f"top_k={cfg.top_k}: must be >= 0 (0 = off)")
    if not 0 <= cfg.epsilon < 1:
        errors.append(f"epsilon={cfg.epsilon}: must be in [0, 1)")
    if cfg.epsilon_high is not None and cfg.epsilon_high < 0:
        errors.append(f"epsilon_high={cfg.epsilon_high}: must be >= 0, or None to use epsilon")
    if cfg.delta is not None and cfg.delta <= 1:
        errors.append(f"delta={cfg.delta}: must be > 1 (recommended > 1 + epsilon_high, e.g. 3.0) or None")
    if cfg.advantage_eps < 0 or cfg.kl_clamp <= 0:
        errors.append(f"advantage_eps={cfg.advantage_eps}, kl_clamp={cfg.kl_clamp}: need eps >= 0, clamp > 0")
    mu = cfg.num_iterations
    if mu > 1 and ((cfg.max_steps > 0 and cfg.max_steps % mu) or cfg.save_steps % mu):
        errors.append(f"max_steps={cfg.max_steps} and save_steps={cfg.save_steps} must be multiples of "
                      f"num_iterations={mu}: checkpoints are written only between generation rounds")
    if cfg.num_completions_to_print is not None and cfg.num_completions_to_print < 1:
        errors.append(f"num_completions_to_print={cfg.num_completions_to_print}: must be >= 1, or None for all")
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
    if getattr(core.REWARD_AGGREGATIONS[cfg.multi_objective_aggregation], "normalizes_within_group", False) \
            and cfg.scale_rewards == "group":
        allowed = [n for n in core.ADVANTAGE_SCALES.canonical if n != "group"]
        errors.append(f"multi_objective_aggregation={cfg.multi_objective_aggregation!r} already normalises each "
                      f"reward within its group; scale_rewards={cfg.scale_rewards!r} would normalise the sum again: "
                      f"choose scale_rewards one of {', '.join(allowed)} (batch = GDPO / TRL)")
    return errors
