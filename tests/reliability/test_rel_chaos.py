"""Chaos under ZeRO-3: a 2-process ZeRO-3 GRPO run (torchrun, gloo, CPU) is SIGKILLed - the
launcher and both ranks at once - at 13 moments spread over generation, judging, the update,
metrics logging, checkpoint writing and resuming, and resumed with
resume_from_checkpoint="auto" after each. It must end with the uninterrupted run's weights
(bitwise) and per-step metrics (exactly), each step logged once, every judgment the judge
server answered in the judge cache and none paid twice (pre-flight probes, paid by design and
never cached, are counted apart).

Several minutes on 2 CPU cores: deselected by default (see conftest.py). Run it with

    .venv/bin/python -m pytest -m chaos tests/reliability/test_rel_chaos.py
"""
import json
import os
import queue
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "grpo"))
from ds_common import write_ds_config  # noqa: E402
from rel_helpers import assert_same_metrics_and_weights, cache_keys, wait_for_line, weights  # noqa: E402

from grpo.checkpoint import MANIFEST, latest_checkpoint
from grpo.metrics import read_metrics

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.distributed, pytest.mark.server]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNNER = HERE / "chaos_runner.py"
STEPS = 6
COMPARED = ("loss", "grad_norm", "kl_mean", "entropy", "reward/mean", "reward/length/mean",
            "reward/process/mean", "completion/length_mean", "learning_rate", "skipped_steps")
# (rank:point, the checkpoint resumable after the kill): see chaos_runner.py for the points.
KILLS = [
    ("0:generate:0", None),         # generation of the first round, nothing saved yet
    ("1:judge:0:3", None),          # rank 1 has 3 verdicts of round 0, the rest unsent
    ("0:backward:1:1", None),       # step 1's update: 1 of 2 micro-batches backpropagated
    ("1:dssave:1", None),           # checkpoint 1: ZeRO-3 shards written, model not
    ("0:manifest:2", 1),            # checkpoint 2: all files written, no manifest
    ("1:resume:1", 1),              # the resumed run has loaded checkpoint-1
    ("1:stepped:2", 1),             # step 2's optimizer step taken, not logged
    ("0:metrics:2", 1),             # step 2 logged, not saved
    ("0:prune:3", 3),               # checkpoint-3 published, checkpoint-1 not yet pruned
    ("1:generate:3", 3),            # round 3 sampled on rank 1
    ("0:judge:3:5", 3),             # rank 0 has 5 verdicts of round 3
    ("random", None),               # 0-1 s after the first step this run logs
    ("random", None),               # again (0-4 s after start-up if only the last step is left)
]


class JudgeServer:
    """The rubric judge with one log line per answered request: the judgments paid for."""

    def __init__(self, log: Path):
        self.log, self._err = log, open(log, "w")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "rewards.judge.server", "--backend", "rubric",
                                      "--port", "0", "--verbose"], stdout=subprocess.PIPE, text=True,
                                     stderr=self._err, env=env)
        line = self.proc.stdout.readline()
        assert line.startswith("JUDGE_URL="), line
        self.url = line.strip().split("=", 1)[1]

    def paid(self) -> int:
        return sum('"POST /v1/chat/completions HTTP/1.1" 200' in ln for ln in self.log.read_text().splitlines())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._err.close()


class Job:
    """``torchrun --nproc_per_node 2 chaos_runner.py ...``; its output is read by a thread."""

    def __init__(self, out: Path, ckpt, judge: JudgeServer, ds_json: Path, pause: str | None = None):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
               "MASTER_ADDR": "127.0.0.1"}
        env.pop("PAUSE_AT", None)
        if pause:
            env["PAUSE_AT"] = pause
        cmd = [Path(sys.executable).parent / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), RUNNER, out, ckpt, judge.url, str(STEPS), ds_json]
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, cwd=ROOT, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        self.pids: set[int] = set()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            # the ranks share this pipe: two READY lines can arrive run together on one line
            self.pids.update(int(pid) for pid in re.findall(r"READY rank=\d+ pid=(\d+)", line))
            self.lines.put(line)
        self.lines.put(None)

    def finish(self, timeout: float = 600.0) -> None:
        """Wait for the job to end by itself, successfully, with both ranks' ``DONE`` printed. The
        ranks share torchrun's stdout, so their two lines can arrive interleaved on one line:
        look for the text, not for lines starting with it."""
        assert self.proc.wait(timeout) == 0, self.tail()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the reader thread has seen the end of output
            try:
                if self.lines.get(timeout=1.0) is None:
                    break
            except queue.Empty:
                continue
        text = "".join(self.output)
        assert "DONE rank=0" in text and "DONE rank=1" in text, self.tail()

    def wait_for(self, prefix: str, timeout: float = 300.0) -> str:
        try:
            return wait_for_line(self.lines, self.proc, prefix, timeout, self.tail)
        except TimeoutError as err:
            raise AssertionError(str(err)) from None

    def tail(self) -> str:
        return "".join(self.output)[-6000:]

    def kill(self) -> bool:
        """SIGKILL the launcher and every rank at once (the ranks run in sessions of their own, so
        a process-group kill of the launcher would miss them). True if the job was still running."""
        running = self.proc.poll() is None
        procs = []
        try:
            if running:  # (once reaped, its pid may belong to another process)
                agent = psutil.Process(self.proc.pid)
                procs = [agent] + agent.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        for pid in self.pids - {p.pid for p in procs}:
            try:
                proc = psutil.Process(pid)
                if RUNNER.name in " ".join(proc.cmdline()):
                    procs.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        _, alive = psutil.wait_procs(procs, timeout=30)
        assert not alive, f"survived SIGKILL: {alive}"
        return running


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(out: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    except (OSError, ValueError):
        return []  # not written yet, or rewritten right now


def probes(out: Path) -> int:
    """Pre-flight probes answered so far (paid, never cached; see chaos_runner.py)."""
    return sum(len(p.read_text().splitlines()) for p in out.glob("probes-rank?"))


def quiesce_judging(out: Path, timeout: float = 120.0) -> None:
    """Stop new judge requests and wait until none is in flight (see chaos_runner.py)."""
    (out / "GATE").touch()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = [int(p.read_text() or 0) for p in out.glob("inflight-rank?")]
        if not any(counts):
            return
        time.sleep(0.02)
    raise AssertionError(f"judge requests still in flight after {timeout:.0f}s")


@pytest.fixture(scope="module")
def ds_json(tmp_path_factory):
    return Path(write_ds_config(tmp_path_factory.mktemp("ds")))


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory, ds_json):
    """The uninterrupted run, with its own judge server."""
    out = tmp_path_factory.mktemp("reference")
    judge = JudgeServer(out.parent / "reference-judge.log")
    job = Job(out / "run", tiny_ckpt, judge, ds_json)
    try:
        job.finish(timeout=600)
        run = out / "run"
        yield {"metrics": read_metrics(run / "metrics.jsonl"), "weights": weights(run / f"checkpoint-{STEPS}"),
               "keys": cache_keys(run / "judge.sqlite"), "paid": judge.paid() - probes(run)}
    finally:
        job.kill()
        judge.close()


def test_zero3_run_killed_13_times_ends_bitwise_equal_to_an_uninterrupted_run(tiny_ckpt, tmp_path, reference, ds_json):
    ref = reference
    assert ref["paid"] == len(ref["keys"]) > 0           # uninterrupted: each judgment paid once
    out = tmp_path / "run"
    judge = JudgeServer(tmp_path / "judge.log")
    rng = random.Random(20240607)
    log, killed = [], 0
    try:
        for pause, resumable in KILLS:
            for stale in [out / "GATE", *out.glob("inflight-rank?")]:
                stale.unlink(missing_ok=True)
            reached = max(_steps(out), default=0)
            job = Job(out, tiny_ckpt, judge, ds_json, pause=None if pause == "random" else pause)
            try:
                if pause == "random" and reached < STEPS - 1:
                    while job.proc.poll() is None and max(_steps(out), default=0) <= reached:
                        time.sleep(0.02)
                    time.sleep(rng.uniform(0.0, 1.0))
                elif pause == "random":  # too close to the end: somewhere in start-up, resume or a step
                    job.wait_for("READY")
                    time.sleep(rng.uniform(0.0, 4.0))
                else:
                    job.wait_for(f"PAUSED {pause}")
                quiesce_judging(out)
            finally:
                running = job.kill()
            assert running, f"{pause}: the job ended before the kill:\n{job.tail()}"
            killed += 1
            # every judgment answered so far is in the cache; none was paid twice
            keys = cache_keys(out / "judge.sqlite")
            assert judge.paid() - probes(out) == len(keys), (pause, judge.paid(), probes(out), len(keys))
            steps = _steps(out)
            assert steps == list(range(1, len(steps) + 1)), (pause, steps)    # each step at most once
            latest = latest_checkpoint(out)
            if pause != "random":
                assert (latest.name if latest else None) == (f"checkpoint-{resumable}" if resumable else None), pause
            log.append((pause, steps[-1] if steps else 0, latest.name if latest else None))
        # the run to the end
        for stale in [out / "GATE", *out.glob("inflight-rank?")]:
            stale.unlink(missing_ok=True)
        job = Job(out, tiny_ckpt, judge, ds_json)
        try:
            job.finish(timeout=600)
        finally:
            job.kill()
    finally:
        judge.close()
    print("kills (point, last logged step, resumable checkpoint):", json.dumps(log))
    assert killed == len(KILLS) >= 10

    assert_same_metrics_and_weights(out, ref, STEPS, COMPARED)   # each step once, bitwise weights
    final = weights(out / f"checkpoint-{STEPS}")
    from safetensors.torch import load_file
    start = load_file(str(Path(tiny_ckpt) / "model.safetensors"))
    assert any(not torch.equal(final[k], start[k]) for k in final.keys() & start.keys())  # training moved them
    assert (out / f"checkpoint-{STEPS}" / MANIFEST).is_file() and not list(out.glob(".tmp-checkpoint-*"))
    rounds = [json.loads(x)["round"] for x in (out / "completions.jsonl").read_text().splitlines()]
    assert rounds == [r for r in range(STEPS) for _ in range(2)]            # each round logged once
    keys = cache_keys(out / "judge.sqlite")
    assert keys == ref["keys"]                                              # the same judgments
    assert judge.paid() - probes(out) == len(keys) == ref["paid"]           # each paid exactly once
