"""GRPOTrainer in one process: it learns, it resumes exactly, it logs what it promises, and its
checkpoints are atomic and verified."""
import json
import math
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ds_common import CountingSampler, FixedSampler, LengthReward, dataset, make_config, tiny_model  # noqa: E402

from grpo import GRPOConfig, GRPOTrainer
from grpo.checkpoint import latest_checkpoint, verify
from grpo.config import SFTConfig
from grpo.metrics import read_metrics
from grpo.rollout import mask_after_eos
from grpo.sft import SFTTrainer
from rewards import Reward

COLOURS = {"A": (220, 30, 30), "B": (30, 30, 220)}


class ColourLetter(Reward):
    """1 when the completion is exactly the letter naming the image's colour."""
    name = "colour"

    def score(self, sample):
        return 1.0 if sample.completion.strip() == sample.answer else 0.0


def colour_items(n=32, seed=0):
    from PIL import Image
    rng = random.Random(seed)
    items = []
    for i in range(n):
        k = "AB"[i % 2]
        items.append({"id": str(i), "question": "Colour?", "answer": k, "target": rng.choice("AB"),
                      "images": [Image.new("RGB", (56, 56), COLOURS[k])],
                      "messages": [{"role": "user", "content": [{"type": "image"},
                                                                {"type": "text", "text": "Colour? A) red B) blue"}]}]})
    return items


def test_grpo_learns_the_colour_letter_after_format_only_sft(tiny_ckpt, tmp_path):
    """SFT teaches the answer format with letters drawn independently of the image (so it cannot
    teach the colour); GRPO with the colour reward must then learn to read the image."""
    items, model = colour_items(), tiny_model(tiny_ckpt)
    model.model.visual.requires_grad_(True)
    proc = tiny_model.processor
    SFTTrainer(model, SFTConfig(per_device_train_batch_size=16, max_steps=30, learning_rate=3e-3,
                                output_dir=str(tmp_path / "sft"), disable_tqdm=True), items, proc).train()
    cfg = GRPOConfig(num_generations=8, per_device_train_batch_size=32, max_steps=40, learning_rate=1e-3,
                     max_completion_length=3, beta=0.0, output_dir=str(tmp_path / "grpo"), disable_tqdm=True)
    history = GRPOTrainer(model, [ColourLetter()], args=cfg, train_dataset=items, processing_class=proc).train()
    rewards = [h["reward/mean"] for h in history]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert 0.25 < first < 0.75          # SFT left it at chance on the colour
    assert last > 0.85 and last > first + 0.25


def test_batch_not_divisible_into_groups_names_the_fields():
    with pytest.raises(ValueError, match="per_device_train_batch_size \\* gradient_accumulation_steps = 3 \\* 2 = 6 .*"
                                         "num_generations=4"):
        GRPOConfig(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=4)
    with pytest.raises(ValueError, match="num_generations=1"):
        GRPOConfig(num_generations=1, per_device_train_batch_size=2)
    # TRL's layout: completions per step = per-device batch x accumulation; B = that / G
    cfg = GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3, num_generations=6)
    assert (cfg.completions_per_step, cfg.prompts_per_step) == (12, 2)
    assert SFTConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3).batch_size == 12


def test_resume_from_step_k_gives_the_same_next_losses(tiny_ckpt, tmp_path):
    """Real sampling (RNG restored from the checkpoint), 5 steps straight vs 2 + resume to 5."""
    def run(out, steps, resume=None, save_steps=0):
        cfg = make_config(str(out), max_steps=steps, save_steps=save_steps, beta=0.04,
                          resume_from_checkpoint=resume, loss_type="dapo")
        return GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                           processing_class=tiny_model.processor).train()
    straight = run(tmp_path / "a", 5)
    run(tmp_path / "b", 2, save_steps=2)
    resumed = run(tmp_path / "b", 5, resume="auto")
    assert len(resumed) == 3
    for key in ("loss", "reward/mean", "grad_norm", "kl_mean", "completion/length_mean"):
        assert [h[key] for h in resumed] == pytest.approx([h[key] for h in straight[2:]], rel=1e-6, abs=1e-9), key
    assert abs(resumed[-1]["loss"]) > 0
    steps = [m["step"] for m in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]     # nothing duplicated or missing across the resume


def test_metrics_cover_rewards_lengths_kl_clipping_and_timings(tiny_ckpt, tmp_path):
    cfg = make_config(str(tmp_path), max_steps=2, beta=0.04, num_iterations=2, log_completions=True, num_completions_to_print=2)
    GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                processing_class=tiny_model.processor).train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    expected = {"reward/mean", "reward/std", "reward/length/mean", "reward/length/std", "frac_zero_std_groups",
                "completion/length_mean", "completion/length_min", "completion/length_max",
                "completion/truncated_frac", "kl_mean", "entropy", "clipfrac_low", "clipfrac_high",
                "ratio_mean", "ratio_min", "ratio_max", "grad_norm", "learning_rate", "loss",
                "time/generate", "time/reward", "time/logprobs", "time/update", "time/step"}
    assert expected <= set(rows[0]), expected - set(rows[0])
    assert rows[0]["ratio_min"] == rows[0]["ratio_max"] == 1.0      # first pass: on-policy
    assert rows[1]["ratio_min"] < 1.0 < rows[1]["ratio_max"]        # mu=2: second pass is off-policy
    assert rows[0]["completion/length_min"] <= rows[0]["completion/length_mean"] <= rows[0]["completion/length_max"]
    logged = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and {"completion", "reward", "id"} <= set(logged[0])


def test_mask_after_first_eos_and_truncation_flag():
    ids = torch.tensor([[5, 6, 9, 7, 9], [5, 6, 7, 8, 4], [9, 1, 1, 1, 1]])
    mask, truncated = mask_after_eos(ids, eos_ids=[9])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_masked_truncated_completions_leave_the_loss(tiny_ckpt, tmp_path):
    cfg = make_config(str(tmp_path), max_steps=1, mask_truncated_completions=True)
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                          processing_class=tiny_model.processor)
    trainer.sampler = FixedSampler()
    batch = trainer.rollout(0)
    truncated = batch.completions.truncated
    assert truncated.any() and (~truncated).any()
    assert batch.loss_mask[truncated].sum() == 0
    assert torch.equal(batch.loss_mask[~truncated], batch.completions.mask[~truncated])
    assert batch.num_tokens == float(batch.completions.mask[~truncated].sum())


def test_image_placeholders_are_never_sampled(tiny_ckpt, tmp_path):
    cfg = make_config(str(tmp_path), max_steps=1, max_completion_length=16, temperature=5.0)
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                          processing_class=tiny_model.processor)
    ids = trainer.rollout(0).completions.ids
    assert not torch.isin(ids, torch.tensor(trainer.adapter.never_sample_ids)).any()


def test_checkpoint_crash_mid_save_and_corruption_are_detected(tiny_ckpt, tmp_path):
    cfg = make_config(str(tmp_path), max_steps=2, save_steps=1, save_total_limit=3)
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                          processing_class=tiny_model.processor)
    trainer.sampler = FixedSampler()
    trainer.train()
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    # a crash while writing checkpoint-3 leaves only its temporary folder: ignored
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / ".tmp-checkpoint-3")
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    # a flipped byte in the newest checkpoint: detected, the previous one is used
    weights = tmp_path / "checkpoint-2" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="does not match its sha256"):
        verify(tmp_path / "checkpoint-2")
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"


def test_sft_trains_only_on_assistant_tokens(tiny_ckpt, tmp_path):
    items = colour_items(8)
    for it in items:
        it["target"] = "<answer>" + it["answer"] + "</answer>"
    trainer = SFTTrainer(tiny_model(tiny_ckpt), SFTConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=25,
                         learning_rate=3e-3, output_dir=str(tmp_path), disable_tqdm=True), items,
                         tiny_model.processor)
    ids, mask = trainer.encode_targets(items[:2])
    tok = trainer.adapter.tokenizer
    assert tok.decode(ids[0][mask[0].bool()]) == "<answer>A</answer><|im_end|>"   # target + end of turn only
    history = trainer.train()
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["token_prob_mean"] > 0.6


# --------------------------------------------------------------------------- issue 17

class FlatFor(Reward):
    """A constant reward (no spread: zero-std groups) for the items in ``flat``, the dense length
    reward for the others."""
    name = "flat_or_length"

    def __init__(self, flat):
        super().__init__()
        self.flat = set(flat)

    def score(self, sample):
        if sample.extra["id"] in self.flat:
            return 0.5
        return max(0.0, 1.0 - abs(len(sample.completion) - 12) / 12)


def _expected_attempts(trainer, round_idx, flat, b, max_extra):
    """Extra rounds and zero-std share of attempt 0, worked out from the item streams."""
    attempts = [trainer.items_for_round(round_idx, b)] + [trainer.resample_items(round_idx, k, b)
                                                           for k in range(1, max_extra + 1)]
    informative = 0
    for k, items in enumerate(attempts):
        informative += sum(it["id"] not in flat for it in items)
        if informative >= b:
            return k, sum(it["id"] in flat for it in attempts[0]) / b
    return max_extra, sum(it["id"] in flat for it in attempts[0]) / b


def test_dynamic_sampling_drops_zero_std_groups_and_refills_the_batch(tiny_ckpt, tmp_path):
    flat = {"q0", "q1", "q2", "q3", "q4"}
    cfg = make_config(str(tmp_path), max_steps=1, dynamic_sampling=True, max_resample_rounds=4)
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [FlatFor(flat)], args=cfg, train_dataset=dataset(),
                          processing_class=tiny_model.processor)
    trainer.sampler = CountingSampler()
    seen_extra = []
    for round_idx in range(4):
        calls = trainer.sampler.calls
        batch = trainer.rollout(round_idx)
        extra, zero_frac = _expected_attempts(trainer, round_idx, flat, 2, 4)
        m = batch.metrics
        assert m["dynamic_sampling/extra_rounds"] == extra
        assert m["dynamic_sampling/zero_std_fraction"] == zero_frac      # before refilling
        assert trainer.sampler.calls - calls == extra + 1
        assert len(batch.prompts) == len(batch.advantages) == batch.completions.ids.shape[0] == 8  # B*G kept
        assert m["dynamic_sampling/filled_frac"] == 0.0 and m["frac_zero_std_groups"] == 0.0
        groups = batch.scores[:, 0].view(2, 4)
        assert (groups.amax(1) > groups.amin(1)).all()                   # only informative groups
        assert (batch.advantages.view(2, 4) != 0).any(1).all()
        seen_extra.append(extra)
    assert max(seen_extra) >= 1                                          # it did resample
    # the reassembled batch trains like any other
    out = trainer.update(batch)
    assert math.isfinite(out["loss"]) and out["grad_norm"] > 0


def test_dynamic_sampling_gives_up_after_max_rounds_and_fills_with_zero_std_groups(tiny_ckpt, tmp_path):
    cfg = make_config(str(tmp_path), max_steps=1, dynamic_sampling=True, max_resample_rounds=2)
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [FlatFor({f"q{i}" for i in range(8)})], args=cfg,
                          train_dataset=dataset(), processing_class=tiny_model.processor)
    trainer.sampler = CountingSampler()
    m = trainer.rollout(0).metrics
    assert trainer.sampler.calls == 3
    assert (m["dynamic_sampling/extra_rounds"], m["dynamic_sampling/filled_frac"],
            m["dynamic_sampling/zero_std_fraction"], m["frac_zero_std_groups"]) == (2.0, 1.0, 1.0, 1.0)
    assert m["dynamic_sampling/generated_groups"] == 6.0


def test_resume_with_dynamic_sampling_gives_the_same_next_steps(tiny_ckpt, tmp_path):
    """Real sampling; the extra prompts are a function of (round, attempt), the RNG is restored."""
    flat = {"q0", "q1", "q2", "q3"}

    def run(out, steps, resume=None, save_steps=0):
        cfg = make_config(str(out), max_steps=steps, save_steps=save_steps, resume_from_checkpoint=resume,
                          dynamic_sampling=True, max_resample_rounds=3, loss_type="dapo")
        return GRPOTrainer(tiny_model(tiny_ckpt), [FlatFor(flat)], args=cfg, train_dataset=dataset(),
                           processing_class=tiny_model.processor).train()
    straight = run(tmp_path / "a", 5)
    run(tmp_path / "b", 2, save_steps=2)
    resumed = run(tmp_path / "b", 5, resume="auto")
    for key in ("loss", "reward/mean", "grad_norm", "completion/length_mean", "dynamic_sampling/extra_rounds",
                "dynamic_sampling/zero_std_fraction"):
        assert [h[key] for h in resumed] == pytest.approx([h[key] for h in straight[2:]], rel=1e-6, abs=1e-9), key
    assert sum(h["dynamic_sampling/extra_rounds"] for h in straight) > 0


def test_dynamic_sampling_ranks_stay_in_step(tiny_ckpt, tmp_path):
    """Two ranks in two threads, joined by fake collectives: rank 1's own prompts carry no signal,
    rank 0's do. Both make the same generation attempts; rank 0 keeps its own groups."""
    import threading
    world, slots, barrier = 2, [None, None], threading.Barrier(2)

    def collective(rank, combine):
        def op(t):
            slots[rank] = t.clone()
            barrier.wait()
            out = combine(list(slots))
            barrier.wait()
            return out
        return op

    cfg = make_config(str(tmp_path), max_steps=1, dynamic_sampling=True, max_resample_rounds=3)
    trainers = []
    for rank in range(world):
        t = GRPOTrainer(tiny_model(tiny_ckpt), [FlatFor(set())], args=cfg, train_dataset=dataset(),
                        processing_class=tiny_model.processor)
        t.engine.world_size, t.engine.rank, t.engine.is_main = world, rank, rank == 0
        t.engine.all_reduce_sum = collective(rank, lambda xs: sum(xs))
        t.engine.all_gather_cat = collective(rank, lambda xs: torch.cat(xs))
        t.sampler = CountingSampler()
        trainers.append(t)
    flat = {it["id"] for it in trainers[1].items_for_round(0, 2)}
    assert not flat & {it["id"] for it in trainers[0].items_for_round(0, 2)}
    for t in trainers:
        t.rewards[0].flat = flat
    batches = [None, None]

    def run(rank):
        batches[rank] = trainers[rank].rollout(0)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert all(b is not None for b in batches), "a rank hung or failed"
    m0, m1 = batches[0].metrics, batches[1].metrics
    assert trainers[0].sampler.calls == trainers[1].sampler.calls == m0["dynamic_sampling/extra_rounds"] + 1 >= 2
    for key in ("dynamic_sampling/extra_rounds", "dynamic_sampling/zero_std_fraction", "reward/mean",
                "dynamic_sampling/generated_groups"):
        assert m0[key] == m1[key], key
    assert m0["dynamic_sampling/zero_std_fraction"] == 0.5          # rank 1's 2 groups of 4
    assert all(len(b.advantages) == 8 for b in batches)
    # rank 0 trains on its own round-0 groups, as generated (FixedSampler: completions follow the prompt)
    own = trainers[0].items_for_round(0, 2)
    prompts = trainers[0].adapter.encode_prompts(*map(list, zip(*(trainers[0].prompt_fn(it) for it in own))))
    assert torch.equal(batches[0].completions.ids, FixedSampler()(None, trainers[0].adapter,
                                                                   prompts.repeat_interleave(4), cfg).ids)
    # rank 1 replaced both of its zero-std groups with informative ones from the extra rounds
    groups = batches[1].scores[:, 0].view(2, 4)
    assert m1["dynamic_sampling/filled_frac"] == 0.0 and (groups.amax(1) > groups.amin(1)).all()


def test_overlong_penalty_sees_completion_token_counts(tiny_ckpt, tmp_path):
    from rewards import OverlongPenalty
    cfg = make_config(str(tmp_path), max_steps=1, max_completion_length=8)
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [OverlongPenalty(buffer=4), LengthReward()], args=cfg,
                          train_dataset=dataset(), processing_class=tiny_model.processor)
    trainer.sampler = FixedSampler()
    batch = trainer.rollout(0)
    lengths = batch.completions.lengths.tolist()
    # L_max 8, buffer 4: 0 up to 4 tokens, then (4 - L) / 4 down to -1 at 8 (a truncated completion)
    expected = [0.0 if n <= 4 else (4 - n) / 4 for n in lengths]
    assert batch.scores[:, 0].tolist() == pytest.approx(expected)
    assert min(expected) == -1.0 and max(expected) == 0.0 and len(set(expected)) > 2
    assert set(batch.metrics) >= {"advantage_share/overlong", "advantage_share/length"}


def test_top_entropy_quantile_and_entropy_bonus(tiny_ckpt, tmp_path):
    cfg = make_config(str(tmp_path), max_steps=1, per_device_train_batch_size=8, top_entropy_quantile=0.5,
                      entropy_coef=0.05, loss_type="dapo", entropy_top_k=5)
    trainer = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                          processing_class=tiny_model.processor)
    trainer.sampler = FixedSampler()
    batch = trainer.rollout(0)
    valid, pg = batch.loss_mask.bool(), batch.pg_mask
    assert not (pg & ~valid).any()
    n = int(valid.sum())
    assert abs(int(pg.sum()) - n / 2) <= 1
    assert batch.metrics["entropy/selected_frac"] == pytest.approx(int(pg.sum()) / n)
    _, ent = trainer._logprobs(trainer.engine.forward, batch.prompts, batch.completions)
    assert ent[pg].min() >= batch.metrics["entropy/threshold"] > ent[valid & ~pg].max()

    # advantages 0: the policy term vanishes, what is left is the bonus on the selected tokens
    batch.advantages = torch.zeros_like(batch.advantages)
    out = trainer.update(batch)
    bonus = float((ent * pg).sum() / pg.sum())
    assert out["loss"] == pytest.approx(-0.05 * float((ent * pg).sum()) / n, rel=1e-4)
    assert out["entropy/bonus"] == pytest.approx(0.05 * bonus, rel=1e-4)
    assert out["grad_norm"] > 0                                       # the bonus has a gradient
    assert 0 < out["entropy/top_k"] <= math.log(5) + 1e-6
    # no token selected: neither the policy gradient nor the bonus acts
    batch.advantages = torch.linspace(-1, 1, len(batch.advantages))
    batch.pg_mask = torch.zeros_like(pg)
    out = trainer.update(batch)
    assert out["loss"] == 0.0 and out["grad_norm"] == 0.0


class HasLetterA(Reward):
    name = "has_a"

    def score(self, sample):
        return float("a" in sample.completion.lower())


def test_normalize_then_sum_matches_gdpo_and_changes_the_advantage_shares(tiny_ckpt, tmp_path):
    from test_issue17_reference import ref_gdpo_advantages
    shares = {}
    for mode, scale in (("sum_then_normalize", "group"), ("normalize_then_sum", "batch")):
        cfg = make_config(str(tmp_path / mode), max_steps=1, prompts_per_step=4, multi_objective_aggregation=mode,
                          scale_rewards=scale, reward_weights=(1.0, 0.2))
        trainer = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward(), HasLetterA()], args=cfg,
                              train_dataset=dataset(), processing_class=tiny_model.processor)
        trainer.sampler = FixedSampler()
        batch = trainer.rollout(0)
        shares[mode] = [batch.metrics["advantage_share/length"], batch.metrics["advantage_share/has_a"]]
        assert sum(shares[mode]) == pytest.approx(1.0)
        if mode == "normalize_then_sum":
            ref = ref_gdpo_advantages(batch.scores.view(4, 4, 2).double().numpy(), [1.0, 0.2], cfg.advantage_eps)
            assert batch.advantages.tolist() == pytest.approx(ref.reshape(-1).tolist(), abs=1e-5)
        # reward/mean stays the weighted sum of the raw rewards, whatever the aggregation
        raw = [a + 0.2 * b for a, b in batch.scores.tolist()]
        assert batch.metrics["reward/mean"] == pytest.approx(sum(raw) / len(raw), rel=1e-6)
    # Summed raw, the 0/1 reward's spread (~0.5) outweighs the length reward's despite its weight 0.2;
    # z-scored first, each reward's share follows its weight: 0.2 / 1.2 = 0.167
    by_weight = 0.2 / 1.2
    assert abs(shares["normalize_then_sum"][1] - by_weight) < 0.02
    assert abs(shares["sum_then_normalize"][1] - by_weight) > 0.05


def test_max_steps_minus_one_trains_num_train_epochs(tiny_ckpt, tmp_path):
    """TRL's convention: max_steps=-1 means num_train_epochs passes over the prompts. 8 items,
    B = 2 prompts per step: 4 data rounds per epoch; 1.5 epochs -> ceil(6) = 6 rounds, each used
    num_iterations = 2 times -> 12 optimizer steps (and the LR schedule spans those 12)."""
    cfg = make_config(str(tmp_path / "g"), max_steps=-1, num_train_epochs=1.5, num_iterations=2)
    t = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(8),
                    processing_class=tiny_model.processor)
    assert t.args.max_steps == 12 and cfg.max_steps == -1
    # SFT: 8 items, 4 examples per step (2 x 2): 2 steps per epoch; 2.25 epochs -> ceil(4.5) = 5
    items = [{**it, "target": "<think>x</think><answer>A</answer>"} for it in dataset(8)]
    s = SFTTrainer(tiny_model(tiny_ckpt), SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                                    num_train_epochs=2.25, output_dir=str(tmp_path / "s")),
                   items, tiny_model.processor)
    assert s.args.max_steps == 5


def test_bnpo_is_the_local_token_mean_averaged_over_micro_batches(tiny_ckpt, tmp_path):
    """TRL's loss types on one process: with the whole step in one micro-batch "bnpo" (local
    token mean) and "dapo" (global token mean) are the same loss; split into micro-batches of
    unequal token counts, bnpo's logged loss is the mean of the per-micro-batch token means."""
    losses = {}
    for name, kw in {"dapo": dict(loss_type="dapo", per_device_train_batch_size=8),
                     "bnpo": dict(loss_type="bnpo", per_device_train_batch_size=8),
                     "bnpo_split": dict(loss_type="bnpo", per_device_train_batch_size=4),
                     "dapo_split": dict(loss_type="dapo", per_device_train_batch_size=4)}.items():
        torch.manual_seed(0)
        cfg = make_config(str(tmp_path / name), max_steps=1, **kw)
        t = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                        processing_class=tiny_model.processor)
        t.sampler = FixedSampler()
        batch = t.rollout(0)
        losses[name] = (t.update(batch)["loss"], batch)
    close = lambda a, b: abs(a - b) <= 1e-5 * max(1.0, abs(b))  # noqa: E731
    assert close(losses["bnpo"][0], losses["dapo"][0])
    assert close(losses["dapo_split"][0], losses["dapo"][0])     # global normaliser: split-invariant
    batch = losses["bnpo_split"][1]
    tokens = [float(batch.loss_mask[rows].sum()) for rows in ([0, 1, 2, 3], [4, 5, 6, 7])]
    assert tokens[0] != tokens[1]
    # at the first update the ratio is 1 and beta = 0: the per-token loss is -A at every token
    adv = batch.advantages
    per_micro = [float(-(adv[rows].unsqueeze(1) * batch.loss_mask[rows]).sum()) / n
                 for rows, n in zip(([0, 1, 2, 3], [4, 5, 6, 7]), tokens)]
    assert close(losses["bnpo_split"][0], sum(per_micro) / 2)
    assert close(losses["dapo"][0], float(-(adv.unsqueeze(1) * batch.loss_mask).sum()) / sum(tokens))
