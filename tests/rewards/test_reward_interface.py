"""The Reward interface and score_all: contracts, abstain handling, metrics, the docs example."""
import asyncio
import math
import re
from pathlib import Path

import pytest
import torch

from rewards import AsyncReward, Reward, RewardError, RewardSample, score_all

SAMPLES = [RewardSample(question="q", completion=c, answer="a") for c in ("x", "xx", "xxxx")]


class Length(Reward):
    name = "length"

    def score(self, sample):
        return len(sample.completion) / 4


class SlowHalf(AsyncReward):
    name = "slow"

    async def ascore(self, sample):
        await asyncio.sleep(0.05)
        return None if len(sample.completion) == 2 else 0.5


class Returns(Reward):
    def __init__(self, values, **kw):
        super().__init__(**kw)
        self.values = values

    def score_batch(self, samples):
        return self.values


def test_scores_tensor_and_metrics_by_hand():
    scores, metrics = score_all([Length(), SlowHalf(weight=2.0)], SAMPLES)
    assert scores.dtype == torch.float32 and scores.shape == (3, 2)
    assert scores[:, 0].tolist() == [0.25, 0.5, 1.0]
    assert scores[0, 1] == 0.5 and math.isnan(scores[1, 1]) and scores[2, 1] == 0.5
    assert metrics["reward/length/mean"] == pytest.approx(1.75 / 3)
    assert metrics["reward/length/abstain_rate"] == 0.0
    assert metrics["reward/slow/mean"] == 0.5
    assert metrics["reward/slow/abstain_rate"] == pytest.approx(1 / 3)


def test_async_rewards_run_concurrently():
    rewards = [SlowHalf(name=f"slow{i}") for i in range(4)]
    import time
    start = time.perf_counter()
    score_all(rewards, SAMPLES * 10)
    assert time.perf_counter() - start < 0.05 * 5  # 120 sleeps of 50 ms overlap


def test_sync_call_of_async_reward_and_use_inside_a_running_loop():
    assert SlowHalf().score(SAMPLES[0]) == 0.5

    async def inside():
        return score_all([SlowHalf()], SAMPLES)[0]
    assert asyncio.run(inside())[0, 0] == 0.5


@pytest.mark.parametrize("values,message", [
    ([0.5, 0.5], "returned 2 values for 3 samples"),
    ([0.5, float("nan"), 0.5], "returned nan for sample 1"),
    ([0.5, 1.5, 0.5], "outside its declared range"),
    ([0.5, "0.5", 0.5], "returned str for sample 1"),
    ([0.5, True, 0.5], "returned bool"),
    (None, "returned NoneType"),
])
def test_contract_violations_name_the_reward(values, message):
    with pytest.raises(RewardError, match=re.escape("reward 'bad'")) as info:
        score_all([Returns(values, name="bad")], SAMPLES)
    assert message in str(info.value)


def test_declared_range_is_respected():
    class Signed(Returns):
        range = (-1.0, 1.0)
    scores, _ = score_all([Signed([-1.0, 0, 1], name="signed")], SAMPLES)
    assert scores[:, 0].tolist() == [-1.0, 0.0, 1.0]


def test_duplicate_names_and_raising_reward():
    with pytest.raises(RewardError, match="unique"):
        score_all([Length(), Length()], SAMPLES)

    class Boom(Reward):
        name = "boom"

        def score(self, sample):
            raise KeyError("column")
    with pytest.raises(RewardError, match="reward 'boom' raised KeyError"):
        score_all([Boom()], SAMPLES)


def test_empty_batch_and_bad_constructor_args():
    scores, metrics = score_all([Length(), SlowHalf()], [])
    assert scores.shape == (0, 2) and math.isnan(metrics["reward/length/mean"])
    with pytest.raises(ValueError, match="weight must be a finite number"):
        Length(weight=float("inf"))
    with pytest.raises(NotImplementedError, match="must override score"):
        Reward().score(SAMPLES[0])


def test_docs_custom_reward_example_runs():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "rewards.md").read_text()
    block = re.search(r"<!-- example: custom-reward -->\n```python\n(.*?)```", doc, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(block, "docs/rewards.md", "exec"), namespace)
    scores, metrics = namespace["scores"], namespace["metrics"]
    # The example's two completions: 40 words (over budget by 20 -> 0.5) and 10 words (1.0).
    assert scores[:, 0].tolist() == [0.5, 1.0]
    assert metrics["reward/brevity/mean"] == 0.75
