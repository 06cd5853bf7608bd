"""Fixtures for the reward tests: real server subprocesses on 127.0.0.1 (free ports)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from rewards.judge_server import LocalJudge, start_local_judge

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def spawn_fault_server() -> LocalJudge:
    """Start tests/rewards/fault_judge.py and wait for its JUDGE_URL line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(HERE / "fault_judge.py")], stdout=subprocess.PIPE,
                            text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("JUDGE_URL="), f"fault server did not start: {line!r}"
    return LocalJudge(proc, line.strip().split("=", 1)[1])


@pytest.fixture(scope="module")
def fault_server():
    judge = spawn_fault_server()
    yield judge
    assert judge.close() == 0


def fault_stats(url: str) -> dict:
    return httpx.get(url.rsplit("/v1", 1)[0] + "/stats", timeout=5).json()


@pytest.fixture(scope="module")
def rubric_judge():
    with start_local_judge("rubric") as judge:
        yield judge
