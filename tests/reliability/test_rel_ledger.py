"""The judge usage ledger survives a resume: ``judge/*`` (requests, tokens, judgments, failures...)
is cumulative over every process of a run, not restarted at 0 by each one.

What is counted (docs/reliability.md, "The judge bill across resumes"): each process counts what
it sends and judges; a checkpoint stores the totals so far (``trainer_state.json``, per rank) and a
resumed process starts from them. So

* a run stopped cleanly at a checkpoint and resumed reads the uninterrupted run's counters at
  its last step; the one difference is the resumed process's own pre-flight probe (one request,
  counted in ``judge/requests``, the token counters and ``judge/preflight_requests``);
* after a kill, what the killed process did after its last checkpoint is not in the totals (it
  is lost with the process, like its steps). Verdicts it stored in the judge cache come back as
  cache hits, not requests; judgments whose verdict never reached the cache (in flight at the
  kill) are sent again and counted again -- they are paid again.
"""
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "grpo"))
from ds_common import FixedSampler, LengthReward, dataset, make_config, tiny_model  # noqa: E402
from helpers import spawn_fault_judge  # noqa: E402

from grpo import GRPOTrainer
from grpo.metrics import read_metrics
from rewards import JudgeConfig, ProcessReward
from rewards.judge.ledger import Ledger
from rewards.judge.server import start_local_judge

pytestmark = pytest.mark.server
STEPS = 4
FAST = dict(max_retries=1, backoff_base=0.01, backoff_max=0.02, backoff_jitter=0.0)


@pytest.fixture(scope="module")
def rubric_judge():
    with start_local_judge("rubric") as judge:
        yield judge


@pytest.fixture(scope="module")
def fault_judge():
    judge = spawn_fault_judge()
    yield judge
    judge.close()


def run(tiny_ckpt, out, url, steps, resume=False, sampler=None, items=None, judge_cfg=None, **kw):
    """A GRPO run with a length reward and a ProcessReward whose cache is OUT/judge.sqlite."""
    judge = ProcessReward(JudgeConfig(base_url=url, cache_path=str(Path(out) / "judge.sqlite"), **(judge_cfg or {})))
    cfg = make_config(str(out), max_steps=steps, resume_from_checkpoint="auto" if resume else None, **kw)
    t = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward(), judge], args=cfg, train_dataset=items or dataset(),
                    processing_class=tiny_model.processor)
    t.sampler = sampler or FixedSampler()
    return t


def ledger_at_last_step(out) -> dict:
    """The judge counters of the last line of metrics.jsonl: what a user reads (latency is per process)."""
    row = read_metrics(Path(out) / "metrics.jsonl")[-1]
    assert row["step"] == STEPS
    return {k: v for k, v in row.items() if k.startswith("judge/") and "latency" not in k}


def stopped_and_resumed(tiny_ckpt, out, url, **kw):
    run(tiny_ckpt, out, url, 2, save_steps=2, **kw).train()           # stops cleanly with checkpoint-2
    t = run(tiny_ckpt, out, url, STEPS, resume=True, save_steps=2, **kw)
    assert len(t.train()) == STEPS - 2                                 # really resumed from step 2
    return t


@pytest.mark.filterwarnings("ignore:step .* abstained:RuntimeWarning")     # half the judgments fail, on purpose
def test_stopped_and_resumed_run_reads_the_uninterrupted_counters(tiny_ckpt, tmp_path, fault_judge):
    """Exact equality of every counter, with the pre-flight check off; odd items' judgments fail
    (HTTP 500 after a retry), so failures, retries and their reasons are counted too."""
    items = dataset()
    for i, it in enumerate(items):
        it["question"] = f"Item {i}? FAULTS={'500' if i % 2 else 'ok'}"
    kw = dict(items=items, judge_cfg=FAST, preflight=False)
    run(tiny_ckpt, tmp_path / "straight", fault_judge.url, STEPS, **kw).train()
    stopped_and_resumed(tiny_ckpt, tmp_path / "resumed", fault_judge.url, **kw)
    straight, resumed = ledger_at_last_step(tmp_path / "straight"), ledger_at_last_step(tmp_path / "resumed")
    assert straight["judge/requests"] > straight["judge/successes"] > 0 and straight["judge/fail/http_500"] > 0
    assert resumed == straight


def test_each_start_adds_exactly_its_pre_flight_probe(tiny_ckpt, tmp_path, rubric_judge):
    """With the default pre-flight check, the resumed run paid one more probe (its own start):
    exactly one probe's requests and tokens more than the uninterrupted run, nothing else."""
    run(tiny_ckpt, tmp_path / "straight", rubric_judge.url, STEPS).train()
    t = stopped_and_resumed(tiny_ckpt, tmp_path / "resumed", rubric_judge.url)
    probe = ProcessReward(JudgeConfig(base_url=rubric_judge.url))    # what one probe costs, measured alone
    probe.preflight(t.preflight_sample())
    cost = probe.metrics()
    straight, resumed = ledger_at_last_step(tmp_path / "straight"), ledger_at_last_step(tmp_path / "resumed")
    assert cost["judge/requests"] == cost["judge/preflight_requests"] == 1 and cost["judge/total_tokens"] > 0
    assert straight["judge/preflight_requests"] == 1 and resumed["judge/preflight_requests"] == 2
    assert resumed == {k: v + cost.get(k, 0.0) for k, v in straight.items()}


def test_after_a_kill_the_counters_are_the_checkpoints_plus_what_the_resumed_process_sent(tiny_ckpt, tmp_path,
                                                                                          rubric_judge):
    """A process crashes during step 4, after step 3 (not checkpointed) was judged and cached; 3 of
    step 3's verdicts are then removed from the cache, as if they had been in flight at the kill.
    The resumed run re-judges step 3: 5 cache hits, 3 requests paid again."""
    run(tiny_ckpt, tmp_path / "straight", rubric_judge.url, STEPS).train()
    rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    straight = {k: v for k, v in rows[-1].items() if k.startswith("judge/")}
    lost = {k: rows[2][k] - rows[1][k] for k in ("judge/requests", "judge/successes", "judge/judgments")}
    assert lost == {"judge/requests": 8, "judge/successes": 8, "judge/judgments": 8}   # step 3: 8 distinct chains

    out = tmp_path / "killed"
    run(tiny_ckpt, out, rubric_judge.url, 2, save_steps=2).train()    # checkpoint-2
    db = out / "judge.sqlite"
    at_checkpoint = keys(db)

    class Crash(FixedSampler):
        calls = 0

        def __call__(self, *a, **kw):
            Crash.calls += 1
            if Crash.calls == 2:                                      # step 4's generation
                raise RuntimeError("simulated kill")
            return super().__call__(*a, **kw)
    t = run(tiny_ckpt, out, rubric_judge.url, STEPS, resume=True, save_steps=2, sampler=Crash())
    with pytest.raises(RuntimeError, match="simulated kill"):
        t.train()
    t.rewards[1].client.close()
    step3 = sorted(keys(db) - at_checkpoint)
    assert len(step3) == 8 and t.rewards[1].client.ledger.count("successes") == 8
    forget(db, step3[:3])                                              # "in flight at the kill"

    run(tiny_ckpt, out, rubric_judge.url, STEPS, resume=True, save_steps=2).train()
    got = ledger_at_last_step(out)
    # the killed process's step 3 (8 requests) is not in the totals; 3 requests re-sent and the
    # resumed process's probe are; the other 5 verdicts came back from the cache
    assert got["judge/requests"] == straight["judge/requests"] - 8 + 3 + 1
    assert got["judge/preflight_requests"] == 2                        # the killed process's probe is lost too
    assert got["judge/successes"] == straight["judge/successes"] - 8 + 3
    assert got["judge/cache_hits"] == straight["judge/cache_hits"] + 5
    assert got["judge/judgments"] == straight["judge/judgments"] and got["judge/failures"] == 0


def keys(db) -> set[str]:
    con = sqlite3.connect(str(db))
    try:
        return {k for (k,) in con.execute("SELECT key FROM judgments")}
    finally:
        con.close()


def forget(db, which) -> None:
    con = sqlite3.connect(str(db))
    try:
        con.executemany("DELETE FROM judgments WHERE key = ?", [(k,) for k in which])
        con.commit()
    finally:
        con.close()


def test_each_rank_gets_its_own_ledger_back(tiny_ckpt, tmp_path):
    """Every rank has its own judge client: the checkpoint stores one ledger per rank (gathered)
    and each rank restores its own."""
    mine = {"process": {"ledger": {"counts": {"requests": 7, "judgments": 7}, "failure_reasons": {}}}}
    other = {"process": {"ledger": {"counts": {"requests": 5, "failures": 2}, "failure_reasons": {"timeout": 2}}}}
    t = run(tiny_ckpt, tmp_path, "http://127.0.0.1:9/v1", 1)          # never sends anything here
    t.engine.world_size, t.engine.rank = 2, 1
    t.engine.all_gather_objects = lambda obj: [other, obj]
    t.rewards[1].client.ledger.add(requests=3)
    assert t.trainer_state()["reward_state"] == [other, {"process": {"ledger": {"counts": {"requests": 3},
                                                                                  "failure_reasons": {}}}}]
    t.load_trainer_state({"step": 2, "reward_state": [other, mine]})
    m = t.rewards[1].metrics()
    assert (m["judge/requests"], m["judge/judgments"], m["judge/failures"]) == (7, 7, 0)
    assert "judge/fail/timeout" not in m                               # rank 0's failures stay rank 0's


def test_ledger_state_round_trip():
    ledger = Ledger()
    ledger.add(requests=3, prompt_tokens=30)
    ledger.fail("http_500", 2)
    saved = ledger.state_dict()
    assert saved == {"counts": {"requests": 3, "prompt_tokens": 30, "failures": 2}, "failure_reasons": {"http_500": 2}}

    resumed = Ledger()
    resumed.add(requests=1, preflight_requests=1)                      # counted before the checkpoint is loaded
    resumed.load_state_dict(saved)
    resumed.load_state_dict(saved)                                     # twice (two rewards, one client): no change
    assert resumed.state_dict() == saved                               # the totals are the checkpoint's
    resumed.add(requests=2)
    resumed.fail("timeout")
    snap = resumed.snapshot()
    assert (snap["judge/requests"], snap["judge/failures"], snap["judge/fail/http_500"], snap["judge/fail/timeout"]) \
        == (5, 3, 2, 1)
    assert resumed.count("requests") == 3 and resumed.total("requests") == 5   # this process vs the run
    with pytest.raises(ValueError, match="unknown counters"):
        Ledger().load_state_dict({"counts": {"dollars": 3}})
    with pytest.raises(ValueError, match="must map names to counts"):
        Ledger().load_state_dict({"counts": {"requests": -1}})
