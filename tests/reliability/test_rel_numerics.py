"""Numerical guards: a NaN/inf loss is never backpropagated and a NaN/inf gradient never applied
(the step is skipped and counted, across resumes); degenerate batches (all-equal rewards, every
judgment abstained, an empty completion, a padding-only row) contribute a well-defined zero."""
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "grpo"))
from ds_common import FixedSampler, LengthReward, dataset, make_config, tiny_model  # noqa: E402

from grpo import GRPOTrainer
from grpo.metrics import read_metrics
from grpo.rollout import Completions
from rewards import Reward


class Constant(Reward):
    name = "constant"

    def __init__(self, value):
        super().__init__()
        self.value = value

    def score(self, sample):
        return self.value


def trainer_for(tiny_ckpt, out, rewards=None, **kw):
    cfg = make_config(str(out), **kw)
    t = GRPOTrainer(tiny_model(tiny_ckpt), rewards or [LengthReward()], args=cfg, train_dataset=dataset(),
                    processing_class=tiny_model.processor)
    t.sampler = FixedSampler()
    return t


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.engine.model.named_parameters() if p.requires_grad}


def record_updates(trainer):
    """Wrap update() to keep the trainable weights before/after each step, and backward() to keep
    every loss that was backpropagated."""
    snaps, losses = [], []
    update, backward = trainer.update, trainer.engine.backward

    def recording_update(batch):
        before = params(trainer)
        out = update(batch)
        snaps.append((before, params(trainer)))
        return out

    def recording_backward(loss, last=True):
        losses.append(float(loss.detach()))
        backward(loss, last=last)
    trainer.update, trainer.engine.backward = recording_update, recording_backward
    return snaps, losses


def unchanged(before, after):
    return all(torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_loss_is_never_backpropagated_and_the_step_is_skipped_and_counted(tiny_ckpt, tmp_path):
    t = trainer_for(tiny_ckpt, tmp_path, max_steps=3, save_steps=1, save_total_limit=None)
    rollout = t.rollout

    def poisoned_rollout(round_idx):
        batch = rollout(round_idx)
        if round_idx == 1:
            batch.advantages[0] = float("nan")   # one bad value makes the whole loss NaN
        return batch
    t.rollout = poisoned_rollout
    snaps, losses = record_updates(t)
    history = t.train()
    assert all(math.isfinite(x) for x in losses)                  # NaN never reached backward()
    assert [h["skipped_step"] for h in history] == [0.0, 1.0, 0.0]
    assert [h["nonfinite_loss"] for h in history] == [0.0, 1.0, 0.0]
    assert [h["skipped_steps"] for h in history] == [0.0, 1.0, 1.0]
    assert not unchanged(*snaps[0]) and unchanged(*snaps[1]) and not unchanged(*snaps[2])
    opt = t.engine.optimizer
    assert {int(s["step"]) for s in opt.state.values()} == {2}    # Adam advanced twice, not three times
    assert t.engine.scheduler.last_epoch == 2
    logged = read_metrics(tmp_path / "metrics.jsonl")
    assert logged[1]["loss"] is None and logged[1]["skipped_step"] == 1.0   # NaN is written as null

    # the cumulative count survives a resume
    resumed = trainer_for(tiny_ckpt, tmp_path, max_steps=4, resume_from_checkpoint="auto").train()
    assert len(resumed) == 1 and resumed[0]["skipped_steps"] == 1.0 and resumed[0]["skipped_step"] == 0.0


def test_nonfinite_gradient_with_a_finite_loss_is_not_applied(tiny_ckpt, tmp_path):
    t = trainer_for(tiny_ckpt, tmp_path, max_steps=3)
    poison = {"on": False}
    first = next(p for p in t.engine.model.parameters() if p.requires_grad)
    first.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    update = t.update

    def update_with_poison(batch):
        poison["on"] = t.step == 1                                # the second step only
        return update(batch)
    t.update = update_with_poison
    snaps, losses = record_updates(t)
    history = t.train()
    assert all(math.isfinite(h["loss"]) for h in history)
    assert [h["skipped_step"] for h in history] == [0.0, 1.0, 0.0]
    assert [h["nonfinite_loss"] for h in history] == [0.0, 0.0, 0.0]
    assert [h["skipped_steps"] for h in history] == [0.0, 1.0, 1.0]
    assert unchanged(*snaps[1]) and not unchanged(*snaps[2])
    assert {int(s["step"]) for s in t.engine.optimizer.state.values()} == {2}
    assert all(p.grad is None for p in t.engine.model.parameters())   # the bad gradients were dropped


@pytest.mark.parametrize("reward, abstain", [(Constant(0.5), 0.0), (Constant(None), 1.0)],
                         ids=["all_equal_rewards", "every_judgment_abstained"])
def test_batches_without_signal_give_a_zero_loss_and_no_update(tiny_ckpt, tmp_path, reward, abstain):
    t = trainer_for(tiny_ckpt, tmp_path, max_steps=2, rewards=[reward])
    snaps, _ = record_updates(t)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = t.train()
    assert any("abstained on 100.0%" in str(w.message) for w in caught) == bool(abstain)
    for h in history:
        assert h["loss"] == 0.0 and h["grad_norm"] == 0.0 and h["skipped_step"] == 0.0
        assert h["frac_zero_std_groups"] == 1.0
        assert h["reward/abstain_frac"] == abstain and h["reward/constant/abstain_rate"] == abstain
    assert all(unchanged(*s) for s in snaps)                      # Adam on a zero gradient: no move


class EmptyAndPaddingRows:
    """FixedSampler's completions, except row 0 is only EOS (an empty answer) and row 1 is only
    padding with an all-zero mask."""

    def __call__(self, model, adapter, prompts, cfg, chunk=None):
        comp = FixedSampler()(model, adapter, prompts, cfg, chunk)
        ids, mask, truncated = comp.ids.clone(), comp.mask.clone(), comp.truncated.clone()
        ids[0], mask[0], truncated[0] = adapter.eos_token_ids[0], 0, False
        mask[0, 0] = 1
        ids[1], mask[1], truncated[1] = adapter.pad_token_id, 0, False
        return Completions(ids, mask, truncated)


def test_empty_completion_and_padding_only_row_are_well_defined(tiny_ckpt, tmp_path):
    t = trainer_for(tiny_ckpt, tmp_path, max_steps=1, loss_type="grpo")
    t.sampler = EmptyAndPaddingRows()
    batch = t.rollout(0)
    assert t.adapter.decode(batch.completions.ids[:1], batch.completions.mask[:1]) == [""]
    assert batch.num_sequences == len(batch.advantages) - 1       # the padding row is not a sequence
    grads = {}

    def capture_step():
        grads["g"] = [p.grad.clone() for p in t.engine.model.parameters() if p.grad is not None]
        t.engine.optimizer.zero_grad(set_to_none=True)
        return 0.0
    t.engine.step = capture_step
    results = []
    for value in (5.0, -5.0):                                     # the padding row's advantage
        batch.advantages[1] = value
        metrics = t.update(batch)
        results.append((metrics["loss"], grads["g"]))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert math.isfinite(loss_a) and loss_a == loss_b
    assert all(torch.equal(x, y) for x, y in zip(grad_a, grad_b))  # it contributes exactly nothing
    assert all(torch.isfinite(g).all() for g in grad_a)
    assert math.isfinite(metrics["entropy"]) and metrics["skipped_step"] == 0.0


@pytest.mark.distributed
def test_zero3_rank_with_a_nan_loss_makes_every_rank_skip_the_step(tiny_ckpt, tmp_path):
    """2 processes, ZeRO-3: rank 0's loss is NaN at step 2, rank 1's is finite. Both skip the
    same step (no hung collective), Adam and the LR schedule advance twice, not three times."""
    import json
    import os
    import socket
    import subprocess
    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(Path(__file__).parent / "ds_nan_scenario.py"), str(tmp_path), str(tiny_ckpt)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"skipped_step": [0.0, 1.0, 0.0], "skipped_steps": [0.0, 1.0, 1.0],
                       "adam_steps": [2], "lr_steps": 2}, (rank, got)
