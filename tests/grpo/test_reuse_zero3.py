"""Prompt reuse under DeepSpeed ZeRO-3 (issue 15): each distinct prompt runs once in every log-prob
pass (reference, old policy, policy forward/backward), also with activation checkpointing, with 2
real processes (gloo, CPU; tests/grpo/ds_reuse.py).

ZeRO-3 gathers a module's parameters by a collective when it runs, so a pass whose module calls
depend on the batch hangs: rank 1 holds no image and both ranks have micro-batches with 1-token
completions (before, the shared path skipped the vision tower and the completion pass there; it
was switched off under ZeRO-3 altogether). Every number is checked against the per-row path under
ZeRO-3 and against a plain one-process model running the per-row path on both ranks' batches.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ds_common import run_two_ranks  # noqa: E402

pytestmark = pytest.mark.distributed

SETUPS = ["frozen", "trainable_ckpt", "frozen_ckpt"]


@pytest.fixture(scope="module")
def ranks(tiny_ckpt, tmp_path_factory):
    # a hang (ranks running different modules) fails the test at the timeout
    return run_two_ranks("ds_reuse.py", tmp_path_factory.mktemp("reuse_zero3"), tiny_ckpt, timeout=480)


@pytest.mark.parametrize("setup", SETUPS)
def test_every_pass_shares_the_prompt_under_zero3(ranks, setup):
    for rank in ranks:
        r = rank["engine"][setup]
        assert r["shared_calls"] == 6        # reference + old policy + forward/backward, 2 micro-batches each
        assert r["checkpointing"] == setup.endswith("_ckpt")


@pytest.mark.parametrize("setup", SETUPS)
def test_logprobs_equal_the_per_row_path_and_a_plain_process(ranks, setup):
    for rank in ranks:
        for name in ("ref", "old"):
            lp = rank["engine"][setup]["logp"][name]
            assert lp["plain_min"] < -1.0                     # real log-probs, not zeros
            assert lp["shared_vs_rows"] <= 1e-5 and lp["shared_vs_plain"] <= 1e-5, (name, lp)


@pytest.mark.parametrize("setup", SETUPS)
def test_gradients_equal_the_per_row_path_and_a_plain_process(ranks, setup):
    for rank in ranks:
        r = rank["engine"][setup]
        for key in ("grads_shared_vs_rows", "grads_shared_vs_plain"):
            d = r[key]
            assert d["keys_equal"] and d["max_ref"] > 0.1, (key, d)
            assert d["max_abs"] <= 1e-5 * max(1.0, d["max_ref"]), (key, d)
        # the tower trains only in trainable_ckpt; rank 1 (no image) still took part in its backward
        assert bool(r["visual_grads"]) == setup.startswith("trainable")


def test_grpo_with_checkpointing_and_zero3_matches_the_per_row_path(ranks):
    for rank in ranks:
        on, off = rank["trainer"]["reuse_True"], rank["trainer"]["reuse_False"]
        assert on["shared_calls"] == 8 and off["shared_calls"] == 0   # old + ref + 2 updates, 2 micro-batches
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-5, abs=1e-7)
        assert on["kl"] == pytest.approx(off["kl"], rel=1e-4, abs=1e-7)
        assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-5)
        assert off["kl"][1] > 0                                       # the policy moved after step 1
