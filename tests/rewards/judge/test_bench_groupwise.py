"""bench/judge_groupwise.py: its Spearman (average ranks, by hand) and its chain kinds, graded by
the rubric with scores worked out by hand."""
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest

from rewards.judge.audit import AuditRecord, build_chains
from rewards.judge.rubric import grade

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("judge_groupwise", ROOT / "bench" / "judge_groupwise.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_average_ranks_and_spearman_by_hand():
    assert bench.average_ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert bench.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert bench.spearman([1, 2, 3], [0.1, 0.5, 0.4]) == pytest.approx(0.5)   # ranks 1,2,3 vs 1,3,2
    # ties: ranks a = 1, 2.5, 2.5, 4 and b = 1, 3, 2, 4; deviations (-1.5, 0, 0, 1.5) and
    # (-1.5, 0.5, -0.5, 1.5): 4.5 / sqrt(4.5 * 5) = 0.948683
    assert bench.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert bench.spearman([0.5, 0.5, 0.5], [1, 2, 3]) is None     # a constant group has no rank order
    assert bench.advantages(np.array([1.0, 0.0])).tolist() == pytest.approx([0.7071, -0.7071], abs=1e-3)


def test_chain_kinds_grade_as_worked_out_by_hand():
    # a 2-option item with one checkable criterion: required steps = the criterion + the conclusion
    r = AuditRecord(1, "fx0", "What is the predominant nuclear size?", "small nuclei",
                    ["small nuclei", "large nuclei"], ["nuclear size is small, not large"])
    audit = {kind: text for _, kind, text in build_chains([r])}
    kinds = bench.kinds_for(r, audit, random.Random(0))

    def reward(kind):
        v = grade(r.question, r.options, r.answer, r.criteria, kinds[kind])
        return (v["integrity"] + v["knowledge"]) / 2

    assert set(kinds) == set(bench.KIND_WEIGHTS)
    assert reward("correct") == reward("reordered") == 1.0
    assert reward("partial") == pytest.approx((0.6 + 1.0) / 2)        # no conclusion: one step missing
    assert reward("wrong_answer") == pytest.approx((1.0 + 0.6) / 2)   # concludes and tags B: one error
    assert reward("wrong_value") == pytest.approx((0.6 + 0.0) / 2)    # criterion missing, nothing correct
    assert reward("answer_only") == pytest.approx((0.2 + 0.0) / 2)    # both steps missing
    assert "</think>" not in kinds["truncated"] and kinds["truncated"].startswith(kinds["correct"][:17])
