"""What the GRPO and SFT trainers share: model loading, the back-end, data order, the pre-flight
check, the step loop, metrics logging, checkpoints and resume. A subclass implements
``training_step(step) -> metrics``."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.convert import as_records
from models.adapter import QwenVLAdapter

from . import checkpoint as ckpt
from .config import TrainingConfig
from .engine import deepspeed_config, init_distributed, make_engine
from .logprobs import CompletionLogProbs
from .reporting import Reporter, require_backends
from .samples import default_prompt


class PreflightError(RuntimeError):
    """A check run before the first rollout failed (``TrainingConfig.preflight``): the output
    folder, a reward or the judge would have failed the run later. The message lists every
    problem found, each naming the setting to fix."""


class BaseTrainer:
    name = "train"

    def __init__(self, model, args: TrainingConfig, train_dataset, processing_class=None, ref_model=None,
                 adapter=None, prompt_fn=None, needs_ref: bool = False, peft_config=None):
        # a Hugging Face datasets.Dataset goes through data's layouts (or is read row by row
        # when it already holds chat "messages" or TRL's "prompt"); lists of records or dicts pass unchanged
        train_dataset = as_records(train_dataset)
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        # max_steps = -1: num_train_epochs passes over the dataset, resolved here once (the LR
        # schedule, the loop and checkpoints then read args.max_steps); WORLD_SIZE is set by every
        # launcher (torchrun, deepspeed, accelerate) before this runs
        if args.max_steps < 0:
            args = args.replace(max_steps=args.steps_for(len(train_dataset), int(os.environ.get("WORLD_SIZE", 1))))
        self.args, self.dataset = args, train_dataset
        from models.loading import ModelConfig
        if isinstance(model, (str, Path)):
            model = ModelConfig(str(model))
        if isinstance(model, ModelConfig):  # loaded here, partitioned from the start under ZeRO-3
            model, processing_class, ref_model = self._load(model, processing_class, ref_model,
                                                            needs_ref and peft_config is None)
        if processing_class is None and adapter is None:
            raise ValueError("pass processing_class= (models.load_processor(path)) or adapter=")
        self.adapter = adapter or QwenVLAdapter(processing_class)
        self.prompt_fn = prompt_fn or default_prompt
        # LoRA (models.lora, peft imported only then): adapters injected in place, the rest frozen;
        # without ref_model the reference is this network with its adapters disabled, not a copy
        self.lora = None
        if peft_config is not None:
            from models.lora import LoraPolicy
            cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=cuda):  # adapters from args.seed; the run's RNG untouched
                torch.manual_seed(args.seed)
                self.lora = LoraPolicy(model, peft_config, needs_reference=needs_ref and ref_model is None)
        if needs_ref and ref_model is None and self.lora is None:
            import copy
            ref_model = copy.deepcopy(model).requires_grad_(False).eval()  # the starting policy
        torch.manual_seed(args.seed)
        ref = (CompletionLogProbs(ref_model, self.adapter, args.logprob_chunk_size)
               if needs_ref and ref_model is not None else None)
        self.engine = make_engine(CompletionLogProbs(model, self.adapter, args.logprob_chunk_size), args, ref)
        # Each rank samples from its own stream, seed + rank (as TRL / accelerate's device-specific
        # seeding), so sampling noise is not correlated across ranks; rank 0 of a run keeps the
        # run seed. Checkpoints save and restore every rank's RNG state, so a resume stays exact.
        self.sampling_seed = args.seed + self.engine.rank
        torch.manual_seed(self.sampling_seed)
        if self.lora is not None:
            self.engine.lora = self.lora  # saves and checkpoints hold the adapters
            if needs_ref and ref is None:
                self.engine.ref_module = self.lora.reference(self.engine.forward)
        self.output_dir = Path(args.output_dir)
        self.step = 0
        self.skipped_steps = 0  # optimizer steps not applied (non-finite loss or gradients), cumulative

    def _load(self, cfg, processor, ref_model, needs_ref: bool):
        from models.loading import load_policy, load_processor, load_reference
        path, keep_alive = cfg.path, None
        if self.args.deepspeed:
            ds = json.loads(Path(self.args.deepspeed).read_text())
            if ds.get("zero_optimization", {}).get("stage") == 3:
                # ZeRO-3 models must be built partitioned: HfDeepSpeedConfig, alive while loading.
                import torch.distributed as dist
                from transformers import AutoConfig
                from transformers.integrations import HfDeepSpeedConfig
                init_distributed(always=True)  # zero.Init partitions over the process group
                world = dist.get_world_size()
                hidden = getattr(AutoConfig.from_pretrained(path).text_config, "hidden_size", None)
                keep_alive = HfDeepSpeedConfig(deepspeed_config(self.args, world, hidden))
        model = load_policy(cfg)
        if ref_model is None and needs_ref:
            ref_model = load_reference(cfg)
        del keep_alive
        return model, processor or load_processor(path, cfg.min_pixels, cfg.max_pixels), ref_model

    # ---------------------------------------------------------------- data order
    def items_for_round(self, round_idx: int, per_rank: int) -> list:
        """This rank's ``per_rank`` items for round ``round_idx``: a seeded permutation per epoch,
        sharded by rank. Stateless in the round index, so resuming needs no sampler state."""
        world, rank, n = self.engine.world_size, self.engine.rank, len(self.dataset)
        out, perms = [], {}
        for j in range(per_rank):
            epoch, pos = divmod((round_idx * world + rank) * per_rank + j, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed + epoch))
            out.append(self.dataset[int(perms[epoch][pos])])
        return out

    def micro_batches(self, n: int) -> list[list[int]]:
        """Row indices of each micro-batch of an n-row step batch."""
        size = self.args.per_device_train_batch_size
        return [list(range(s, min(s + size, n))) for s in range(0, n, size)]

    # ---------------------------------------------------------------- loop
    def training_step(self, step: int) -> dict:
        raise NotImplementedError

    def can_save(self, step: int) -> bool:
        return True

    def progress(self, metrics: dict) -> dict:
        return {"loss": f"{metrics.get('loss', float('nan')):.4f}"}

    def train(self) -> list[dict]:
        a = self.args
        require_backends(a.report_to)  # a missing tensorboard/wandb stops every rank before any work
        start = self._resume()
        if a.preflight and start < a.max_steps:
            self.preflight()
        # metrics.jsonl + report_to's backends (grpo.reporting), written by the main process only
        self.reporter = Reporter(self.output_dir, a.report_to, config=a, resume_step=start if start else None,
                                 enabled=self.engine.is_main)
        history, failed = [], True
        try:
            bar = tqdm(range(start, a.max_steps), initial=start, total=a.max_steps, desc=self.name,
                       disable=a.disable_tqdm or not self.engine.is_main)
            for step in bar:
                t0 = time.perf_counter()
                metrics = self.mean_over_ranks(self.training_step(step))
                metrics["time/step"] = time.perf_counter() - t0
                self.skipped_steps += int(metrics.get("skipped_step", 0.0) > 0)
                metrics["skipped_steps"] = float(self.skipped_steps)
                self.step = step + 1
                history.append(metrics)
                if self.step % a.logging_steps == 0 or self.step == a.max_steps:
                    self.reporter.log_metrics(self.step, metrics)
                bar.set_postfix(**self.progress(metrics))
                periodic = a.save_steps and self.step % a.save_steps == 0
                if self.can_save(self.step) and (periodic or self.step == a.max_steps):
                    self.save()
            failed = False
        finally:  # flush and close the writers, also when a step raised (W&B marks the run failed)
            self.reporter.close(failed=failed)
        return history

    # ---------------------------------------------------------------- pre-flight
    def preflight(self) -> None:
        """Check, before the first rollout, what would otherwise fail the run minutes or hours in
        (see :meth:`preflight_problems`); raise :class:`PreflightError` listing every problem.

        Runs on every start, a resume included (after a crash, the disk or the judge is what to
        check), after the checkpoint is loaded. Every rank checks; the ranks exchange their
        problems, so all of them raise together (none is left waiting in a collective). The RNG
        states are restored afterwards: the check never changes what the run samples."""
        rng = ckpt.rng_state()
        try:
            problems = self.preflight_problems()
        except Exception as err:  # a bug in a check must not leave the other ranks waiting below
            problems = [f"the pre-flight check itself failed: {type(err).__name__}: {err}"]
        finally:
            ckpt.set_rng_state(rng)
        everyone = self.engine.all_gather_objects(problems)
        ranks_of: dict[str, list[int]] = {}
        for rank, found in enumerate(everyone):
            for p in found:
                ranks_of.setdefault(p, []).append(rank)
        if not ranks_of:
            return
        world = len(everyone)
        lines = [p + (f" [rank {', '.join(map(str, r))}]" if world > 1 and len(r) < world else "")
                 for p, r in ranks_of.items()]
        raise PreflightError(f"{type(self).__name__}: the pre-flight check found {len(lines)} problem(s) before "
                             f"the first rollout (TrainingConfig.preflight=False skips the check):\n  - "
                             + "\n  - ".join(lines))

    def preflight_problems(self) -> list[str]:
        """This rank's problems (each naming the field to fix); the base trainer checks that
        ``output_dir`` is writable and has room for one checkpoint (estimated by
        :func:`grpo.checkpoint.estimate_checkpoint_bytes`: weights + Adam state + a margin)."""
        need, how = ckpt.estimate_checkpoint_bytes(self.engine.model, deepspeed=bool(self.args.deepspeed))
        return ckpt.output_dir_problems(self.output_dir, need, how)

    def trainer_state(self) -> dict:
        """What a checkpoint records besides weights, optimizer and RNG (JSON; no secrets: the
        config holds only the names of the environment variables that hold keys)."""
        return {"step": self.step, "config": asdict(self.args), "world_size": self.engine.world_size,
                "skipped_steps": self.skipped_steps}

    def load_trainer_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.engine, self.output_dir, self.step, self.trainer_state(),
                                    self.args.save_total_limit)

    def _resume(self) -> int:
        where = self.args.resume_from_checkpoint
        if where is None:
            return 0
        folder = ckpt.latest_checkpoint(self.output_dir) if where == "auto" else Path(where)
        if folder is None:
            if ckpt.list_checkpoints(self.output_dir):
                # Starting over would silently discard the run; make the user decide.
                raise RuntimeError(f"{self.output_dir}: no checkpoint-<step> folder verifies (see the "
                                   f"warnings above). Delete the corrupt ones to resume from an older "
                                   f"one, or set resume_from_checkpoint=None to start over")
            return 0
        state = ckpt.load_checkpoint(self.engine, folder)  # verifies the sha256 manifest first
        if state["world_size"] != self.engine.world_size:
            raise RuntimeError(f"{folder} was written by {state['world_size']} processes, this run has "
                               f"{self.engine.world_size}: the data order would differ")
        self.load_trainer_state(state)
        return self.step

    def mean_over_ranks(self, metrics: dict) -> dict:
        if self.engine.world_size == 1:
            return metrics
        # Ranks may hold different keys (e.g. judge/fail/<reason> only where a failure happened):
        # reduce over the union of keys, each averaged over the ranks that have a finite value.
        keys = sorted(set().union(*self.engine.all_gather_objects(sorted(metrics))))
        vals = torch.tensor([float(metrics.get(k, float("nan"))) for k in keys], dtype=torch.float64)
        have = torch.isfinite(vals)
        both = torch.stack([torch.where(have, vals, torch.zeros_like(vals)), have.double()]).to(self.engine.device)
        total, count = self.engine.all_reduce_sum(both).cpu()
        mean = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
        return dict(zip(keys, mean.tolist()))

    def save_model(self, folder: str | Path, merged: bool = False) -> Path:
        """The trained policy as a plain Hugging Face folder (weights, tokenizer, image processor).
        With ``peft_config`` (LoRA): the adapters (``adapter_config.json``,
        ``adapter_model.safetensors``: ``peft.PeftModel.from_pretrained(base, folder)``), or with
        ``merged=True`` the model with its adapters merged in, a plain folder that
        ``models.load_policy`` and ``grpo.evaluate`` use like any checkpoint. Without LoRA the
        folder is plain either way."""
        folder = Path(folder)
        self.engine.save_model(folder, merged=merged)
        if self.engine.is_main:
            # tokenizer and image processor saved separately: load_processor reads them that way,
            # like the files of a released checkpoint
            self.adapter.tokenizer.save_pretrained(folder)
            self.adapter.processor.image_processor.save_pretrained(folder)
        self.engine.barrier()
        return folder
