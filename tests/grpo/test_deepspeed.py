"""DeepSpeed ZeRO-3 on CPU with 2 real processes (gloo): one job per test session runs every
scenario (tests/grpo/ds_scenarios.py) and writes JSON; these tests check it against a
1-process run of the same global batch computed here."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ds_common import FIXED_BATCH, FixedSampler, LengthReward, dataset, gathered_params, make_config, run_two_ranks, tiny_model  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def two_ranks(tiny_ckpt, tmp_path_factory):
    return run_two_ranks("ds_scenarios.py", tmp_path_factory.mktemp("ds"), tiny_ckpt, timeout=900)


def test_zero3_partitions_every_parameter(two_ranks):
    for rank in two_ranks:
        assert rank["world_size"] == 2 and rank["zero_stage"] == 3
        # with stage3_param_persistence_threshold = 0 each rank holds only its shard of every tensor
        assert rank["partitioned_frac"] == 1.0


def test_zero3_two_processes_match_one_process_on_the_same_global_batch(two_ranks, tiny_ckpt, tmp_path):
    from grpo import GRPOTrainer
    # 1 process, twice the prompts per step = the same global batch, no DeepSpeed
    cfg = make_config(str(tmp_path), **{**FIXED_BATCH, "prompts_per_step": 2 * FIXED_BATCH["prompts_per_step"],
                                        "per_device_train_batch_size": 4})
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                          processing_class=tiny_model.processor)
    trainer.sampler = FixedSampler()
    single = trainer.train()
    ds = two_ranks[0]
    # Step 1 sees identical weights and batch: only the summation order differs (per-rank partial
    # sums, then a gloo all-reduce), a few fp32 ulps. Later steps follow 1-3 Adam updates at
    # lr 1e-2, whose first step divides each gradient coordinate by its own magnitude and so
    # magnifies rounding differences; 1e-3 relative still separates a wrong normaliser (a factor 2).
    for key, ours in (("loss", "loss"), ("grad_norm", "grad_norm"), ("kl", "kl_mean"), ("reward_mean", "reward/mean")):
        expected = [h[ours] for h in single]
        assert ds[key][0] == pytest.approx(expected[0], rel=1e-5, abs=1e-7), key
        assert ds[key] == pytest.approx(expected, rel=1e-3, abs=1e-6), key
    assert abs(ds["loss"][0]) > 1e-3 and ds["kl"][-1] > 0  # the comparison is not of zeros
    params = gathered_params(trainer.engine.model)
    lr, steps = 1e-2, FIXED_BATCH["max_steps"]
    for name, values in params.items():
        worst = max(abs(a - b) for a, b in zip(ds["params"][name], values))
        # k_proj.bias shifts every attention logit of a query equally, so softmax cancels it: its
        # exact gradient is 0 and Adam turns the rounding noise into steps of up to lr each.
        limit = lr * steps if name.endswith("k_proj.bias") else 5e-5
        assert worst < limit, (name, worst)


@pytest.fixture(scope="module")
def single_process(tiny_ckpt, tmp_path_factory):
    """The 1-process, no-DeepSpeed run of the same global batch."""
    from grpo import GRPOTrainer
    cfg = make_config(str(tmp_path_factory.mktemp("single")),
                      **{**FIXED_BATCH, "prompts_per_step": 2 * FIXED_BATCH["prompts_per_step"], "per_device_train_batch_size": 4})
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                          processing_class=tiny_model.processor)
    trainer.sampler = FixedSampler()
    return trainer.train()


@pytest.mark.parametrize("variant", ["zero2", "zero3_offload"])
def test_other_zero_stages_accumulate_gradients_like_one_process(two_ranks, single_process, variant):
    """Gradient accumulation over 2 micro-batches: a step whose gradients were never reduced
    shows as grad norm 0 (ZeRO-3 offload) or a crash (ZeRO-2); both must match 1 process."""
    ds = two_ranks[0][variant]
    assert ds["zero_stage"] == int(variant[4])
    for key, ours in (("grad_norm", "grad_norm"), ("loss", "loss"), ("kl", "kl_mean")):
        expected = [h[ours] for h in single_process]
        assert ds[key][0] == pytest.approx(expected[0], rel=1e-5, abs=1e-7), key
        assert ds[key] == pytest.approx(expected, rel=1e-3, abs=1e-6), key
    assert min(ds["grad_norm"]) > 0.1


def test_zero3_rollout_with_an_imageless_rank_and_reference_engine(two_ranks):
    for rank in two_ranks:  # rank 1's prompts hold no image; no hang, both ranks finished
        assert rank["gen_has_ref"]
        assert all(length > 0 for length in rank["gen_lengths"])
        assert rank["gen_kl"][0] == 0.0 and rank["gen_kl"][1] > 0  # policy moved away from the reference
    assert two_ranks[0]["gen_loss"] == two_ranks[1]["gen_loss"]  # metrics are averaged over ranks


def test_each_rank_samples_from_its_own_seed(two_ranks):
    """Sampling seeds are the run seed + rank (TRL's device-specific seeding): rank 0 keeps the
    run seed, and the two ranks draw different completions for the same prompt."""
    seeds = [r["gen_seed"] for r in two_ranks]
    assert seeds == [two_ranks[0]["gen_run_seed"], two_ranks[0]["gen_run_seed"] + 1]
    a, b = (r["gen_same_prompt_ids"] for r in two_ranks)
    assert len(a) == len(b) == 4 and a != b


@pytest.mark.parametrize("tag", ["", "sampled_"], ids=["forced", "sampled"])
def test_zero3_resume_continues_with_identical_losses(two_ranks, tag):
    """Forced completions, and real sampling from each rank's own stream (seed + rank): the
    resumed steps have the losses and completion lengths of the uninterrupted run."""
    rank = two_ranks[0]
    full, tail = rank[f"{tag}resume_full"], rank[f"{tag}resume_tail"]
    assert len(tail) == 2
    assert [x for pair in tail for x in pair] == pytest.approx([x for pair in full[1:] for x in pair],
                                                               rel=1e-6, abs=1e-9)
