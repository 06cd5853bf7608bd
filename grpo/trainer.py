"""GRPOTrainer: the GRPO loop, read top to bottom.

    for each step:
        rollout   prompts x G  --generate-->  completions (N = B*G rows)
        score     completions  --rewards-->   scores (N, R)  --aggregate_rewards-->  r (B, G)
                  [dynamic sampling: drop groups with zero reward spread, generate more prompts,
                   refill to B groups; every rank the same number of extra rounds]
        advantage r  --group_advantages-->  adv (B, G)   (computed over all ranks' groups)
                  [top_entropy_quantile < 1: the policy-gradient token mask, from the batch's entropies]
        update    micro-batches: logp --grpo_token_loss--> per-token loss --aggregate--> backward
                  then one optimizer step (mu steps per generation batch)

The maths are the pure functions of ``grpo.core``; model specifics (prompt encoding, KV-cache prefill
and prefix reuse, the decode loop, hidden states of completions) sit behind ``models.adapter``; the
back-end (PyTorch or DeepSpeed) behind ``grpo.engine``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch

from models.adapter import PromptBatch
from rewards import RewardSample, TrainerState, as_rewards, score_all
from rewards.functions import COMPLETION_IDS, PROMPT, TRAINER_STATE
from rewards.runner import preflight_problems

from .base import BaseTrainer
from .config import GRPOConfig
from rewards.overlong import COMPLETION_TOKENS, MAX_COMPLETION_LENGTH, TRUNCATED

from .core import (LOSS_TYPES, lookup, advantage_contributions, advantage_shares, aggregate_loss, aggregate_rewards, combine_rewards,
                   entropy_threshold, group_advantages, grpo_token_loss, high_entropy_mask, nan_mean_std,
                   zero_std_groups)
from .metrics import AbstainGuard, truncate_jsonl
from .rollout import Completions, sample, sample_informative_groups
from .samples import default_reward_sample, reward_field_problems


log = logging.getLogger("grpo")
_LOSS_METRIC_NAMES = {"entropy_bonus": "entropy/bonus"}
_ADV_METRIC_NAMES = {"frac_zero_std_groups": "frac_zero_std_groups", "abstain_frac": "reward/abstain_frac"}
# Resample stream of dynamic sampling: permutations seeded apart from items_for_round's (seed + epoch).
_RESAMPLE_SEED_OFFSET = 1 << 32
# The completion the pre-flight check scores: the paper's format, answering with the reference.
PREFLIGHT_COMPLETION = "<think>A pre-flight check of the reward functions.</think><answer>{answer}</answer>"


@dataclass
class Generated:
    """One generation attempt on this process: ``len(items)`` groups of G rows."""
    items: list
    messages: list
    images: list
    prompts: PromptBatch          # (n, P), each prompt repeated G times
    completions: Completions      # (n, T)
    texts: list[str]              # (n,)
    scores: torch.Tensor          # (n, R), NaN = abstained
    reward_metrics: dict


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
    scores: torch.Tensor | None = None   # (N, R) this process's raw rewards, NaN = abstained
    pg_mask: torch.Tensor | None = None  # (N, T) tokens that get the policy gradient; None = all (loss_mask)


class GRPOTrainer(BaseTrainer):
    """Group Relative Policy Optimization for vision-language models.

    model: a Hugging Face VLM (or a local checkpoint path); reward_funcs: ``rewards.Reward``
    instances and/or plain functions ``f(prompts, completions, **columns) -> list[float | None]``
    (TRL's reward functions, wrapped in ``rewards.FunctionReward``); train_dataset: a sequence of
    ``data.VQARecord`` or dicts, TRL's ``prompt``/``image`` rows included (see ``grpo.samples``), or
    a ``datasets.Dataset``; processing_class: the model's processor (``models.load_processor``).
    A reference model is kept only when ``args.beta > 0`` (the given ``ref_model``, else a frozen
    copy of the starting policy). peft_config: a ``peft.LoraConfig``: only LoRA adapters train
    (``models.lora``) and the reference is the same network with its adapters disabled (no copy).
    """
    name = "GRPO"

    def __init__(self, model, reward_funcs, args: GRPOConfig = GRPOConfig(), train_dataset=None,
                 processing_class=None, ref_model=None, adapter=None, prompt_fn=None, reward_sample_fn=None,
                 peft_config=None):
        if not reward_funcs:
            raise ValueError("reward_funcs is empty: give at least one rewards.Reward or reward function")
        reward_funcs = as_rewards(reward_funcs)  # plain functions -> rewards.FunctionReward
        if args.reward_weights is not None and len(args.reward_weights) != len(reward_funcs):
            raise ValueError(f"reward_weights has {len(args.reward_weights)} entries for "
                             f"{len(reward_funcs)} reward functions; give one weight per reward")
        super().__init__(model, args, train_dataset, processing_class, ref_model, adapter, prompt_fn,
                         needs_ref=args.beta > 0, peft_config=peft_config)
        self.rewards = list(reward_funcs)
        if reward_sample_fn is None and (problems := reward_field_problems(self.dataset[0], self.rewards)):
            raise ValueError("; ".join(problems))
        self.reward_sample_fn = reward_sample_fn or default_reward_sample
        self.weights = torch.tensor(args.reward_weights or [r.weight for r in self.rewards], dtype=torch.float32)
        self._batch = None
        self.sampler = sample  # (model, adapter, prompts, cfg, chunk) -> Completions; swappable
        self._abstain = AbstainGuard([r.name for r in self.rewards], args.max_abstain_rate, args.abstain_window)
        self._completions_round = None  # first round this process logged (see _log_completions)

    def trainer_state(self) -> dict:
        # Each rank's rewards keep their own state (each rank has its own judge client and
        # ledger): gathered here (every rank saves), restored per rank by load_trainer_state.
        mine = {r.name: state for r in self.rewards if (state := r.state_dict())}
        return {**super().trainer_state(), "rewards": [r.name for r in self.rewards],
                "abstain_history": self._abstain.state(),
                "reward_state": self.engine.all_gather_objects(mine)}

    def load_trainer_state(self, state: dict) -> None:
        super().load_trainer_state(state)
        self._abstain.load_state(state.get("abstain_history", {}))
        per_rank = state.get("reward_state") or []
        mine = per_rank[self.engine.rank] if len(per_rank) == self.engine.world_size else {}
        for reward in self.rewards:
            if reward.name in mine:
                reward.load_state_dict(mine[reward.name])

    # ---------------------------------------------------------------- pre-flight
    def preflight_problems(self) -> list[str]:
        """The output folder (see ``BaseTrainer``), then every reward on one sample built from
        the first dataset item with :data:`PREFLIGHT_COMPLETION` (``Reward.preflight``: by
        default ``score_batch``; ``ProcessReward`` sends one real judge request)."""
        problems = super().preflight_problems()
        try:
            sample = self.preflight_sample()
        except Exception as err:
            return problems + [f"reward_sample_fn(train_dataset[0], completion) raised {type(err).__name__}: "
                               f"{err}; the rewards could not be checked"]
        return problems + preflight_problems(self.rewards, sample)

    def preflight_sample(self) -> RewardSample:
        """What the rewards see for a placeholder completion of the first dataset item, with the
        token-count fields the trainer adds to every sample."""
        a = self.args
        answer = self.reward_sample_fn(self.dataset[0], "").answer
        sample = self.reward_sample_fn(self.dataset[0], PREFLIGHT_COMPLETION.format(answer=answer or ""))
        try:
            ids = self.adapter.tokenizer(sample.completion, add_special_tokens=False)["input_ids"]
            ids = list(ids) + list(self.adapter.eos_token_ids[:1])
        except Exception:  # an adapter without a tokenizer: a rough count is enough here
            ids = [0] * (len(sample.completion.split()) + 1)
        tokens = len(ids)
        sample.extra = {PROMPT: self.prompt_fn(self.dataset[0])[0], **sample.extra,
                        COMPLETION_TOKENS: min(tokens, a.max_completion_length),
                        MAX_COMPLETION_LENGTH: a.max_completion_length, TRUNCATED: tokens > a.max_completion_length,
                        COMPLETION_IDS: ids[:a.max_completion_length],
                        TRAINER_STATE: TrainerState(global_step=self.step, max_steps=a.max_steps)}
        return sample

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, round_idx: int) -> Batch:
        a, g, b = self.args, self.args.num_generations, self.args.prompts_per_step
        timings = {"time/generate": 0.0, "time/reward": 0.0}
        attempts: list[Generated] = []

        def attempt(k: int) -> torch.Tensor:  # generate + score; (b,) True = the group has reward spread
            items = self.items_for_round(round_idx, b) if k == 0 else self.resample_items(round_idx, k, b)
            attempts.append(self._generate_and_score(items, timings))
            combined, _ = aggregate_rewards(attempts[-1].scores.view(b, g, -1), self.weights,
                                            a.multi_objective_aggregation, a.advantage_eps)
            return ~zero_std_groups(combined)

        ds_metrics = {}
        if a.dynamic_sampling:
            picks, stats = sample_informative_groups(attempt, b, a.max_resample_rounds, self._all_reduce_sum)
            ds_metrics = {f"dynamic_sampling/{k}": v for k, v in stats.items()}
            if stats["filled_frac"] > 0:
                log.warning("round %d: %d of %d groups have zero reward spread after %d extra generation "
                            "round(s) (max_resample_rounds=%d); they fill the batch with advantage 0",
                            round_idx, round(stats["filled_frac"] * b), b, int(stats["extra_rounds"]),
                            a.max_resample_rounds)
        else:
            attempt(0)
            picks = [(0, j) for j in range(b)]
        gen = self._assemble(attempts, picks)
        items, prompts, comp, texts, scores = gen.items, gen.prompts, gen.completions, gen.texts, gen.scores

        t0 = time.perf_counter()
        everyone = self.engine.all_gather_cat(scores.to(self.engine.device)).cpu()    # (world*N, R)
        combined, terms = aggregate_rewards(everyone.view(-1, g, everyone.shape[1]), self.weights,
                                            a.multi_objective_aggregation, a.advantage_eps)    # (world*B, G), (.., R)
        adv_all, adv_metrics = group_advantages(combined, a.scale_rewards, a.advantage_eps)
        shares = advantage_shares(advantage_contributions(terms, a.scale_rewards, a.advantage_eps))  # (R,)
        raw = combine_rewards(everyone, self.weights)        # the weighted reward sum, whatever the aggregation
        raw_mean, raw_std = nan_mean_std(raw)
        n = len(scores)
        adv = adv_all.reshape(-1)[self.engine.rank * n:(self.engine.rank + 1) * n]    # (N,)
        timings["time/reward"] += time.perf_counter() - t0

        loss_mask = comp.mask.clone()
        if a.mask_truncated_completions:
            loss_mask[comp.truncated] = 0
        t0 = time.perf_counter()
        old_logp = old_ent = None
        if a.num_iterations > 1:
            old_logp, old_ent = self._logprobs(self.engine.forward, prompts, comp)
        ref_logp = self._logprobs(self.engine.ref_forward, prompts, comp)[0] if a.beta > 0 else None
        pg_mask, ent_metrics = None, {}
        if a.top_entropy_quantile < 1.0:
            if old_ent is None:  # mu = 1: one no-grad pass of the policy for the entropies
                old_ent = self._logprobs(self.engine.forward, prompts, comp)[1]
            pg_mask, ent_metrics = self._high_entropy_tokens(old_ent, loss_mask)
        timings["time/logprobs"] = time.perf_counter() - t0
        counts = torch.stack([loss_mask.sum(), (loss_mask.sum(1) > 0).sum()]).float()   # one collective
        num_tokens, num_seqs = self.engine.all_reduce_sum(counts.to(self.engine.device)).tolist()
        adv_metrics = {_ADV_METRIC_NAMES[k]: float(v) for k, v in adv_metrics.items() if k in _ADV_METRIC_NAMES}
        adv_metrics.update({"reward/mean": float(raw_mean), "reward/std": float(raw_std)})
        share_metrics = {f"advantage_share/{r.name}": float(v) for r, v in zip(self.rewards, shares)}
        metrics = {**gen.reward_metrics, **adv_metrics, **share_metrics, **ds_metrics, **ent_metrics, **timings,
                   **self._rollout_metrics(scores, comp)}
        self._log_completions(round_idx, items, texts, raw.view(-1)[self.engine.rank * n:(self.engine.rank + 1) * n],
                              scores=scores, advantages=adv, messages=gen.messages)
        return Batch(prompts, comp, loss_mask, adv, old_logp, ref_logp, num_tokens, num_seqs, metrics,
                     scores=scores, pg_mask=pg_mask)

    def resample_items(self, round_idx: int, attempt: int, per_rank: int) -> list:
        """This rank's items for extra generation attempt ``attempt`` (1..max_resample_rounds) of
        round ``round_idx`` (dynamic sampling). A second stream, like ``items_for_round``: seeded
        permutations per epoch (seeded apart from the main stream's), sharded by rank, a pure
        function of (round, attempt), so a resumed run draws the same prompts."""
        world, rank, n = self.engine.world_size, self.engine.rank, len(self.dataset)
        slot = round_idx * max(1, self.args.max_resample_rounds) + attempt - 1
        out, perms = [], {}
        for j in range(per_rank):
            epoch, pos = divmod((slot * world + rank) * per_rank + j, n)
            if epoch not in perms:
                seed = _RESAMPLE_SEED_OFFSET + self.args.seed + epoch
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            out.append(self.dataset[int(perms[epoch][pos])])
        return out

    def _all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.engine.all_reduce_sum(t.to(self.engine.device)).cpu()

    def _generate_and_score(self, items: list, timings: dict) -> Generated:
        a, g = self.args, self.args.num_generations
        t0 = time.perf_counter()
        messages, images = (list(x) for x in zip(*(self.prompt_fn(it) for it in items)))
        prompts = self.adapter.encode_prompts(messages, images).repeat_interleave(g).to(self.engine.device)
        with self.engine.generation_model() as gen_model:
            comp = self.sampler(gen_model, self.adapter, prompts, a, chunk=a.generation_chunk_size)
        texts = self.adapter.decode(comp.ids, comp.mask)
        timings["time/generate"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        lengths, truncated = comp.lengths.tolist(), comp.truncated.tolist()
        ids, kept = comp.ids.cpu(), comp.mask.cpu().bool()
        state = TrainerState(global_step=self.step, max_steps=a.max_steps)
        samples = []
        for i, text in enumerate(texts):
            s = self.reward_sample_fn(items[i // g], text)
            # token counts for length-based rewards (rewards.OverlongPenalty), and for plain reward
            # functions the prompt's messages (unless the sample has its own), the completion's ids
            # and the trainer state (rewards.FunctionReward); a fresh dict, since a
            # reward_sample_fn may share one ``extra`` between samples
            s.extra = {PROMPT: messages[i // g], **s.extra, COMPLETION_TOKENS: int(lengths[i]),
                       MAX_COMPLETION_LENGTH: a.max_completion_length, TRUNCATED: bool(truncated[i]),
                       COMPLETION_IDS: ids[i][kept[i]].tolist(), TRAINER_STATE: state}
            samples.append(s)
        scores, reward_metrics = score_all(self.rewards, samples)                   # (n, R)
        timings["time/reward"] += time.perf_counter() - t0
        return Generated(list(items), messages, images, prompts, comp, texts, scores, reward_metrics)

    def _assemble(self, attempts: list[Generated], picks: list[tuple[int, int]]) -> Generated:
        """The step's batch: groups ``picks`` (attempt, group) of the generation attempts."""
        g = self.args.num_generations
        first = attempts[0]
        if picks == [(0, j) for j in range(len(first.items))]:
            chosen = first  # the round's own prompts, as generated
        else:
            rows = [(k, j * g + i) for k, j in picks for i in range(g)]
            messages = [attempts[k].messages[j] for k, j in picks]
            images = [attempts[k].images[j] for k, j in picks]
            # Re-encoded (cheap next to generation), so that the batch's prompts are padded together.
            prompts = self.adapter.encode_prompts(messages, images).repeat_interleave(g).to(self.engine.device)
            width = max(attempts[k].completions.ids.shape[1] for k, _ in picks)

            def row(t, r, value):  # row r of t, right-padded to the batch's width
                return torch.nn.functional.pad(t[r], (0, width - t.shape[1]), value=value)
            comp = Completions(torch.stack([row(attempts[k].completions.ids, r, self.adapter.pad_token_id) for k, r in rows]),
                               torch.stack([row(attempts[k].completions.mask, r, 0) for k, r in rows]),
                               torch.stack([attempts[k].completions.truncated[r] for k, r in rows]))
            chosen = Generated([attempts[k].items[j] for k, j in picks], messages, images, prompts, comp,
                               [attempts[k].texts[r] for k, r in rows],
                               torch.stack([attempts[k].scores[r] for k, r in rows]), {})
        if len(attempts) == 1:
            return chosen
        # Judge ledgers are cumulative (the last attempt's are current); per-reward means are the batch's.
        metrics = dict(attempts[-1].reward_metrics)
        for j, reward in enumerate(self.rewards):
            col = chosen.scores[:, j]
            kept = col[~torch.isnan(col)]
            metrics[f"reward/{reward.name}/mean"] = float(kept.mean()) if len(kept) else float("nan")
            metrics[f"reward/{reward.name}/abstain_rate"] = 1.0 - len(kept) / max(1, len(col))
        chosen.reward_metrics = metrics
        return chosen

    def _high_entropy_tokens(self, entropy: torch.Tensor, loss_mask: torch.Tensor):
        """(N, T) sampling-policy entropies -> (pg_mask (N, T) bool, metrics): the top
        ``top_entropy_quantile`` of the valid tokens of the whole step batch (all micro-batches,
        all ranks), so the selection does not depend on how the batch is split."""
        a = self.args
        valid, ent = loss_mask.bool().cpu(), entropy.float().cpu()
        mine = torch.full((len(ent), a.max_completion_length), float("nan"))        # equal shapes on every rank
        mine[:, :ent.shape[1]] = torch.where(valid, ent, torch.full_like(ent, float("nan")))
        everyone = self.engine.all_gather_cat(mine.to(self.engine.device)).cpu()         # (world*N, T_max)
        threshold = entropy_threshold(everyone, a.top_entropy_quantile)
        pg_mask = high_entropy_mask(ent, valid, threshold).to(loss_mask.device)
        kept = everyone[~torch.isnan(everyone)]
        chosen = kept[kept >= threshold]
        return pg_mask, {"entropy/threshold": float(threshold),
                         "entropy/selected_frac": len(chosen) / max(1, len(kept)),
                         "entropy/selected_mean": float(chosen.mean()) if len(chosen) else float("nan")}

    def _forward(self, fn, prompts: PromptBatch, comp: Completions, rows: list[int], **extra):
        """(logp, entropy, width, top-k entropy or None) of ``rows``; ``extra``: ``entropy_grad``,
        ``entropy_top_k`` of ``CompletionLogProbs.forward``."""
        pb, ids, mask = prompts.select(rows), comp.ids[rows], comp.mask[rows]
        width = max(1, int(mask.sum(1).max()))  # drop columns that are padding in every row
        ids, mask = ids[:, :width], mask[:, :width]
        if pb.unique is not None and self.args.reuse_prompts:
            inputs = self.adapter.shared_forward_inputs(pb, mask)  # each distinct prompt run once
        else:
            inputs = self.adapter.forward_inputs(pb, ids, mask)
        out = fn(completion_ids=ids, temperature=self.args.temperature, **extra, **inputs)
        return out[0], out[1], width, (out[2] if len(out) > 2 else None)

    def _logprobs(self, fn, prompts: PromptBatch, comp: Completions) -> tuple[torch.Tensor, torch.Tensor]:
        """No-grad log-probs and entropies (N, T) of the whole batch, micro-batch by micro-batch."""
        out = torch.zeros(comp.ids.shape, dtype=torch.float32, device=comp.ids.device)
        ent = torch.zeros(comp.ids.shape, dtype=torch.float32, device=comp.ids.device)
        for rows in self.micro_batches(len(prompts)):
            logp, e, width, _ = self._forward(fn, prompts, comp, rows)
            out[rows, :width] = logp.float()
            ent[rows, :width] = e.float()
        return out, ent

    # ---------------------------------------------------------------- update
    def update(self, batch: Batch) -> dict:
        """One optimizer step over all micro-batches of ``batch``. A micro-batch whose loss is
        NaN/inf on any rank is never backpropagated (0 * NaN is still NaN): every rank drops the
        whole step's gradients instead, and the step is counted as skipped."""
        a, t0 = self.args, time.perf_counter()
        sums: dict[str, float] = {}
        finite = True
        micro = self.micro_batches(len(batch.prompts))
        bonus = a.entropy_coef > 0
        local = getattr(lookup(LOSS_TYPES, a.loss_type), "local", False)
        scale = 1.0 / len(micro) if local else float(self.engine.world_size)
        for i, rows in enumerate(micro):
            logp, ent, w, top_ent = self._forward(self.engine.forward, batch.prompts, batch.completions, rows,
                                                  entropy_grad=bonus, entropy_top_k=a.entropy_top_k)
            mask = batch.loss_mask[rows, :w]
            old = batch.old_logp[rows, :w] if batch.old_logp is not None else logp.detach()
            ref = batch.ref_logp[rows, :w] if batch.ref_logp is not None else None
            pg_mask = batch.pg_mask[rows, :w] if batch.pg_mask is not None else None
            per_token, m = grpo_token_loss(
                logp, old, ref, batch.advantages[rows].to(logp), mask, beta=a.beta,
                eps_low=a.epsilon, eps_high=a.clip_high, delta=a.delta,
                importance_sampling_level=a.importance_sampling_level, kl_estimator=a.kl_estimator, kl_clamp=a.kl_clamp,
                pg_mask=pg_mask, entropy=ent if bonus else None, entropy_coef=a.entropy_coef)
            # Global normalisers make micro-batch losses sum to the full-batch loss; x world size
            # undoes the gradient averaging of data parallelism (see core.aggregate_loss). A local
            # normaliser ("bnpo") is averaged over the micro-batches instead, as TRL does.
            loss = aggregate_loss(per_token, mask, a.loss_type, num_tokens=batch.num_tokens,
                                  num_sequences=batch.num_sequences, num_rows=batch.loss_mask.shape[0] * self.engine.world_size,
                                  max_completion_length=a.max_completion_length) * scale
            if self.engine.nonfinite_anywhere(loss):
                finite = False
                break
            self.engine.backward(loss, last=i == len(micro) - 1)
            share = len(rows) / len(batch.prompts)
            valid = mask.sum().clamp(min=1)
            m = {**{_LOSS_METRIC_NAMES.get(k, k): float(v) for k, v in m.items()},
                 "loss": float(loss.detach()),  # x scale: the mean over ranks is the global loss
                 "entropy": float((ent.detach() * mask).sum() / valid)}
            if top_ent is not None:
                m["entropy/top_k"] = float((top_ent * mask).sum() / valid)
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

    def _log_completions(self, round_idx, items, texts, rewards, scores=None, advantages=None, messages=None) -> None:
        """With ``log_completions``: the round's first ``num_completions_to_print`` completions of
        this process (None = all) -- prompt, completion, weighted reward, each reward function's
        score, advantage -- appended to completions.jsonl, and the same rows queued as the
        "completions" table of report_to's backends (sent at the next logging step). Main process only."""
        from .reporting import finite_or_none, prompt_text
        a = self.args
        k = (a.num_completions_to_print or len(texts)) if a.log_completions else 0
        if not k or not self.engine.is_main:
            return
        g, path = self.args.num_generations, self.output_dir / "completions.jsonl"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self._completions_round is None:
            # First round of this process (fresh, or resumed after a crash): drop lines of this and
            # later rounds, written by a killed run, so each round is logged exactly once.
            self._completions_round = round_idx
            truncate_jsonl(path, lambda obj: int(obj["round"]) < round_idx)
        names = [r.name for r in self.rewards]
        lines, table = [], []
        for i in range(min(k, len(texts))):
            item = items[i // g]
            item_id = getattr(item, "id", None) or (item.get("id") if isinstance(item, dict) else None)
            prompt = prompt_text(messages[i // g]) if messages is not None else None
            each = [float(scores[i, j]) for j in range(len(names))] if scores is not None else []
            adv = float(advantages[i]) if advantages is not None else float("nan")
            table.append([round_idx, item_id, prompt, texts[i], float(rewards[i]), *each, adv])
            line = {"round": round_idx, "id": item_id, "prompt": prompt, "completion": texts[i],
                    "reward": finite_or_none(float(rewards[i]))}
            if scores is not None:
                line["rewards"] = {n: finite_or_none(v) for n, v in zip(names, each)}
            if advantages is not None:
                line["advantage"] = finite_or_none(adv)
            lines.append(line)
        with open(path, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        reporter = getattr(self, "reporter", None)
        if reporter is not None:
            columns = ["round", "id", "prompt", "completion", "reward"]
            columns += [f"reward/{n}" for n in names] if scores is not None else []
            reporter.queue_table("completions", columns + ["advantage"], table)

