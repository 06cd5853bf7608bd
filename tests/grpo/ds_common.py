"""Pieces shared by the 1-process and 2-process runs of the DeepSpeed tests."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from grpo import GRPOConfig
from grpo.rollout import Completions, mask_after_eos
from rewards import Reward

ZERO3_TEST_CONFIG = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,  # partition tiny params
                          "reduce_bucket_size": 100000, "stage3_prefetch_bucket_size": 100000},
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto", "gradient_clipping": "auto", "steps_per_print": 1000000,
}


# The fixed-batch comparison: token-level loss (non-zero even at ratio 1), a reference model,
# and mu = 2 so the second pass uses stored old log-probs with ratios != 1.
FIXED_BATCH = dict(prompts_per_step=2, loss_type="dapo", beta=0.04, num_iterations=2, max_steps=4)


# The same comparison under ZeRO-2 and ZeRO-3 with the optimizer offloaded (the paper's set-up):
# both reduce gradients inside backward() at the accumulation boundary, which the trainer must
# announce before the step's last micro-batch.
VARIANTS = {
    "zero3": ZERO3_TEST_CONFIG,
    "zero2": {**ZERO3_TEST_CONFIG, "zero_optimization": {"stage": 2, "reduce_bucket_size": 100000}},
    "zero3_offload": {**ZERO3_TEST_CONFIG, "zero_optimization": {
        **ZERO3_TEST_CONFIG["zero_optimization"], "offload_optimizer": {"device": "cpu", "pin_memory": False}}},
}


def write_ds_config(folder):
    for name, cfg in VARIANTS.items():
        with open(os.path.join(folder, f"ds_{name}.json"), "w") as f:
            json.dump(cfg, f)
    return os.path.join(folder, "ds_zero3.json")


class LengthReward(Reward):
    """A dense, deterministic reward: how close the completion is to 12 characters."""
    name = "length"

    def score(self, sample):
        return max(0.0, 1.0 - abs(len(sample.completion) - 12) / 12)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script: str, out, ckpt, timeout: int = 600) -> list[dict]:
    """Run ``tests/grpo/<script> OUT CKPT`` as 2 processes under torchrun (gloo, CPU DeepSpeed, a
    fresh DeepSpeed config in ``out``) and return each rank's ``rank<r>.json``; the test fails with
    the job's output when it exits non-zero."""
    import pytest
    root = Path(__file__).resolve().parents[2]
    write_ds_config(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(root),
           "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(root / "tests" / "grpo" / script), str(out), str(ckpt)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"2-process job {script} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in (0, 1)]


def dataset(n=8, with_images=True):
    from PIL import Image
    items = []
    for i in range(n):
        colour = (40 * i % 256, 255 - 30 * i % 256, 90)
        content = ([{"type": "image"}] if with_images else []) + [{"type": "text", "text": f"Item {i}?"}]
        items.append({"id": f"q{i}", "messages": [{"role": "user", "content": content}],
                      "images": [Image.new("RGB", (56, 56), colour)] if with_images else [],
                      "question": f"Item {i}?", "answer": "A"})
    return items


class FixedSampler:
    """Completions that depend only on the prompt's tokens (not on RNG or batch layout), so a
    1-process and a 2-process run see the same global batch: a deterministic stand-in for
    sampling that isolates the update's equivalence."""

    def __call__(self, model, adapter, prompts, cfg, chunk=None):
        rows = []
        for r in range(len(prompts)):
            seed = int(prompts.input_ids[r][prompts.attention_mask[r].bool()].sum()) * 31 + r % cfg.num_generations
            g = torch.Generator().manual_seed(seed)
            length = 2 + int(torch.randint(0, cfg.max_completion_length - 1, (1,), generator=g))  # == max: truncated
            ids = torch.randint(100, 600, (cfg.max_completion_length,), generator=g)
            ids[length:] = adapter.eos_token_ids[0]
            rows.append(ids)
        ids = torch.stack(rows)
        mask, truncated = mask_after_eos(ids, adapter.eos_token_ids)
        return Completions(ids, mask, truncated)


class CountingSampler(FixedSampler):
    """A FixedSampler that counts generation calls (0 after a failed pre-flight = no rollout)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kw):
        self.calls += 1
        return super().__call__(*args, **kw)


def make_config(out, prompts_per_step: int = 2, **kw):
    """A small GRPOConfig; ``prompts_per_step`` (groups per process per step) sets
    gradient_accumulation_steps for the given per_device_train_batch_size (default 4)."""
    base = dict(num_generations=4, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                max_completion_length=8, beta=0.0, output_dir=out, disable_tqdm=True, seed=7)
    base.update(kw)
    base.setdefault("gradient_accumulation_steps",
                    max(1, prompts_per_step * base["num_generations"] // base["per_device_train_batch_size"]))
    return GRPOConfig(**base)


def tiny_model(ckpt):
    from models import ModelConfig, load_policy, load_processor
    tiny_model.processor = load_processor(ckpt)
    return load_policy(ModelConfig(str(ckpt), freeze_vision=True))


def gathered_params(model):
    return {n: p.detach().float().flatten()[:64].tolist() for n, p in model.named_parameters()}


class ZeroFetchProbe:
    """What DeepSpeed's ZeRO-3 parameter coordinator of a ``grpo.engine.DeepSpeedEngine`` does.

    ``trace()``: the coordinator's fetch-trace mode, "complete" (it prefetches the next modules'
    parameters from the recorded order), "record" (recording it during this forward/backward) or
    "invalid" (neither: every module fetches its own parameters on demand). ``counts``: cumulative
    counts of the coordinator's profiler events, with their element counts in ``numel``:
    ``{forward,backward}_fetch_submit`` (a module had to gather parameters nobody had prefetched:
    on demand, blocking), ``*_prefetch_submit`` (gathers issued ahead from the trace),
    ``*_all_gather`` (collectives issued, one per coalesced group), ``*_fetch_wait`` (module
    fetches), ``reset_step`` (the coordinator's per-forward reset, called by the hook on the
    engine's module) and ``trace_invalidated`` (a recorded trace dropped: a module came out of
    the recorded order, or DeepSpeed re-registered the engine's module). The events come from
    replacing the coordinator's private profiler, which DeepSpeed builds disabled; the assert
    makes a DeepSpeed rename fail loudly instead of counting zeros."""

    _PROFILER = "_PartitionedParameterCoordinator__profiler"

    def __init__(self, grpo_engine):
        import collections
        self.offload = grpo_engine.engine.optimizer.parameter_offload
        self.coord = self.offload.get_param_coordinator()
        assert hasattr(self.coord, self._PROFILER), "DeepSpeed renamed the coordinator's profiler"
        self.counts, self.numel = collections.Counter(), collections.Counter()
        setattr(self.coord, self._PROFILER, self)
        reset_step = self.coord.reset_step

        def counted_reset_step():
            self.counts["reset_step"] += 1
            reset_step()
        self.coord.reset_step = counted_reset_step  # the hook looks it up on the instance each time
        invalidate = self.coord._invalidate_trace

        def counted_invalidate():
            self.counts["trace_invalidated"] += 1
            invalidate()
        self.coord._invalidate_trace = counted_invalidate

    # the profiler's interface, as the coordinator calls it
    def start_event(self, name):
        pass

    def stop_event(self, name, num_elem):
        self.counts[name] += 1
        self.numel[name] += int(num_elem)

    def reset_events(self):
        pass

    def log_events(self):
        pass

    # readings
    def trace(self) -> str:
        c = self.coord
        return "complete" if c.is_complete_trace() else "record" if c.is_record_trace() else "invalid"

    def trace_length(self) -> int:
        """Modules in the recorded trace (forward, then backward)."""
        return len(getattr(self.coord, "_PartitionedParameterCoordinator__submodule_order"))

    def reset_hook_registered(self) -> bool:
        """Whether the engine's module still carries DeepSpeed's start-of-forward hook (the
        one that calls ``reset_step``; ``setup_zero_stage3_hooks``)."""
        return self.offload.fwd_pre_hook.id in self.offload.module._forward_pre_hooks

    def ds_ids(self) -> list:
        return [getattr(m, "ds_id", None) for m in self.offload.module.modules()]

    def hook_counts(self) -> tuple[int, int]:
        return len(self.offload.forward_hooks), len(self.offload.backward_hooks)

    def snapshot(self) -> dict:
        return {**self.counts, **{f"numel/{k}": v for k, v in self.numel.items()}}

    @staticmethod
    def delta(after: dict, before: dict) -> dict:
        return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
