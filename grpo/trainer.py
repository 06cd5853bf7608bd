"""GRPOTrainer: the GRPO loop, read top to bottom.

    for each step:
        rollout   prompts x G  --generate-->  completions (N = B*G rows)
        score     completions  --rewards-->   scores (N, R)  --weights-->  r (B, G)
        advantage r  --group_advantages-->  adv (B, G)   (computed over all ranks' groups)
        update    micro-batches: logp --grpo_token_loss--> per-token loss --aggregate--> backward
                  then one optimizer step (mu steps per generation batch)

The maths are the pure functions of ``grpo.core``; model specifics (prompt encoding, KV-cache prefill
and prefix reuse, the decode loop, hidden states of completions) sit behind ``models.adapter``; the
back-end (PyTorch or DeepSpeed) behind ``grpo.engine``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from models.adapter import PromptBatch
from rewards import score_all

from .base import BaseTrainer
from .config import GRPOConfig
from .core import aggregate_loss, combine_rewards, group_advantages, grpo_token_loss
from .metrics import AbstainGuard, truncate_jsonl
from .rollout import Completions, sample
from .samples import default_reward_sample


_ADV_METRIC_NAMES = {"reward_mean": "reward/mean", "reward_std": "reward/std",
                     "frac_zero_std_groups": "frac_zero_std_groups", "abstain_frac": "reward/abstain_frac"}


@dataclass
class Batch:
    """One generation round, per process. N = B*G rows; group g of prompt b is row b*G + g."""
    prompts: PromptBatch          # (N, P)
    completions: Completions      # ids, mask (N, T); truncated (N,)
    loss_mask: torch.Tensor       # (N, T): completion mask, minus truncated rows if masked
    advantages: torch.Tensor      # (N,)
    old_logp: torch.Tensor | None  # (N, T), None when mu = 1 (ratio is exactly 1 at the update)
    ref_logp: torch.Tensor | None  # (N, T), None when beta = 0
    num_tokens: float             # valid loss tokens over all ranks (global normaliser)
    num_sequences: float          # non-empty sequences over all ranks
    metrics: dict


class GRPOTrainer(BaseTrainer):
    """Group Relative Policy Optimization for vision-language models.

    model: a Hugging Face VLM (or a local checkpoint path); reward_funcs: ``rewards.Reward``
    instances; train_dataset: a sequence of ``data.VQARecord`` or dicts (see ``grpo.samples``);
    processor: the model's processor (``models.load_processor``). A reference model is kept only
    when ``args.beta > 0`` (the given ``ref_model``, else a frozen copy of the starting policy).
    """
    name = "GRPO"

    def __init__(self, model, reward_funcs, args: GRPOConfig = GRPOConfig(), train_dataset=None,
                 processor=None, ref_model=None, adapter=None, prompt_fn=None, reward_sample_fn=None):
        if not reward_funcs:
            raise ValueError("reward_funcs is empty: give at least one rewards.Reward")
        if args.reward_weights is not None and len(args.reward_weights) != len(reward_funcs):
            raise ValueError(f"reward_weights has {len(args.reward_weights)} entries for "
                             f"{len(reward_funcs)} reward functions; give one weight per reward")
        super().__init__(model, args, train_dataset, processor, ref_model, adapter, prompt_fn,
                         needs_ref=args.beta > 0)
        self.rewards = list(reward_funcs)
        self.reward_sample_fn = reward_sample_fn or default_reward_sample
        self.weights = torch.tensor(args.reward_weights or [r.weight for r in self.rewards], dtype=torch.float32)
        self._batch = None
        self.sampler = sample  # (model, adapter, prompts, cfg, chunk) -> Completions; swappable
        self._abstain = AbstainGuard([r.name for r in self.rewards], args.max_abstain_rate, args.abstain_window)
        self._completions_round = None  # first round this process logged (see _log_completions)

    def trainer_state(self) -> dict:
        return {**super().trainer_state(), "rewards": [r.name for r in self.rewards],
                "abstain_history": self._abstain.state()}

    def load_trainer_state(self, state: dict) -> None:
        super().load_trainer_state(state)
        self._abstain.load_state(state.get("abstain_history", {}))

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, round_idx: int) -> Batch:
        a, g = self.args, self.args.num_generations
        timings = {}
        t0 = time.perf_counter()
        items = self.items_for_round(round_idx, a.prompts_per_step)
        messages, images = zip(*(self.prompt_fn(it) for it in items))
        prompts = self.adapter.encode_prompts(list(messages), list(images)).repeat_interleave(g)
        prompts = prompts.to(self.engine.device)
        with self.engine.generation_model() as gen_model:
            comp = self.sampler(gen_model, self.adapter, prompts, a, chunk=a.generation_batch_size)
        texts = self.adapter.decode(comp.ids, comp.mask)
        timings["time/generate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        samples = [self.reward_sample_fn(items[i // g], text) for i, text in enumerate(texts)]
        scores, reward_metrics = score_all(self.rewards, samples)                   # (N, R)
        combined = combine_rewards(scores, self.weights)                            # (N,)
        everyone = self.engine.all_gather_cat(combined.to(self.engine.device)).cpu()  # (world*N,)
        adv_all, adv_metrics = group_advantages(everyone.view(-1, g), a.advantage_scale, a.advantage_eps)
        n = len(combined)
        adv = adv_all.reshape(-1)[self.engine.rank * n:(self.engine.rank + 1) * n]   # (N,)
        timings["time/reward"] = time.perf_counter() - t0

        loss_mask = comp.mask.clone()
        if a.mask_truncated_completions:
            loss_mask[comp.truncated] = 0
        t0 = time.perf_counter()
        old_logp = self._logprobs(self.engine.forward, prompts, comp) if a.num_iterations > 1 else None
        ref_logp = self._logprobs(self.engine.ref_forward, prompts, comp) if a.beta > 0 else None
        timings["time/logprobs"] = time.perf_counter() - t0
        counts = torch.stack([loss_mask.sum(), (loss_mask.sum(1) > 0).sum()]).float()   # one collective
        num_tokens, num_seqs = self.engine.all_reduce_sum(counts.to(self.engine.device)).tolist()
        adv_metrics = {_ADV_METRIC_NAMES[k]: float(v) for k, v in adv_metrics.items()}
        metrics = {**reward_metrics, **adv_metrics, **timings,
                   **self._rollout_metrics(scores, comp)}
        self._log_completions(round_idx, items, texts, combined)
        return Batch(prompts, comp, loss_mask, adv, old_logp, ref_logp, num_tokens, num_seqs, metrics)

    def _forward(self, fn, prompts: PromptBatch, comp: Completions, rows: list[int]):
        pb, ids, mask = prompts.select(rows), comp.ids[rows], comp.mask[rows]
        width = max(1, int(mask.sum(1).max()))  # drop columns that are padding in every row
        ids, mask = ids[:, :width], mask[:, :width]
        if pb.unique is not None and self.args.reuse_prompts:
            inputs = self.adapter.shared_forward_inputs(pb, mask)  # each distinct prompt run once
        else:
            inputs = self.adapter.forward_inputs(pb, ids, mask)
        logp, ent = fn(completion_ids=ids, temperature=self.args.temperature, **inputs)
        return logp, ent, width

    def _logprobs(self, fn, prompts: PromptBatch, comp: Completions) -> torch.Tensor:
        out = torch.zeros(comp.ids.shape, dtype=torch.float32, device=comp.ids.device)
        for rows in self.micro_batches(len(prompts)):
            logp, _, width = self._forward(fn, prompts, comp, rows)
            out[rows, :width] = logp.float()
        return out

    # ---------------------------------------------------------------- update
    def update(self, batch: Batch) -> dict:
        """One optimizer step over all micro-batches of ``batch``. A micro-batch whose loss is
        NaN/inf on any rank is never backpropagated (0 * NaN is still NaN): every rank drops the
        whole step's gradients instead, and the step is counted as skipped."""
        a, t0 = self.args, time.perf_counter()
        sums: dict[str, float] = {}
        finite = True
        micro = self.micro_batches(len(batch.prompts))
        for i, rows in enumerate(micro):
            logp, ent, w = self._forward(self.engine.forward, batch.prompts, batch.completions, rows)
            mask = batch.loss_mask[rows, :w]
            old = batch.old_logp[rows, :w] if batch.old_logp is not None else logp.detach()
            ref = batch.ref_logp[rows, :w] if batch.ref_logp is not None else None
            per_token, m = grpo_token_loss(
                logp, old, ref, batch.advantages[rows].to(logp), mask, beta=a.beta,
                eps_low=a.epsilon_low, eps_high=a.epsilon_high, dual_clip=a.dual_clip,
                ratio_level=a.ratio_level, kl_estimator=a.kl_estimator, kl_clamp=a.kl_clamp)
            # Global normalisers make micro-batch losses sum to the full-batch loss; x world size
            # undoes the gradient averaging of data parallelism (see core.aggregate_loss).
            loss = aggregate_loss(per_token, mask, a.loss_aggregation, num_tokens=batch.num_tokens,
                                  num_sequences=batch.num_sequences,
                                  max_completion_length=a.max_completion_length) * self.engine.world_size
            if self.engine.nonfinite_anywhere(loss):
                finite = False
                break
            self.engine.backward(loss, last=i == len(micro) - 1)
            share = len(rows) / len(batch.prompts)
            m = {**{k: float(v) for k, v in m.items()}, "loss": float(loss.detach()),  # x world: the mean over ranks is the global loss
                 "entropy": float((ent * mask).sum() / mask.sum().clamp(min=1))}
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + (v if k == "loss" else v * share)
        grad_norm = self.engine.step() if finite else self.engine.discard_step()
        if not finite:
            sums["loss"] = float("nan")  # logged as null: this step's loss was not usable
        sums.update(grad_norm=grad_norm if grad_norm is not None else float("nan"),
                    skipped_step=float(grad_norm is None), nonfinite_loss=float(not finite),
                    learning_rate=self.engine.lr())
        sums["time/update"] = time.perf_counter() - t0
        return sums

    # ---------------------------------------------------------------- loop
    def training_step(self, step: int) -> dict:
        """Generate a new batch every mu steps, then one optimizer step on it."""
        if self._batch is None or step % self.args.num_iterations == 0:
            self._batch = self.rollout(step // self.args.num_iterations)
            # Before the update: a run stopped for a dead judge has not trained on its absence.
            self._abstain.check(step + 1, self._batch.metrics)
        return {**self._batch.metrics, **self.update(self._batch)}

    def can_save(self, step: int) -> bool:
        # Only between generation rounds: a resumed run regenerates whole rounds.
        return step % self.args.num_iterations == 0

    def progress(self, metrics: dict) -> dict:
        return {"reward": f"{metrics['reward/mean']:.3f}", "kl": f"{metrics.get('kl_mean', 0):.4f}"}

    # ---------------------------------------------------------------- metrics
    def _rollout_metrics(self, scores: torch.Tensor, comp: Completions) -> dict:
        valid = ~torch.isnan(scores)
        # One gather of per-row stats (N, 2 + R) over all ranks; abstain rates are global so the
        # abstain guard stops every rank at the same step.
        rows = torch.cat([comp.lengths.float().unsqueeze(1).cpu(), comp.truncated.float().unsqueeze(1).cpu(),
                          (~valid).float()], 1)
        rows = self.engine.all_gather_cat(rows.to(self.engine.device)).cpu()
        lengths, trunc, abstained = rows[:, 0], rows[:, 1], rows[:, 2:]                      # (world*N, ...)
        out = {"completion/length_mean": float(lengths.mean()), "completion/length_min": float(lengths.min()),
               "completion/length_max": float(lengths.max()), "completion/truncated_frac": float(trunc.mean())}
        for j, r in enumerate(self.rewards):
            col = scores[valid[:, j], j]
            out[f"reward/{r.name}/std"] = float(col.std()) if len(col) > 1 else 0.0
            out[f"reward/{r.name}/abstain_rate"] = float(abstained[:, j].mean()) if len(abstained) else 0.0
        return out

    def _log_completions(self, round_idx, items, texts, rewards) -> None:
        k = self.args.log_completions
        if not k or not self.engine.is_main:
            return
        g, path = self.args.num_generations, self.output_dir / "completions.jsonl"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self._completions_round is None:
            # First round of this process (fresh, or resumed after a crash): drop lines of this and
            # later rounds, written by a killed run, so each round is logged exactly once.
            self._completions_round = round_idx
            truncate_jsonl(path, lambda obj: int(obj["round"]) < round_idx)
        with open(path, "a") as f:
            for i in range(min(k, len(texts))):
                item = items[i // g]
                f.write(json.dumps({"round": round_idx, "id": getattr(item, "id", None) or
                                    (item.get("id") if isinstance(item, dict) else None),
                                    "completion": texts[i], "reward": float(rewards[i])}) + "\n")

