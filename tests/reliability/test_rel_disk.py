"""Disk trouble while checkpointing: a full disk, a read-only folder and a write that fails halfway
each stop the run with an error naming the path and the cause; the previous checkpoint stays
intact and resumable, and nothing half-written is ever taken for a checkpoint."""
import errno
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "grpo"))
from ds_common import tiny_model  # noqa: E402
from test_trainer import colour_items  # noqa: E402

from grpo.checkpoint import CheckpointWriteError, latest_checkpoint, list_checkpoints, verify
from grpo.config import SFTConfig
from grpo.sft import SFTTrainer

STEPS = 3


def trainer(tiny_ckpt, out, resume=None):
    items = colour_items(8)
    for it in items:
        it["target"] = "<answer>" + it["answer"] + "</answer>"
    cfg = SFTConfig(per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-3, save_steps=1,
                    save_total_limit=None, output_dir=str(out), disable_tqdm=True, resume_from_checkpoint=resume)
    return SFTTrainer(tiny_model(tiny_ckpt), cfg, items, tiny_model.processor)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fail_save_at(t, step, fault):
    """Make checkpoint-<step>'s write fail with ``fault(tmp_folder)``."""
    real = t.engine.save

    def save(folder):
        if Path(folder).name == f".tmp-checkpoint-{step}":
            fault(Path(folder))
        return real(folder)
    t.engine.save = save


def disk_full(folder):
    with open(folder / "model.safetensors", "wb") as f:  # half a file, then the disk is full
        f.write(b"\0" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))


def read_only(folder):
    raise OSError(errno.EROFS, "Read-only file system", str(folder / "config.json"))


def wrapped_io_error(folder):
    (folder / "optimizer.pt").write_bytes(b"partial")
    try:
        raise OSError(errno.EIO, "Input/output error", str(folder / "optimizer.pt"))
    except OSError as err:  # as torch.save reports a failed write: its own error type around the OSError
        raise RuntimeError("PytorchStreamWriter failed writing file data/0") from err


@pytest.mark.parametrize("fault,code", [(disk_full, "ENOSPC"), (read_only, "EROFS"), (wrapped_io_error, "EIO")])
def test_failed_checkpoint_write_stops_with_path_and_cause_and_keeps_the_previous(tiny_ckpt, tmp_path, fault, code):
    reference = trainer(tiny_ckpt, tmp_path / "reference")
    reference.train()

    out = tmp_path / "run"
    t = trainer(tiny_ckpt, out)
    fail_save_at(t, 2, fault)
    with pytest.raises(CheckpointWriteError) as info:
        t.train()
    message = str(info.value)
    assert f"could not write checkpoint-2 in {out}" in message and code in message
    assert ".tmp-checkpoint-2" in message                      # the path being written
    assert f"previous checkpoint {out / 'checkpoint-1'} is intact" in message
    assert not (out / ".tmp-checkpoint-2").exists()          # nothing half-written left behind
    assert [s for s, _ in list_checkpoints(out)] == [1]
    verify(out / "checkpoint-1")
    assert latest_checkpoint(out) == out / "checkpoint-1"

    resumed = trainer(tiny_ckpt, out, resume="auto")         # the disk is fine again
    history = resumed.train()
    assert resumed.step == STEPS and len(history) == STEPS - 1  # from checkpoint-1, not from scratch
    ref_w, got_w = weights(reference.engine.model), weights(resumed.engine.model)
    assert ref_w.keys() == got_w.keys()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)


def test_first_checkpoint_failing_says_there_is_none_to_resume(tiny_ckpt, tmp_path):
    t = trainer(tiny_ckpt, tmp_path)
    fail_save_at(t, 1, read_only)
    with pytest.raises(CheckpointWriteError, match="no earlier checkpoint exists; make the output folder writable"):
        t.train()
    assert list_checkpoints(tmp_path) == [] and not (tmp_path / ".tmp-checkpoint-1").exists()


def test_a_bug_that_is_not_disk_trouble_is_not_disguised(tiny_ckpt, tmp_path):
    t = trainer(tiny_ckpt, tmp_path)

    def bug(folder):
        raise KeyError("not an I/O error")
    fail_save_at(t, 1, bug)
    with pytest.raises(KeyError):
        t.train()
    assert not (tmp_path / ".tmp-checkpoint-1").exists()
