"""Crash safety: a real training subprocess, SIGKILLed during generation, during the judge calls
and during a checkpoint write (then at random points), resumes with resume_from_checkpoint="auto"
and ends exactly where an uninterrupted run ends: the same weights (bitwise), the same per-step
metrics, each step logged once, and every judgment paid before a kill still in the judge cache."""
import json
import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rel_helpers import Run, assert_same_metrics_and_weights, cache_keys, successes, weights  # noqa: E402

from grpo.checkpoint import MANIFEST, latest_checkpoint
from grpo.metrics import read_metrics
from rewards.judge.server import start_local_judge

pytestmark = [pytest.mark.slow, pytest.mark.server]
STEPS = 5
# Everything a step computes from the model, data and rewards (not timings, not the judge
# ledger, which counts per process).
COMPARED = ("loss", "grad_norm", "kl_mean", "entropy", "reward/mean", "reward/length/mean",
            "reward/process/mean", "completion/length_mean", "learning_rate", "skipped_steps")


@pytest.fixture(scope="module")
def judge():
    with start_local_judge("rubric") as j:
        yield j


@pytest.fixture(scope="module")
def reference(judge, tiny_ckpt, tmp_path_factory):
    """The uninterrupted run; started now, so it runs alongside the crash chain (2 cores)."""
    out = tmp_path_factory.mktemp("reference")
    run = Run(out, tiny_ckpt, judge.url, STEPS)
    state = {}

    def result():
        if not state:
            paid = run.finish()
            state.update(out=out, paid=paid, metrics=read_metrics(out / "metrics.jsonl"),
                         weights=weights(out / f"checkpoint-{STEPS}"), keys=cache_keys(out / "judge.sqlite"))
        return state
    yield result
    run.kill()


def assert_same_final_state(out: Path, ref: dict) -> None:
    assert_same_metrics_and_weights(out, ref, STEPS, COMPARED)
    rounds = [json.loads(x)["round"] for x in (out / "completions.jsonl").read_text().splitlines()]
    assert rounds == [r for r in range(STEPS) for _ in range(2)]       # 2 logged per round, once
    assert not list(out.glob(".tmp-checkpoint-*"))
    assert cache_keys(out / "judge.sqlite") == ref["keys"]              # the same judgments, each once


def test_kills_during_generation_judging_and_checkpoint_write_lose_nothing(judge, tiny_ckpt, tmp_path, reference):
    out, db = tmp_path, tmp_path / "judge.sqlite"

    # 1. killed while round 1 is being generated: checkpoint-1 is the resume point
    run = Run(out, tiny_ckpt, judge.url, STEPS, pause="generate:1")
    paid = successes(run.wait_for("PAUSED generate"))
    run.kill()
    assert latest_checkpoint(out).name == "checkpoint-1"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert len(cache_keys(db)) == paid > 0                            # round 0's judgments, all stored

    # 2. killed with 3 judgments of round 2 paid and the other 5 in flight
    before = cache_keys(db)
    run = Run(out, tiny_ckpt, judge.url, STEPS, pause="judge:2:3")
    paid = successes(run.wait_for("PAUSED judge"))
    run.kill()
    at_kill = cache_keys(db)
    assert before <= at_kill and len(at_kill) >= len(before) + paid   # every paid judgment is stored
    assert paid >= 3
    assert latest_checkpoint(out).name == "checkpoint-2"

    # 3. killed inside the write of checkpoint-4: files written, manifest not, not yet renamed
    before = cache_keys(db)
    run = Run(out, tiny_ckpt, judge.url, STEPS, pause="save:4")
    paid = successes(run.wait_for("PAUSED save"))
    run.kill()
    tmp = out / ".tmp-checkpoint-4"
    assert (tmp / "model" / "model.safetensors").is_file() and not (tmp / MANIFEST).exists()
    assert latest_checkpoint(out).name == "checkpoint-3"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]  # 4: not saved yet
    after = cache_keys(db)
    # round 2's stored judgments were cache hits: this process paid only for what was missing
    assert at_kill <= after and len(after) - len(before) == paid

    # 4. resumed to the end: nothing paid twice, same final state as the uninterrupted run
    before = cache_keys(db)
    paid = Run(out, tiny_ckpt, judge.url, STEPS).finish()
    assert len(cache_keys(db)) - len(before) == paid
    assert at_kill <= cache_keys(db)
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["judge/cache_hits"] > 0 and ledger["judge/failures"] == 0
    assert_same_final_state(out, reference())


def test_kills_at_random_points_converge_to_the_uninterrupted_run(judge, tiny_ckpt, tmp_path, reference):
    """Each run is killed a random 0-0.6 s after it logs a step it had not reached before: that
    lands in generation, judging, the update, the metrics write or the checkpoint write."""
    rng, out, killed = random.Random(1234), tmp_path, 0
    for _ in range(3):
        rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        reached = max((r["step"] for r in rows), default=0)
        if reached >= STEPS - 1:
            break
        run = Run(out, tiny_ckpt, judge.url, STEPS)
        while run.proc.poll() is None and _max_step(out) <= reached:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        running = run.proc.poll() is None
        run.kill()
        killed += running and run.proc.returncode == -9
    assert killed >= 1
    Run(out, tiny_ckpt, judge.url, STEPS).finish()
    assert_same_final_state(out, reference())


def _max_step(out: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(out / "metrics.jsonl")), default=0)
    except (OSError, ValueError):
        return 0  # being rewritten right now, or a torn last line
