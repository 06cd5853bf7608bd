"""Helpers for the reliability tests: the crash-runner subprocess, the fault judge, and readers
for what a run leaves on disk."""
from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from helpers import spawn_fault_judge  # noqa: F401  (re-exported for the reliability tests)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RUNNER = HERE / "crash_runner.py"


def wait_for_line(lines: queue.Queue, proc, prefix: str, timeout: float, tail) -> str:
    """The first line from ``lines`` (a reader thread's queue, None at end of output) starting with
    ``prefix``. AssertionError with ``tail()`` if ``proc`` ends first; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            proc.wait()
            raise AssertionError(f"process exited ({proc.returncode}) before {prefix!r}:\n{tail()}")
        if line.startswith(prefix):
            return line.strip()
    raise TimeoutError(f"no {prefix!r} line within {timeout:.0f}s:\n{tail()}")


class Run:
    """The crash runner as a subprocess; stdout lines are collected by a thread."""

    def __init__(self, out, ckpt, judge_url, max_steps, pause=None, extra_env=None):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra_env or {})}
        env.pop("PAUSE_AT", None)
        if pause:
            env["PAUSE_AT"] = pause
        self.proc = subprocess.Popen([sys.executable, str(RUNNER), str(out), str(ckpt), judge_url, str(max_steps)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _read_err(self):
        self.stderr = self.proc.stderr.read()

    def wait_for(self, prefix: str, timeout: float = 240.0) -> str:
        """The first stdout line starting with ``prefix``; fails if the process ends first."""
        try:
            return wait_for_line(self.lines, self.proc, prefix, timeout,
                                 lambda: f"{''.join(self.stdout)[-2000:]}\n{self.stderr[-4000:]}")
        except TimeoutError as err:
            self.kill()
            raise AssertionError(str(err)) from None

    def kill(self) -> None:
        """SIGKILL: no handler, no atexit, no flush runs in the child."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 240.0) -> int:
        """Wait for a normal exit; returns the judgments this process paid for."""
        line = self.wait_for("DONE", timeout)
        assert self.proc.wait(timeout) == 0, self.stderr[-4000:]
        return successes(line)


def successes(line: str) -> int:
    return int(line.rsplit("successes=", 1)[1])


def cache_keys(path) -> set[str]:
    """Judgment keys stored in a judge cache (read while no writer is alive)."""
    if not Path(path).exists():
        return set()
    db = sqlite3.connect(str(path))
    try:
        return {row[0] for row in db.execute("SELECT key FROM judgments")}
    finally:
        db.close()


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model" / "model.safetensors"))





def assert_same_metrics_and_weights(out: Path, ref: dict, steps: int, compared) -> None:
    """``out`` logged every step exactly once with ``ref``'s values of ``compared`` metrics, and
    its final checkpoint holds bitwise ``ref``'s weights."""
    from grpo.metrics import read_metrics
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))     # none duplicated or missing
    for got, want in zip(rows, ref["metrics"]):
        for key in compared:
            assert got[key] == want[key], (got["step"], key, got[key], want[key])
    final = weights(out / f"checkpoint-{steps}")
    assert final.keys() == ref["weights"].keys()
    assert all(torch.equal(final[k], ref["weights"][k]) for k in final)   # bitwise
