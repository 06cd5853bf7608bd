"""Fixtures for the judge tests: real server subprocesses on 127.0.0.1 (free ports)."""
from __future__ import annotations

import httpx
import pytest
from helpers import spawn_fault_judge as spawn_fault_server  # shared with tests/reliability

from rewards.judge.server import start_local_judge



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
