"""One rank fails, every rank stops: 2-process GRPO runs (ZeRO-2 on CPU, gloo) in which rank 1
raises at step 2, under torchrun and under the ``deepspeed`` launcher, on one node and on two
(two launchers on 127.0.0.1, each with its own rank: what a multi-node job runs on each node).
The job must exit non-zero within 30 s of the error, its log must name rank 1 and the original
error with its traceback, no rank may survive it, and checkpoint-1 (save_steps=1) must verify."""
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from grpo.checkpoint import latest_checkpoint, verify
from grpo.metrics import read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNNER = HERE / "rank_failure_runner.py"
BIN = Path(sys.executable).parent
ORIGINAL = "ValueError: injected failure on rank 1 at step 2"
STOP_WITHIN_S = 30.0


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT),
           "MASTER_ADDR": "127.0.0.1", **extra}
    env.pop("PAUSE_AT", None)
    return env


class Job:
    """Launcher processes, each in its own session (killed with all descendants whatever
    happens); their output goes to files, and each one's exit time is recorded."""

    def __init__(self, cmds, logdir: Path, env=None):
        self.logs = [logdir / f"launcher{i}.log" for i in range(len(cmds))]
        self.procs = []
        for cmd, log in zip(cmds, self.logs):
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                                   env=env or _env(), cwd=ROOT, start_new_session=True))
        self.ended = [None] * len(cmds)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and None in self.ended:
            for i, p in enumerate(self.procs):
                if self.ended[i] is None and p.poll() is not None:
                    self.ended[i] = time.time()
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL each launcher's process group and every descendant: torchrun starts its
        workers in sessions of their own, out of reach of the group kill."""
        for p in self.procs:
            try:  # (a launcher already reaped has no tree to look up: its pid may be reused)
                tree = psutil.Process(p.pid).children(recursive=True) if p.poll() is None else []
            except psutil.NoSuchProcess:
                tree = []
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for child in tree:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            p.wait()
            psutil.wait_procs(tree, timeout=30)

    def text(self, i: int = 0) -> str:
        return self.logs[i].read_text(errors="replace")


def _run(cmds, tmp_path, timeout=240.0, env=None) -> Job:
    job = Job(cmds, tmp_path, env)
    try:
        job.wait(timeout)
    finally:
        alive = [i for i, t in enumerate(job.ended) if t is None]
        job.kill()
    assert not alive, f"launcher(s) {alive} still running after {timeout:.0f}s:\n" + \
        "\n".join(job.text(i)[-3000:] for i in alive)
    return job


def _failed_at(text: str) -> float:
    found = re.findall(r"^FAILING rank=1 t=([\d.]+)", text, re.M)
    assert found, f"rank 1 never reached its failure:\n{text[-6000:]}"
    return float(found[0])


def _rank_pids(text: str) -> list[int]:
    # not anchored at a line start: the ranks share the launcher's stdout, and two READY lines
    # written at the same moment can end up on one line ("READY rank=0 pid=5READY rank=1 pid=6")
    return sorted({int(pid) for pid in re.findall(r"READY rank=\d pid=(\d+)", text)})


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _check_stopped(job: Job, failing_log: str, where: str) -> None:
    failed = _failed_at(failing_log)
    for i, p in enumerate(job.procs):
        assert p.returncode != 0, f"launcher {i} exited 0:\n{job.text(i)[-4000:]}"
        assert job.ended[i] - failed < STOP_WITHIN_S, (i, job.ended[i] - failed)
        print(f"launcher {i} ended {job.ended[i] - failed:.1f} s after rank 1's error")
    everything = "\n".join(job.text(i) for i in range(len(job.procs)))
    pids = _rank_pids(everything)
    assert len(pids) == 2 and not any(_alive(p) for p in pids), pids   # no rank outlives the job
    assert "DONE" not in everything
    # the failing rank says who it is and what failed, then gives the original traceback
    header = re.search(r"^\[rank1\]: grpo: rank 1 of 2 \(pid \d+ on .+\) failed with (\w+): (.*)$", failing_log, re.M)
    assert header, failing_log[-6000:]
    if where == "reward":
        assert header.group(1) == "RewardError" and f"reward 'flaky' raised {ORIGINAL}" in header.group(2)
    else:
        assert header.group(1) == "ValueError" and ORIGINAL.split(": ", 1)[1] in header.group(2)
    assert f"[rank1]: {ORIGINAL}" in failing_log
    assert re.search(r"^\[rank1\]:   File .*rank_failure_runner\.py.*in fail_here", failing_log, re.M)


def _check_checkpoints(out: Path) -> None:
    verify(out / "checkpoint-1")                       # raises if any file differs from its manifest
    assert latest_checkpoint(out).name == "checkpoint-1"
    assert not (out / "checkpoint-2").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]


def _ranks_cmd(out, ckpt, where):
    return [RUNNER, out, ckpt, where]


def test_torchrun_rank_1_reward_error_stops_the_job(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    cmd = [BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", _free_port(), *_ranks_cmd(out, tiny_ckpt, "reward")]
    job = _run([cmd], tmp_path)
    _check_stopped(job, job.text(), "reward")
    assert "rank      : 1 (local_rank: 1)" in job.text()   # torchrun's own summary: the root cause
    _check_checkpoints(out)


def test_deepspeed_launcher_rank_1_reward_error_stops_the_job(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    cmd = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", _free_port(), *_ranks_cmd(out, tiny_ckpt, "reward")]
    job = _run([cmd], tmp_path)
    _check_stopped(job, job.text(), "reward")
    assert re.search(r"exits with return code = 1", job.text())      # the launcher saw rank 1's exit
    _check_checkpoints(out)


def test_torchrun_two_nodes_rank_1_update_error_stops_both_nodes(tiny_ckpt, tmp_path):
    """Two torchrun agents (2 "nodes", 1 rank each). Node 1's agent stops only its own rank;
    rank 0 stops because its next collective fails once rank 1's process is gone."""
    out, port = tmp_path / "out", _free_port()
    cmds = [[BIN / "torchrun", "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1",
             "--master_addr", "127.0.0.1", "--master_port", port, *_ranks_cmd(out, tiny_ckpt, "update")]
            for n in (0, 1)]
    job = _run(cmds, tmp_path)
    _check_stopped(job, job.text(1), "update")
    assert re.search(r"^\[rank0\]: grpo: rank 0 of 2 .* failed with .*lost contact with another one",
                     job.text(0), re.M), job.text(0)[-4000:]
    _check_checkpoints(out)


def test_deepspeed_two_nodes_rank_1_rollout_error_stops_both_nodes(tiny_ckpt, tmp_path):
    """What ``deepspeed --hostfile`` runs on each node through pdsh: deepspeed.launcher.launch
    with the node's rank. Each node's launcher watches only its own ranks."""
    out, port = tmp_path / "out", _free_port()
    world = base64.urlsafe_b64encode(json.dumps({"node0": [0], "node1": [0]}).encode()).decode()
    cmds = [[sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", f"--node_rank={n}",
             "--master_addr=127.0.0.1", f"--master_port={port}", *_ranks_cmd(out, tiny_ckpt, "rollout")]
            for n in (0, 1)]
    job = _run(cmds, tmp_path)
    _check_stopped(job, job.text(1), "rollout")
    assert re.search(r"^\[rank0\]: grpo: rank 0 of 2 .* failed with .*lost contact with another one",
                     job.text(0), re.M), job.text(0)[-4000:]
    _check_checkpoints(out)


def test_a_failing_rank_whose_exit_blocks_on_a_pending_collective_still_ends(tmp_path):
    """Rank 1 raises with an all-reduce pending that rank 0 never joins: without the library's
    hook its exit waits for the process group's timeout (10-30 min), and the job with it."""
    cmd = [BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", _free_port(),
           HERE / "stuck_exit_runner.py"]
    job = _run([cmd], tmp_path, timeout=120.0, env=_env(GRPO_EXIT_TIMEOUT_S="3"))
    text = job.text()
    assert job.procs[0].returncode != 0
    assert job.ended[0] - _failed_at(text) < 3 + 15, job.ended[0] - _failed_at(text)
    assert "[rank1]: grpo: rank 1 of 2" in text
    assert "[rank1]: ValueError: injected failure with a collective pending" in text
    assert "exitcode: -14" in text or "exitcode  : -14" in text      # SIGALRM ended rank 1
