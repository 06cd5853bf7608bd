"""The pre-flight check (TrainingConfig.preflight, on by default): before the first rollout the
trainer checks that the judge answers, that the output folder is writable with room for one
checkpoint, and that every reward returns one number per sample. Each failure is a PreflightError
naming the field (and, for a reward, what it returned) before any generation; the check itself
changes nothing the run computes."""
import errno
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections import namedtuple
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "grpo"))
from ds_common import CountingSampler, LengthReward, dataset, make_config, tiny_model  # noqa: E402

from grpo import GRPOTrainer
from grpo.base import PreflightError
from grpo.checkpoint import MARGIN_BYTES, estimate_checkpoint_bytes
from grpo.config import SFTConfig
from grpo.rollout import sample
from grpo.sft import SFTTrainer
from grpo.trainer import PREFLIGHT_COMPLETION
from rewards import FormatReward, JudgeConfig, OverlongPenalty, ProcessReward, Reward
from rewards.judge.server import start_local_judge

Usage = namedtuple("Usage", "total used free")


def trainer(tiny_ckpt, out, rewards=None, items=None, **kw):
    cfg = make_config(str(out), max_steps=kw.pop("max_steps", 1), **kw)
    t = GRPOTrainer(tiny_model(tiny_ckpt), rewards or [LengthReward()], args=cfg,
                    train_dataset=items or dataset(4), processing_class=tiny_model.processor)
    t.sampler = CountingSampler()
    return t


def assert_nothing_ran(t, out):
    assert t.sampler.calls == 0 and t.step == 0
    assert not (Path(out) / "metrics.jsonl").exists() and not list(Path(out).glob("checkpoint-*"))


def closed_port_url() -> str:
    with socket.socket() as s:  # bound then closed: nothing listens there, connections are refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.fixture(scope="module")
def rubric_judge():
    with start_local_judge("rubric") as judge:
        yield judge


# --------------------------------------------------------------------------- the judge

@pytest.mark.server
def test_a_dead_judge_stops_the_run_before_any_rollout_naming_the_judge(tiny_ckpt, tmp_path):
    url = closed_port_url()
    judge = ProcessReward(JudgeConfig(base_url=url, max_retries=1, backoff_base=0.01, backoff_jitter=0.0, timeout=2.0))
    t = trainer(tiny_ckpt, tmp_path, [LengthReward(), judge])
    with pytest.raises(PreflightError) as info:
        t.train()
    message = str(info.value)
    assert (f"reward 'process' (ProcessReward): ProcessReward(judge=JudgeConfig(base_url='{url}', model='rubric', "
            f"api_key_env='JUDGE_API_KEY')) did not pass the pre-flight request: connection refused") in message
    assert "connect_error" in message and "TrainingConfig.preflight=False" in message
    assert "'length'" not in message                                  # the working reward is not blamed
    assert_nothing_ran(t, tmp_path)
    m = judge.metrics()                                               # the probe was paid: first attempt + 1 retry
    assert (m["judge/requests"], m["judge/preflight_requests"], m["judge/retries"]) == (2, 2, 1)
    assert m["judge/judgments"] == m["judge/failures"] == 0           # not a judgment: no abstain rate


@pytest.mark.server
def test_a_live_judge_passes_and_its_probe_is_paid_but_never_cached(tiny_ckpt, tmp_path, rubric_judge):
    judge = ProcessReward(JudgeConfig(base_url=rubric_judge.url, cache_path=str(tmp_path / "judge.sqlite")))
    t = trainer(tiny_ckpt, tmp_path, [LengthReward(), judge])
    history = t.train()
    assert t.sampler.calls == 1 and len(history) == 1
    m = history[-1]
    assert m["judge/preflight_requests"] == 1 and m["judge/successes"] == 8 and m["judge/failures"] == 0
    assert m["judge/requests"] == m["judge/successes"] + 1            # 8 chains + the probe
    assert len(judge.client.cache) == 8                               # the probe's verdict is not stored
    assert m["judge/prompt_tokens"] > 0


# --------------------------------------------------------------------------- the output folder

def test_an_unwritable_output_dir_is_named_before_any_rollout(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "run"
    t = trainer(tiny_ckpt, out)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **kw: False if Path(p) == out else real(p, mode, *a, **kw))
    with pytest.raises(PreflightError, match=rf"output_dir='{out}': not writable by this user"):
        t.train()
    assert_nothing_ran(t, out)


def test_a_read_only_output_dir_is_named_before_any_rollout(tiny_ckpt, tmp_path, monkeypatch):
    """Root passes os.access everywhere; the test file written into the folder catches a
    read-only mount anyway."""
    out = tmp_path / "run"
    t = trainer(tiny_ckpt, out)
    real = tempfile.mkstemp

    def read_only(*a, dir=None, **kw):
        if Path(dir) == out:
            raise OSError(errno.EROFS, "Read-only file system", str(out))
        return real(*a, dir=dir, **kw)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(PreflightError, match=rf"output_dir='{out}': writing a test file failed \(EROFS: Read-only"):
        t.train()
    assert_nothing_ran(t, out)


def test_a_disk_without_room_for_one_checkpoint_says_how_much_is_needed_and_free(tiny_ckpt, tmp_path, monkeypatch):
    t = trainer(tiny_ckpt, tmp_path)
    need, _ = estimate_checkpoint_bytes(t.engine.model)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 << 30, (10 << 30) - (5 << 20), 5 << 20))
    with pytest.raises(PreflightError) as info:
        t.train()
    message = str(info.value)
    assert (f"output_dir='{tmp_path}': 5.0 MiB free on its disk, one checkpoint needs about "
            f"{need / 2 ** 20:.1f} MiB (") in message
    assert "of weights" in message and "of Adam state for" in message
    assert_nothing_ran(t, tmp_path)


def test_the_estimate_covers_a_real_checkpoint_without_wild_overestimation(tiny_ckpt, tmp_path):
    t = trainer(tiny_ckpt, tmp_path)
    t.train()                                                         # max_steps=1: writes checkpoint-1
    written = sum(p.stat().st_size for p in (tmp_path / "checkpoint-1").rglob("*") if p.is_file())
    need, _ = estimate_checkpoint_bytes(t.engine.model)
    assert written <= need <= 1.2 * written + MARGIN_BYTES


def test_preflight_false_skips_the_check(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 30, 1 << 30, 0))   # "no room"
    t = trainer(tiny_ckpt, tmp_path, preflight=False)
    assert len(t.train()) == 1 and t.sampler.calls == 1


def test_sft_checks_the_output_folder(tiny_ckpt, tmp_path, monkeypatch):
    items = dataset(4)
    for it in items:
        it["target"] = "<answer>A</answer>"
    t = SFTTrainer(tiny_model(tiny_ckpt), SFTConfig(per_device_train_batch_size=4, max_steps=1, output_dir=str(tmp_path),
                                                    disable_tqdm=True), items, tiny_model.processor)
    steps = []
    step = t.training_step
    t.training_step = lambda k: steps.append(k) or step(k)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(PreflightError, match=rf"SFTTrainer: .*\n  - output_dir='{tmp_path}': 1.0 MiB free"):
        t.train()
    assert steps == [] and t.step == 0
    monkeypatch.undo()                                                # the disk is fine again: it trains
    assert len(t.train()) == 1 and steps == [0]


# --------------------------------------------------------------------------- the rewards

class TwoForOne(Reward):
    name = "pairs"

    def score_batch(self, samples):
        return [0.5] * (len(samples) + 1)


class Word(Reward):
    name = "word"

    def score(self, sample):
        return "high"


class Boom(Reward):
    name = "boom"

    def score(self, sample):
        raise ValueError("no verifier configured")


class TooBig(Reward):
    name = "big"

    def score(self, sample):
        return 3.0


def test_rewards_of_the_wrong_shape_are_named_with_what_they_returned(tiny_ckpt, tmp_path):
    t = trainer(tiny_ckpt, tmp_path, [LengthReward(), TwoForOne(), Word(), Boom(), TooBig()])
    with pytest.raises(PreflightError) as info:
        t.train()
    message = str(info.value)
    assert "found 4 problem(s)" in message
    assert ("reward 'pairs' (TwoForOne) returned [0.5, 0.5] for a one-sample batch: reward 'pairs' returned 2 values "
            "for 1 samples") in message
    assert "reward 'word' (Word) returned ['high'] for a one-sample batch: reward 'word' returned str for sample 0" in message
    assert "reward 'boom' (Boom) raised ValueError on a one-sample batch: no verifier configured" in message
    assert "reward 'big' (TooBig) returned [3.0] for a one-sample batch" in message and "range [0.0, 1.0]" in message
    assert "'length'" not in message
    assert_nothing_ran(t, tmp_path)


class Recording(Reward):
    name = "recording"

    def __init__(self):
        super().__init__()
        self.seen = []

    def score(self, sample):
        self.seen.append(sample)
        return 0.5


def test_the_rewards_see_the_first_item_with_a_placeholder_in_the_expected_format(tiny_ckpt, tmp_path):
    rec = Recording()
    items = dataset(4)
    t = trainer(tiny_ckpt, tmp_path, [rec, FormatReward(), OverlongPenalty(buffer=4)], items)
    t.train()
    first = rec.seen[0]                                               # the pre-flight sample, then the step's 8
    assert len(rec.seen) == 1 + 8
    assert (first.question, first.answer, first.extra["id"]) == (items[0]["question"], "A", "q0")
    assert first.completion == PREFLIGHT_COMPLETION.format(answer="A")
    assert FormatReward().score(first) == 1.0                         # the paper's format
    assert first.extra["max_completion_length"] == 8 and 1 <= first.extra["completion_tokens"] <= 8


def test_the_check_changes_nothing_the_run_samples(tiny_ckpt, tmp_path):
    """A reward that draws from the global RNG, and real sampling: the RNG is restored after the
    check, so the run with it equals the run without it."""
    class Noisy(Reward):
        name = "noisy"

        def score(self, sample):
            return float(torch.rand(()))

    def run(out, preflight):
        t = trainer(tiny_ckpt, out, [LengthReward(), Noisy()], max_steps=2, preflight=preflight)
        t.sampler = sample                                            # the real sampler (seeded RNG)
        return t.train()
    with_check, without = run(tmp_path / "a", True), run(tmp_path / "b", False)
    for key in ("loss", "reward/mean", "reward/noisy/mean", "completion/length_mean", "grad_norm"):
        assert [h[key] for h in with_check] == [h[key] for h in without], key


def test_every_rank_raises_when_one_rank_finds_a_problem(tiny_ckpt, tmp_path):
    """Two ranks in two threads joined by a fake all_gather_objects: only rank 1's reward breaks,
    and both raise (neither is left waiting in a collective), naming rank 1."""
    world, slots, barrier = 2, [None, None], threading.Barrier(2)

    def gather(rank):
        def op(obj):
            slots[rank] = obj
            barrier.wait(timeout=60)
            out = list(slots)
            barrier.wait(timeout=60)
            return out
        return op

    class BrokenOnRank1(LengthReward):
        def score(self, sample):
            raise ValueError("broken here")

    trainers = []
    for rank in range(world):
        t = trainer(tiny_ckpt, tmp_path, [LengthReward() if rank == 0 else BrokenOnRank1()])
        t.engine.world_size, t.engine.rank, t.engine.is_main = world, rank, rank == 0
        t.engine.all_gather_objects = gather(rank)
        trainers.append(t)
    errors = [None, None]

    def run(rank):
        try:
            trainers[rank].train()
        except PreflightError as err:
            errors[rank] = str(err)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert errors[0] == errors[1] and errors[0] is not None
    assert "reward 'length' (BrokenOnRank1) raised ValueError on a one-sample batch: broken here [rank 1]" in errors[0]
    assert all(t.sampler.calls == 0 for t in trainers)
