"""Dynamic sampling across 2 real processes (DeepSpeed ZeRO-3 on CPU, gloo): the decision to
generate more is global, so both ranks make the same generation rounds and the job neither hangs
nor lets a rank train on zero-std groups it could have replaced (tests/grpo/ds_dynamic_sampling.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ds_common import run_two_ranks  # noqa: E402

pytestmark = pytest.mark.distributed


def test_dynamic_sampling_two_ranks_generate_in_step(tiny_ckpt, tmp_path):
    r0, r1 = run_two_ranks("ds_dynamic_sampling.py", tmp_path, tiny_ckpt)
    assert r0["flat_own"] == [] and len(r1["flat_own"]) > 0        # only rank 1's prompts lack signal
    assert r0["calls"] == r1["calls"] > 2                          # extra rounds, made by both ranks
    # metrics are averaged over ranks: the global decision makes them agree
    assert r0["dynamic_sampling/extra_rounds"] == r1["dynamic_sampling/extra_rounds"]
    assert r0["calls"] == sum(x + 1 for x in r0["dynamic_sampling/extra_rounds"])
    assert all(x >= 1 for x in r0["dynamic_sampling/extra_rounds"])
    assert all(z >= 0.5 for z in r0["dynamic_sampling/zero_std_fraction"])  # rank 1's 2 of 4, before refilling
    # after refilling, the only zero-std groups left are the fillers used when the rounds ran out
    assert r0["frac_zero_std_groups"] == r0["dynamic_sampling/filled_frac"]
    assert all(f < 0.5 for f in r0["dynamic_sampling/filled_frac"])  # rank 1 replaced some of its groups
    assert all(abs(x) > 0 for x in r0["grad_norm"])
