"""Judge outages during training: the judge down for the whole run, failing for half the
prompts, or slower than the timeout. Training continues on the rewards that exist, the outage
shows in the metrics and in a warning, and GRPOConfig.max_abstain_rate stops the run with an
error naming the reward and the rate."""
import math
import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "grpo"))
sys.path.insert(0, str(Path(__file__).parent))
from ds_common import FixedSampler, LengthReward, dataset, make_config, tiny_model  # noqa: E402
from rel_helpers import spawn_fault_judge  # noqa: E402

from grpo import GRPOTrainer
from grpo.metrics import AbstainGuard, AbstainRateError
from rewards import JudgeConfig, ProcessReward

pytestmark = pytest.mark.server
FAST = dict(max_retries=1, backoff_base=0.01, backoff_max=0.02, backoff_jitter=0.0)


@pytest.fixture(scope="module")
def fault_judge():
    judge = spawn_fault_judge()
    yield judge
    judge.close()


def closed_port_url() -> str:
    with socket.socket() as s:  # bound then closed: nothing listens there, connections are refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def scripted_items(faults_of):
    """dataset() items whose question carries the fault server's script for that prompt."""
    items = dataset(4)
    for i, it in enumerate(items):
        it["question"] = f"Item {i}? FAULTS={faults_of(i)} ID=outage{id(faults_of)}x{i}"
    return items


def train(tiny_ckpt, out, judge_cfg, items=None, steps=2, **kw):
    cfg = make_config(str(out), max_steps=steps, **kw)
    t = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward(), ProcessReward(judge_cfg)], args=cfg,
                    train_dataset=items or dataset(4), processing_class=tiny_model.processor)
    t.sampler = FixedSampler()
    return t


def test_judge_down_for_the_whole_run_trains_on_the_other_reward(tiny_ckpt, tmp_path):
    # preflight=False: the judge dies after the start (the pre-flight check would stop this run at
    # once, see test_rel_preflight.py); here training must go on without it
    t = train(tiny_ckpt, tmp_path, JudgeConfig(base_url=closed_port_url(), timeout=2.0, **FAST), preflight=False)
    with pytest.warns(RuntimeWarning, match=r"reward 'process' abstained on 100.0% .*connect_error"):
        history = t.train()
    for step, h in enumerate(history, 1):
        assert h["reward/process/abstain_rate"] == 1.0
        assert h["judge/fail/connect_error"] == 8 * step and h["judge/successes"] == 0   # cumulative
        assert h["judge/requests"] == 2 * 8 * step                  # first attempt + 1 retry each
        assert h["reward/mean"] == pytest.approx(h["reward/length/mean"], abs=1e-6)     # nansum: length only
        assert math.isfinite(h["loss"]) and h["skipped_step"] == 0.0
    assert history[0]["grad_norm"] > 0                              # it still learned from the length reward


def test_judge_failing_for_half_the_prompts(tiny_ckpt, tmp_path, fault_judge):
    items = scripted_items(lambda i: "500" if i % 2 else "ok")      # odd items: HTTP 500 forever
    t = train(tiny_ckpt, tmp_path, JudgeConfig(base_url=fault_judge.url, **FAST), items, steps=4)
    with pytest.warns(RuntimeWarning, match="reward 'process' abstained"):
        history = t.train()
    failing, total = 0, 0
    for step, h in enumerate(history):
        drawn = t.items_for_round(step, 2)
        bad = sum(int(it["id"][1:]) % 2 for it in drawn)            # prompts whose judge calls fail
        failing += 4 * bad
        total += 8
        assert h["reward/process/abstain_rate"] == bad / 2
        assert h["judge/fail/http_500"] == failing if failing else "judge/fail/http_500" not in h
        if bad < 2:
            assert h["reward/process/mean"] == 0.5                  # the fault server's verdict
        assert math.isfinite(h["loss"])
    assert 0 < failing < total                                      # the run really was half-broken


def test_judge_slower_than_the_timeout_abstains_and_the_window_threshold_stops(tiny_ckpt, tmp_path, fault_judge):
    items = scripted_items(lambda i: "delay3000")
    cfg = JudgeConfig(base_url=fault_judge.url, timeout=0.3, **{**FAST, "max_retries": 0})
    t = train(tiny_ckpt, tmp_path, cfg, items, steps=3, max_abstain_rate=0.9, abstain_window=2, preflight=False)
    weights_after_step_1 = {}
    update = t.update

    def remember(batch):
        out = update(batch)
        weights_after_step_1.setdefault("w", [p.detach().clone() for p in t.engine.model.parameters()])
        return out
    t.update = remember
    with pytest.warns(RuntimeWarning, match="timeout"), \
            pytest.raises(AbstainRateError, match=r"reward 'process' abstained on 100.0% .* last 2 .* up to step 2"
                                                  r".*max_abstain_rate=0.9") as info:
        t.train()
    assert "timeout" in str(info.value) and "How to fix" in str(info.value)
    assert t.step == 1                                              # step 1 trained, step 2 never updated
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights_after_step_1["w"], t.engine.model.parameters()))


def test_threshold_stops_a_dead_judge_run_before_its_first_update(tiny_ckpt, tmp_path):
    t = train(tiny_ckpt, tmp_path, JudgeConfig(base_url=closed_port_url(), timeout=2.0, **FAST),
              max_abstain_rate=0.5, preflight=False)
    before = [p.detach().clone() for p in t.engine.model.parameters()]
    with pytest.warns(RuntimeWarning), pytest.raises(AbstainRateError, match="'process'.*100.0%.*step 1"):
        t.train()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, t.engine.model.parameters()))
    assert not list(tmp_path.glob("checkpoint-*"))


def test_abstain_guard_window_by_hand():
    guard = AbstainGuard(["process", "accuracy"], max_rate=0.5, window=2)
    with pytest.warns(RuntimeWarning, match="'process' abstained on 25.0%"):
        guard.check(1, {"reward/process/abstain_rate": 0.25, "reward/accuracy/abstain_rate": 0.0})
    guard.check(2, {"reward/process/abstain_rate": 0.75})        # mean 0.5: not above the limit
    resumed = AbstainGuard(["process", "accuracy"], max_rate=0.5, window=2)
    resumed.load_state(guard.state())                             # the window survives a resume
    with pytest.warns(RuntimeWarning), \
            pytest.raises(AbstainRateError, match=r"'process' abstained on 75.0% .* last 2 .* step 3"):
        resumed.check(3, {"reward/process/abstain_rate": 0.75, "judge/fail/timeout": 3.0})
    quiet = AbstainGuard(["process"], max_rate=None, window=1)
    with pytest.warns(RuntimeWarning, match="100.0%"):
        quiet.check(1, {"reward/process/abstain_rate": 1.0})      # no threshold: warns, never raises
