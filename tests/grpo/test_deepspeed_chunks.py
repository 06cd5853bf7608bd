"""ZeRO-3 with ranks that need different numbers of output-head chunks (tests/grpo/ds_chunks.py,
2 real processes, gloo, CPU). Every call of the head gathers its partitioned weight: before the
fix, rank 0 (8-token completions, 8 chunks of 4 rows per micro-batch) called it more often than
rank 1 (2-token completions, 2 chunks) and the ranks waited for each other forever."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ds_common import run_two_ranks  # noqa: E402

pytestmark = pytest.mark.distributed


def test_ranks_with_different_chunk_counts_train_and_match_unchunked(tiny_ckpt, tmp_path):
    ranks = run_two_ranks("ds_chunks.py", tmp_path, tiny_ckpt, timeout=300)   # a hang fails here
    for r in ranks:
        whole, chunked = r["whole"], r["chunked"]
        for key in ("loss", "kl", "grad_norm"):   # chunking changes no value (rows are independent)
            assert chunked[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-8), key
        assert whole["kl"][1] > 0 and whole["grad_norm"][0] > 0
    # both ranks call the head equally often, far more than with one chunk per pass
    assert ranks[0]["chunked"]["head_calls"] == ranks[1]["chunked"]["head_calls"] > 4 * ranks[0]["whole"]["head_calls"]
    assert ranks[0]["whole"]["head_calls"] == ranks[1]["whole"]["head_calls"]
