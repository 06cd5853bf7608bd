"""Two interchangeable back-ends for the trainer: plain PyTorch (one process) and DeepSpeed.

Both expose the same small surface, so the trainer's loop does not branch on the back-end:
``forward``, ``backward``, ``step`` (returns the grad norm, or None when the step was skipped),
``generation_model()`` (a context yielding a model to call ``generate`` on: under ZeRO-3 the
parameters are gathered once for the whole rollout instead of once per token), ``save``/``load``,
and collectives that degrade to no-ops in one process.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import signal
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .config import TrainingConfig
from .core import LR_SCHEDULES, lookup


def lr_lambda(cfg: TrainingConfig):
    """Multiplier on the base LR at a given optimizer step: warm-up, then constant/linear/cosine."""
    schedule = lookup(LR_SCHEDULES, cfg.lr_scheduler_type)   # "constant", "linear", "cosine"

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        return schedule((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return f


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK``) when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(always: bool = False) -> None:
    """Join the process group a launcher (torchrun, deepspeed) set up: NCCL on GPUs, gloo on CPU.
    A no-op when already initialised, and in a single process unless ``always`` (DeepSpeed
    needs a process group even then)."""
    if dist.is_initialized() or (not always and int(os.environ.get("WORLD_SIZE", "1")) < 2):
        return
    import deepspeed
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_shm_comm_build()
    else:
        torch.cuda.set_device(default_device())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    install_rank_failure_hook()


EXIT_TIMEOUT_ENV = "GRPO_EXIT_TIMEOUT_S"
_PEER_LOST = ("closed by peer", "reset by peer", "broken pipe", "ncclremoteerror", "remote process exit",
              "timed out")
_failure_hook_installed = False


def install_rank_failure_hook() -> None:
    """In a multi-process run, make an uncaught exception end this rank promptly and say so.

    The rank prints ``[rankR]: grpo: rank R of W (pid, host) failed with <Type>: <message>``,
    then its traceback (torch prefixes each line with ``[rankR]:``), and ends within
    ``GRPO_EXIT_TIMEOUT_S`` seconds (default 10; 0 turns the limit off) even when its teardown
    blocks, e.g. on a collective that its peers will never join: SIGALRM, whose default action
    ends the process, is armed before the normal exit (atexit handlers, finalisation) runs.
    Its exit is what stops the others: a launcher stops the ranks of its node when one exits
    non-zero, and ranks on other nodes see their next collective fail. Idempotent; a no-op in
    one process. Called by ``init_distributed`` and ``DeepSpeedEngine``."""
    global _failure_hook_installed
    if _failure_hook_installed or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    _failure_hook_installed = True
    rank, world, previous = dist.get_rank(), dist.get_world_size(), sys.excepthook

    def hook(kind, err, tb):
        try:
            limit = float(os.environ.get(EXIT_TIMEOUT_ENV, "10"))
            if limit > 0:
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(max(1, math.ceil(limit)))
        except (ValueError, OSError, AttributeError):  # a bad value, or no SIGALRM (Windows)
            pass
        first = (str(err).splitlines() or [""])[0]
        hint = ("; this rank lost contact with another one, whose own 'failed with' line names the "
                "original error" if any(k in str(err).lower() for k in _PEER_LOST) else "")
        sys.stderr.write(f"[rank{rank}]: grpo: rank {rank} of {world} (pid {os.getpid()} on "
                         f"{socket.gethostname()}) failed with {kind.__name__}: {first}{hint}\n")
        sys.stderr.flush()
        previous(kind, err, tb)
        sys.stderr.flush()

    sys.excepthook = hook


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters (everything is frozen)")
    return params


class TorchEngine:
    """One process, no DeepSpeed: AdamW, LambdaLR, grad clipping, non-finite step skipping."""

    world_size, rank, is_main = 1, 0, True
    lora = None  # models.lora.LoraPolicy when only LoRA adapters train (set by the trainer)

    def __init__(self, module: torch.nn.Module, cfg: TrainingConfig, ref_module=None):
        self.cfg, self.device = cfg, default_device()
        self.module = module.to(self.device)
        self.ref_module = ref_module.to(self.device) if ref_module is not None else None
        self.optimizer = torch.optim.AdamW(trainable(module), lr=cfg.learning_rate,
                                           betas=cfg.adam_betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))

    @property
    def model(self):
        """The Hugging Face model inside the log-prob wrapper."""
        return self.module.model

    def forward(self, **kw):
        return self.module(**kw)

    def ref_forward(self, **kw):
        return self.ref_module(**kw)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """``last``: this is the optimizer step's final micro-batch (DeepSpeed reduces then)."""
        loss.backward()

    def nonfinite_anywhere(self, loss: torch.Tensor) -> bool:
        """True when ``loss`` is NaN/inf on this or any other rank. Every rank gets the same
        answer, so all of them skip the same backward pass and no collective is left waiting."""
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1).to(self.device)
        return bool(self.all_reduce_sum(bad).item() > 0)

    def discard_step(self) -> None:
        """Drop the gradients accumulated for this optimizer step without applying them: no
        parameter, optimizer-state or scheduler change (the step is skipped, not half-done)."""
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float | None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(norm) and self.cfg.skip_nonfinite_steps:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @contextlib.contextmanager
    def generation_model(self):
        yield self.model

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def all_gather_objects(self, obj) -> list:
        return [obj]

    def save(self, folder: Path) -> None:
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / "optimizer.pt")
        self.save_model(folder / "model")

    def save_model(self, folder: Path, merged: bool = False) -> None:
        """The policy as a Hugging Face folder (every rank calls this; rank 0 writes); under LoRA
        its adapters, or with ``merged`` the model with them merged in."""
        if self.lora is not None:
            self.lora.save(folder, merged=merged, is_main=self.is_main)
            return
        self.model.save_pretrained(folder)

    def load(self, folder: Path) -> None:
        opt = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=False)
        if self.lora is not None:  # the base weights never change: only the adapters were saved
            self.lora.load_adapters(folder / "model")
            self.optimizer.load_state_dict(opt["optimizer"])
            self.scheduler.load_state_dict(opt["scheduler"])
            return
        # from_pretrained undoes the key renaming save_pretrained applies (transformers 5 saves
        # "visual.*" for the module's "model.visual.*"), so load through it, then copy.
        saved = type(self.model).from_pretrained(folder / "model", dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(saved.state_dict())
        del saved
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])


def _skip_shm_comm_build() -> None:
    """On CPU, deepspeed.init_distributed JIT-compiles a shared-memory comm op (minutes on 2
    cores, per fresh venv) that gloo does not need; replace the builder with a no-op."""
    module = importlib.import_module("deepspeed.comm.torch")  # `import a.b.c as m` would bind torch
    module.build_shm_op = lambda: None


def deepspeed_config(cfg: TrainingConfig, world_size: int, hidden_size: int | None = None) -> dict:
    """Load the user's DeepSpeed JSON and fill in the batch sizes and clipping from the trainer's
    config, so the two never disagree. "auto" values and missing keys are filled; conflicting
    values raise. Bucket sizes marked "auto" follow the model width (as the HF integration does)."""
    ds = json.loads(Path(cfg.deepspeed).read_text())
    bf16 = ds.get("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    zero = ds.get("zero_optimization", {})
    h = hidden_size or 4096
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h)):
        if zero.get(key) == "auto":
            zero[key] = value
    wanted = {"train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
              "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
              "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size,
              "gradient_clipping": cfg.max_grad_norm or 0.0}
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ValueError(f"{cfg.deepspeed}: {key}={ds[key]} disagrees with the trainer config ({value}); "
                             f"set it to \"auto\" or remove it")
        ds[key] = value
    ds.setdefault("zero_force_ds_cpu_optimizer", False)  # allow a torch optimizer with offload
    return ds


class DeepSpeedEngine(TorchEngine):
    """ZeRO stage 0/1/2/3 from a JSON config; the reference model as a ZeRO-3 inference engine."""

    def __init__(self, module: torch.nn.Module, cfg: TrainingConfig, ref_module=None):
        import deepspeed
        init_distributed(always=True)
        install_rank_failure_hook()  # also when the caller set up the process group itself
        self.cfg, self.world_size, self.rank = cfg, dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0
        ds = deepspeed_config(cfg, self.world_size, _hidden_size(module))
        self.zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
        for m in (module, ref_module):  # ZeRO-3: the same module calls on every rank (each gathers)
            if m is not None:
                m.sync_vision = self.zero_stage == 3
        optimizer = torch.optim.AdamW(trainable(module), lr=cfg.learning_rate,
                                      betas=cfg.adam_betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        self.module, self.device = self.engine, self.engine.device
        self.ref_module = None
        if ref_module is not None and self.zero_stage != 3:
            # ZeRO-0/1/2 partition optimizer state, not weights: a frozen model needs none of it
            # (and DeepSpeed refuses stage 1/2 without an optimizer); each rank keeps a copy.
            self.ref_module = ref_module.to(self.device).eval()
        elif ref_module is not None:
            ref_ds = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
            ref_ds["zero_optimization"] = {**ds.get("zero_optimization", {})}
            ref_ds["zero_optimization"].pop("offload_optimizer", None)
            self.ref_module, *_ = deepspeed.initialize(model=ref_module, config=ref_ds)

    @property
    def model(self):
        return self.engine.module.model

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        # DeepSpeed does the boundary work (gradient reduction across ranks, offload copies)
        # inside backward(), so it must know which micro-batch is the step's last one before it.
        # The trainer's loss already carries the global normaliser: no division by the number
        # of micro-batches here (scale_wrt_gas=False).
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float | None:
        """Called once per optimizer step, after the last micro-batch's backward. ZeRO skips a
        step whose (all-reduced) grad norm is NaN/inf itself and flags ``overflow``; that flag,
        not the norm, says whether the parameters moved."""
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        self.engine.set_gradient_accumulation_boundary(False)
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = bool(getattr(self.engine.optimizer, "overflow", False))
        return None if skipped or (not math.isfinite(norm) and self.cfg.skip_nonfinite_steps) else norm

    def discard_step(self) -> None:
        """What the ZeRO optimizers do themselves on overflow: drop the accumulated (partitioned)
        gradients and restart accumulation, so the next step's first backward overwrites them."""
        opt = self.engine.optimizer
        if hasattr(opt, "_overflow_clean_up"):            # ZeRO-3
            opt._overflow_clean_up(getattr(opt, "loss_scale", 1.0))
        else:                                             # ZeRO-0/1/2
            opt.zero_grad(set_to_none=True)
            if getattr(opt, "cpu_offload", False):
                opt.reset_cpu_buffers()
            for k in list(getattr(opt, "averaged_gradients", {}) or {}):
                opt.averaged_gradients[k] = None
        self.engine.set_gradient_accumulation_boundary(False)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @contextlib.contextmanager
    def generation_model(self):
        """Under ZeRO-3, gather every parameter once and lift DeepSpeed's per-module hooks from the
        Hugging Face model for the rollout, so ``generate`` does not re-gather each layer at every
        token; the parameter-fetch trace survives (``zero3_hooks_lifted``)."""
        if self.zero_stage != 3:
            yield self.model
            return
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
            with zero3_hooks_lifted(self.engine.optimizer.parameter_offload, self.model):
                yield self.model

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        dist.barrier()

    def all_gather_objects(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def save(self, folder: Path) -> None:
        # LoRA: the frozen base weights are not written (a resumed run loads them as it started)
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state",
                                    exclude_frozen_parameters=self.lora is not None)
        self.save_model(folder / "model")

    def save_model(self, folder: Path, merged: bool = False) -> None:
        if self.lora is not None:  # gathers what it reads under ZeRO-3 (a collective: all ranks)
            self.lora.save(folder, merged=merged, is_main=self.is_main)
        elif self.zero_stage == 3:  # gather the partitioned weights (a collective: all ranks)
            state = self.engine._zero3_consolidated_16bit_state_dict()
            if self.is_main:
                self.model.save_pretrained(folder, state_dict={k[len("model."):]: v for k, v in state.items()})
        elif self.is_main:
            self.model.save_pretrained(folder)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state",
                                              load_module_strict=self.lora is None)
        if path is None:
            raise RuntimeError(f"{folder}/deepspeed: DeepSpeed found no checkpoint to load")


@contextlib.contextmanager
def zero3_hooks_lifted(offload, model: torch.nn.Module):
    """Take DeepSpeed ZeRO-3's per-module fetch/release hooks off ``model`` (the engine's module or
    a sub-module of it) for the body, then put them back as they were.

    ``offload`` is the engine's ``DeepSpeedZeRoOffload``. Its parameter coordinator records the
    order in which modules fetch their parameters during a forward and backward (the trace); once
    the trace is complete it gathers the next modules' parameters ahead of use (prefetch), and a
    forward pre-hook on the engine's module restarts the trace's step counter at every forward
    (``setup_zero_stage3_hooks``). What this keeps, and the previous version lost (issue 15):

    * the engine's module keeps its hooks, the per-forward reset among them, since only
      ``model``'s modules lose theirs (``generate`` runs ``model``, never the engine's module).
      ``_remove_module_hooks`` also removed the reset hook and nothing put it back: the trace
      stayed invalid from the first rollout on and every later forward and backward gathered
      each module's parameters on demand, with nothing prefetched.
    * the modules' ``ds_id``s, by which the trace knows them: re-registration numbers modules
      from a counter; it restarts here at ``model``'s own id, where a plain re-registration
      continues a process-wide one. So the trace stays complete across rounds. DeepSpeed drops
      the trace itself when the engine's module is re-registered (``model`` being that module),
      and so does this function should the ids differ anyway; either way it is recorded again
      over the next forward and backward.
    * DeepSpeed's hook lists hold only live handles (they grew by a full set per round)."""
    modules = list(model.modules())
    ids = [getattr(m, "ds_id", None) for m in modules]  # below a ZeRO-3 leaf module there are none
    if ids[0] is None:  # inside a ZeRO-3 leaf module: DeepSpeed hooked none of these modules
        yield model
        return
    owned = {id(d) for m in modules for d in (m._forward_pre_hooks, m._forward_hooks)}

    def on_model(handle) -> bool:
        hooks = handle.hooks_dict_ref()
        return hooks is not None and id(hooks) in owned

    for name in ("forward_hooks", "backward_hooks"):
        handles = getattr(offload, name)
        for handle in handles:
            if on_model(handle):
                handle.remove()
        setattr(offload, name, [h for h in handles if not on_model(h)])
    try:
        yield model
    finally:
        offload._register_deepspeed_module(model, count=[ids[0]])
        coordinator = offload.get_param_coordinator()
        if [getattr(m, "ds_id", None) for m in modules] != ids and not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()
        _forget_stale_release_plans(coordinator)


def _forget_stale_release_plans(coordinator) -> None:
    """Work around a DeepSpeed memo that outlives the trace it was computed from.

    After each module, the coordinator releases the parameters that the rest of the trace does
    not use again soon (``__params_to_release``). DeepSpeed memoises that answer with
    ``functools.lru_cache`` per (coordinator, module, step) and never forgets it when the trace is
    recorded again. In GRPO with mu > 1 the first trace is a forward-only one (the no-grad pass
    that stores the old log-probs); the forward-and-backward trace that replaces it keeps the
    memo's "not used again": every forward then releases the parameters its backward needs, and
    the backward gathers them again, module by module, on demand. Called after each rollout:
    when the complete trace is not the one seen last time, drop the memo (recomputed on the
    next step, once per module). Nothing happens if DeepSpeed renames these internals."""
    trace = getattr(coordinator, "_PartitionedParameterCoordinator__submodule_order", None)
    if trace is None or not coordinator.is_complete_trace() or getattr(coordinator, "_grpo_planned_for", None) is trace:
        return
    method = getattr(type(coordinator), "_PartitionedParameterCoordinator__params_to_release", None)
    for cache in [method, *(c.cell_contents for c in getattr(method, "__closure__", None) or ())]:
        if callable(getattr(cache, "cache_clear", None)):
            cache.cache_clear()  # one memo for every coordinator in the process: only recomputation
            coordinator._grpo_planned_for = trace
            return


def _hidden_size(module) -> int | None:
    config = getattr(getattr(module, "model", module), "config", None)
    text = getattr(config, "text_config", config)
    return getattr(text, "hidden_size", None)


def make_engine(module, cfg: TrainingConfig, ref_module=None) -> TorchEngine:
    if cfg.deepspeed:
        return DeepSpeedEngine(module, cfg, ref_module)
    return TorchEngine(module, cfg, ref_module)
