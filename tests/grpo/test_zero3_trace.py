"""ZeRO-3 keeps prefetching after generation (issue 15): with 2 real processes (gloo, CPU), read
DeepSpeed's parameter coordinator after each of 3 generation rounds and each update
(tests/grpo/ds_zero3_trace.py).

The rollout lifts DeepSpeed's per-module hooks so that ``generate`` does not gather each layer at
every token. The coordinator prefetches the next modules' parameters only while its recorded
fetch trace is complete; the trace is reset at each forward by a hook on the engine's module, and
re-recorded after any change. Lifting that hook too (and never putting it back) left the trace
invalid from the first rollout on: every later forward and backward gathered each module's
parameters on demand, with nothing in flight ahead of it.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ds_common import run_two_ranks  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tiny_ckpt, tmp_path_factory):
    return run_two_ranks("ds_zero3_trace.py", tmp_path_factory.mktemp("zero3_trace"), tiny_ckpt)


def test_the_trace_is_complete_after_every_generation_round_but_the_first(ranks):
    for rank in ranks:
        rounds = rank["rounds"]
        assert len(rounds) == 3 and rank["steps"] == 6
        assert all(r["reset_hook"] for r in rounds)          # the per-forward reset survives generation
        # none before round 1 (nothing ran forward yet); recorded by round 1's passes, kept since
        assert [r["trace"] for r in rounds[1:]] == ["complete", "complete"]


def test_generation_leaves_module_ids_and_hooks_as_they_were(ranks):
    for rank in ranks:
        for r in rank["rounds"]:
            assert r["ds_ids_unchanged"]                      # the trace names modules by ds_id
            assert r["hooks"] == rank["hooks_at_start"]       # re-registered, not piled up
            assert not any(k.endswith(("_fetch_wait", "_all_gather")) for k in r["events_during_generation"])


def test_updates_prefetch_along_the_trace(ranks):
    mu = 2  # ds_zero3_trace.MU: updates per round
    for rank in ranks:
        updates = rank["updates"]
        for u in updates:
            assert u["events"].get("reset_step", 0) == u["micro_batches"]  # one reset per policy forward
        # Round 1's first update may still be recording (its no-grad pass recorded a forward-only
        # trace; DeepSpeed records one over a forward and its backward); complete from then on.
        for u in updates[1:]:
            assert u["trace"] == "complete" and u["events"].get("forward_prefetch_submit", 0) > 0
        # From round 2 on nothing waits for an on-demand gather: the forward prefetches along the
        # trace and keeps what the backward uses again (stage3_max_reuse_distance), which needs
        # the release plan of the forward-and-backward trace, not round 1's forward-only one.
        for u in updates[mu:]:
            e = u["events"]
            assert e.get("forward_fetch_submit", 0) == 0 and e.get("backward_fetch_submit", 0) == 0, e
    a, b = ranks
    assert [u["events"] for u in a["updates"]] == [u["events"] for u in b["updates"]]  # ranks in lockstep
