"""Supervised fine-tuning (PathVLM-R1 stage 1): cross-entropy on the assistant's tokens only.

The target is treated exactly like a GRPO completion: the prompt (system + image + question) is
encoded by the adapter and the target tokens (ending with the adapter's ``end_of_turn`` token) are
scored by the same chunked log-prob module, so SFT and GRPO share model loading, DeepSpeed,
checkpoints and metrics.
Loss = -(sum of target-token log-probs) / (target tokens in the whole optimizer step).
Its pre-flight check (``SFTConfig.preflight``) covers only the output folder: SFT has no rewards.
"""
from __future__ import annotations

import time

import torch

from .base import BaseTrainer
from .config import SFTConfig
from .core import aggregate_loss


def default_target(item) -> str:
    """The assistant's reply for one item: ``item["target"]`` for dicts, else the paper-style
    ``<think>…</think><answer>…</answer>`` built from a ``data.VQARecord``'s criteria and answer."""
    if isinstance(item, dict):
        if "target" not in item:
            raise KeyError(f"SFT item has no 'target' field (keys: {sorted(item)}); add it or pass target_fn=")
        return item["target"]
    from data.prompts import build_sft_target
    return build_sft_target(item)


class SFTTrainer(BaseTrainer):
    name = "SFT"

    def __init__(self, model, args: SFTConfig = SFTConfig(), train_dataset=None, processing_class=None,
                 adapter=None, prompt_fn=None, target_fn=None, peft_config=None):
        super().__init__(model, args, train_dataset, processing_class, adapter=adapter, prompt_fn=prompt_fn,
                         peft_config=peft_config)
        self.target_fn = target_fn or default_target
        self.end_ids = list(self.adapter.end_of_turn_ids)  # the chat template's end of an assistant turn

    def encode_targets(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) (N, T): each target's tokens then the end-of-turn tokens, right-padded."""
        tok, cap = self.adapter.tokenizer, self.args.max_target_length
        seqs = [(tok(self.target_fn(it), add_special_tokens=False)["input_ids"][:cap - 1] + self.end_ids)
                for it in items]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.adapter.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        return ids, mask

    def training_step(self, step: int) -> dict:
        a, t0 = self.args, time.perf_counter()
        items = self.items_for_round(step, a.batch_size)
        messages, images = zip(*(self.prompt_fn(it) for it in items))
        prompts = self.adapter.encode_prompts(list(messages), list(images)).to(self.engine.device)
        ids, mask = (t.to(self.engine.device) for t in self.encode_targets(items))
        num_tokens = float(self.engine.all_reduce_sum(mask.sum().float()))
        loss_sum, correct, finite = 0.0, 0.0, True
        micro = self.micro_batches(len(items))
        for i, rows in enumerate(micro):
            m_ids, m_mask = ids[rows], mask[rows]
            logp, _ = self.engine.forward(completion_ids=m_ids, temperature=1.0,
                                          **self.adapter.forward_inputs(prompts.select(rows), m_ids, m_mask))
            # the global token mean ("dapo" normalisation): micro-batch losses sum to the full-batch loss
            loss = aggregate_loss(-logp, m_mask, "dapo", num_tokens=num_tokens) * self.engine.world_size
            if self.engine.nonfinite_anywhere(loss):  # never backpropagate NaN/inf (see GRPOTrainer.update)
                finite = False
                break
            self.engine.backward(loss, last=i == len(micro) - 1)
            loss_sum += float(loss.detach())  # x world: the mean over ranks is the global loss
            correct += float((logp.detach().exp() * m_mask).sum())
        grad_norm = self.engine.step() if finite else self.engine.discard_step()
        return {"loss": loss_sum if finite else float("nan"), "nonfinite_loss": float(not finite), "token_prob_mean": correct / max(1.0, float(mask.sum())),
                "grad_norm": grad_norm if grad_norm is not None else float("nan"),
                "skipped_step": float(grad_norm is None), "learning_rate": self.engine.lr(),
                "target_tokens": num_tokens, "time/update": time.perf_counter() - t0}
