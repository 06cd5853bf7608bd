"""Bad input fails at start-up with a message naming the field (configs), and corrupt
checkpoints are detected by their sha256 manifest instead of being half-loaded."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "grpo"))
from ds_common import FixedSampler, LengthReward, dataset, make_config, tiny_model  # noqa: E402

from grpo import GRPOConfig, GRPOTrainer
from grpo.checkpoint import MANIFEST, latest_checkpoint
from grpo.config import SFTConfig

BAD_CONFIGS = [
    (dict(max_steps="10"), r"max_steps='10': expected an integer"),
    (dict(learning_rate="1e-6"), r"learning_rate='1e-6': expected a number"),
    (dict(disable_tqdm="yes"), r"disable_tqdm='yes': expected true or false"),
    (dict(beta=-0.1), r"beta=-0.1: must be >= 0"),
    (dict(epsilon=1.2), r"epsilon=1.2: must be in \[0, 1\)"),
    (dict(epsilon_high=-0.2), r"epsilon_high=-0.2: must be >= 0"),
    (dict(delta=0.5), r"delta=0.5: must be > 1"),
    (dict(num_generations=1, per_device_train_batch_size=2), r"num_generations=1: GRPO needs at least 2"),
    (dict(per_device_train_batch_size=6, gradient_accumulation_steps=1, num_generations=4),
     r"per_device_train_batch_size \* gradient_accumulation_steps = 6 \* 1 = 6 completions per step is not a "
     r"multiple of num_generations=4: .* set gradient_accumulation_steps to 2"),
    (dict(generation_chunk_size=3), r"generation_chunk_size=3: must divide the 8 completions per step"),
    (dict(max_steps=0), r"max_steps=0: must be >= 1, or -1 to train num_train_epochs epochs"),
    (dict(num_train_epochs=0.0), r"num_train_epochs=0.0: must be > 0"),
    (dict(scale_rewards="groups"), r"scale_rewards='groups': choose one of group, batch, none"),
    (dict(loss_type="ppo"), r"loss_type='ppo': choose one of grpo, bnpo, dapo, dr_grpo"),
    (dict(num_completions_to_print=0), r"num_completions_to_print=0: must be >= 1, or None"),
    (dict(temperature=0.0), r"temperature=0.0: must be > 0"),
    (dict(top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
    (dict(max_grad_norm=float("nan")), r"max_grad_norm=nan: must be finite"),
    (dict(kl_estimator="k4"), r"kl_estimator='k4': choose one of k1, k2, k3"),
    (dict(adam_beta2=1.0), r"adam_beta1=0.9, adam_beta2=1.0, adam_epsilon=1e-08: need betas in \[0, 1\)"),
    (dict(reward_weights=(1.0, float("inf"))), r"reward_weights=\(1.0, inf\): expected a tuple of finite numbers"),
    (dict(max_abstain_rate=1.5), r"max_abstain_rate=1.5: must be in \[0, 1\)"),
    (dict(abstain_window=0), r"abstain_window=0: must be >= 1"),
    (dict(deepspeed="no/such/zero3.json"), r"deepspeed='no/such/zero3.json': no such file"),
]


@pytest.mark.parametrize("changes, message", BAD_CONFIGS, ids=[next(iter(c)) for c, _ in BAD_CONFIGS])
def test_bad_config_fails_at_start_up_naming_the_field(changes, message):
    base = dict(num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**{**base, **changes})


def test_every_problem_is_reported_at_once_and_unknown_fields_are_named(tmp_path):
    with pytest.raises(ValueError) as info:
        GRPOConfig(beta=-1.0, epsilon=2.0, per_device_train_batch_size=4)
    assert "beta=-1.0" in str(info.value) and "epsilon=2.0" in str(info.value)
    with pytest.raises(TypeError, match="learning_rat"):
        GRPOConfig(learning_rat=1e-6)
    broken = tmp_path / "zero3.json"
    broken.write_text('{"zero_optimization": {"stage": 3,}')
    with pytest.raises(ValueError, match=r"deepspeed='.*zero3.json': not valid JSON"):
        SFTConfig(deepspeed=str(broken))


def trained(tiny_ckpt, out, **kw):
    cfg = make_config(str(out), save_steps=1, save_total_limit=None, **kw)
    t = GRPOTrainer(tiny_model(tiny_ckpt), [LengthReward()], args=cfg, train_dataset=dataset(),
                    processing_class=tiny_model.processor)
    t.sampler = FixedSampler()
    return t


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_checkpoints_are_detected_never_half_loaded(tiny_ckpt, tmp_path):
    trained(tiny_ckpt, tmp_path, max_steps=2).train()
    flip_byte(tmp_path / "checkpoint-2" / "optimizer.pt")
    # an explicit corrupt checkpoint: refused before anything is loaded into the model
    t = trained(tiny_ckpt, tmp_path, max_steps=3, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    before = {k: v.clone() for k, v in t.engine.model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"optimizer.pt does not match its sha256 in MANIFEST.json"):
        t.train()
    assert all(torch.equal(before[k], v) for k, v in t.engine.model.state_dict().items())
    # "auto" falls back to the newest intact checkpoint, with a warning
    with pytest.warns(RuntimeWarning, match="checkpoint-2.*corrupt"):
        history = trained(tiny_ckpt, tmp_path, max_steps=3, resume_from_checkpoint="auto").train()
    assert len(history) == 2                                   # resumed after step 1
    # an unreadable manifest is corruption too; when nothing verifies, "auto" refuses to start over
    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}" / MANIFEST).write_text('{"model/config.json": ')
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert latest_checkpoint(tmp_path) is None
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no checkpoint-<step> folder verifies"):
        trained(tiny_ckpt, tmp_path, max_steps=4, resume_from_checkpoint="auto").train()
