"""Atomic, verifiable checkpoints and resumable run state.

A checkpoint is a folder ``checkpoint-<step>`` holding the model (``save_pretrained``), optimizer
and scheduler state, ``trainer_state.json`` (step, config, the rewards' state such as the judge
ledger) and every rank's RNG state, and ``MANIFEST.json``
(sha256 of every file). It is written under a temporary name and renamed into place only when
complete, so a crash mid-save leaves the previous checkpoint as the latest usable one; a
checkpoint whose files do not match its manifest is reported, never half-loaded.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from data.readers import file_sha256

MANIFEST = "MANIFEST.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, read-only folder, an I/O error). The half-written
    folder is removed; the checkpoints written before are untouched and still resumable."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_manifest(folder: Path) -> None:
    """``MANIFEST.json``: {file path relative to ``folder``: sha256 of its bytes}, written durably.
    (Not ``data.write_manifest``, which hashes a dataset's records and image bytes, wherever they lie.)"""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(folder)): file_sha256(p) for p in files}
    _write_json_durably(folder / MANIFEST, manifest)


def verify(folder: Path) -> None:
    """Raise if ``folder`` is not a complete, intact checkpoint."""
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise RuntimeError(f"{folder}: no {MANIFEST}; the checkpoint is incomplete (a crash during save?). "
                           f"Resume from an earlier checkpoint-<step> folder or delete this one")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or "trainer_state.json" not in manifest:
        raise RuntimeError(f"{folder}: {MANIFEST} is unreadable or lists no trainer_state.json; the "
                           f"checkpoint is corrupt. Resume from an earlier checkpoint or delete this one")
    for rel, digest in manifest.items():
        p = folder / rel
        if not p.is_file():
            raise RuntimeError(f"{folder}: file {rel} listed in {MANIFEST} is missing; the checkpoint is corrupt")
        if file_sha256(p) != digest:
            raise RuntimeError(f"{folder}: {rel} does not match its sha256 in {MANIFEST}; the checkpoint is "
                               f"corrupt. Resume from an earlier checkpoint or delete this one")


def _write_json_durably(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies (corrupt ones are skipped with a warning)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            verify(path)
            return path
        except RuntimeError as err:
            warnings.warn(f"skipped: {err}", RuntimeWarning, stacklevel=2)
    return None


def save_checkpoint(engine, output_dir: Path, step: int, trainer_state: dict, keep: int | None) -> Path:
    """Write ``checkpoint-<step>`` atomically (every rank calls this; rank 0 publishes it).

    Everything is written into ``.tmp-checkpoint-<step>`` (a name never taken for a checkpoint)
    and renamed into place after the manifest. If a write fails - no space left, a read-only
    folder, an I/O error halfway through a file - the temporary folder is removed and
    :class:`CheckpointWriteError` names the path, the cause and the checkpoint to resume from."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    try:
        if engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        engine.barrier()
        engine.save(tmp)
        rng = rng_state()
        torch.save(rng, tmp / f"rng_rank{engine.rank}.pt")
        engine.barrier()
        if engine.is_main:
            _write_json_durably(tmp / "trainer_state.json", trainer_state)
            _fsync_tree(tmp)
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, OSError) and not _caused_by_oserror(err):
            raise
        raise CheckpointWriteError(_write_error_message(err, tmp, output_dir, step)) from err
    if engine.is_main:
        _prune(output_dir, keep)
    engine.barrier()
    return final


def _caused_by_oserror(err: BaseException) -> bool:
    """torch.save and safetensors wrap the OSError of a failed write in their own errors."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return isinstance(err, OSError)


def _write_error_message(err: BaseException, tmp: Path, output_dir: Path, step: int) -> str:
    cause = err
    while not isinstance(cause, OSError) and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    code = errno.errorcode.get(getattr(cause, "errno", None) or -1, "")
    where = getattr(cause, "filename", None) or tmp
    hint = {"ENOSPC": "free disk space", "EROFS": "make the output folder writable",
            "EACCES": "make the output folder writable", "EDQUOT": "raise the disk quota"}.get(code, "check the disk")
    previous = [p.name for _, p in list_checkpoints(output_dir) if _ != step]
    resume = (f"the previous checkpoint {output_dir / previous[-1]} is intact; {hint}, then resume with "
              f"resume_from_checkpoint='auto'") if previous else f"no earlier checkpoint exists; {hint} and rerun"
    return (f"could not write checkpoint-{step} in {output_dir}: {code + ': ' if code else ''}"
            f"{getattr(cause, 'strerror', None) or cause} (writing {where}); the partial folder was removed, {resume}")


def _prune(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def check_lora_matches(folder: Path, lora: bool) -> None:
    """A LoRA checkpoint holds only adapters (``model/adapter_config.json``) and a full one only
    full weights: resuming one with a trainer of the other kind cannot work, so say which."""
    has_adapters = (folder / "model" / "adapter_config.json").is_file()
    if has_adapters and not lora:
        raise RuntimeError(f"{folder} holds LoRA adapters (model/adapter_config.json), not full weights, but "
                           f"this trainer has no peft_config: pass the peft_config of the run that wrote it "
                           f"(the base weights are loaded as that run started), or set "
                           f"resume_from_checkpoint=None to start over")
    if lora and not has_adapters:
        raise RuntimeError(f"{folder} holds full model weights, not LoRA adapters (no model/adapter_config.json), "
                           f"but this trainer was given a peft_config: drop peft_config to resume it, or set "
                           f"resume_from_checkpoint=None to start a LoRA run over")


def load_checkpoint(engine, folder: Path) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns trainer_state."""
    verify(folder)
    check_lora_matches(folder, engine.lora is not None)
    engine.load(folder)
    rng_file = folder / f"rng_rank{engine.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((folder / "trainer_state.json").read_text())


# ---------------------------------------------------------------- pre-flight: room for a checkpoint
MARGIN_FRACTION, MARGIN_BYTES = 0.10, 64 << 20   # on top of the estimate: tokenizer, RNG, JSON, slack


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitions: ds_numel is the full size


def estimate_checkpoint_bytes(model: torch.nn.Module, deepspeed: bool = False) -> tuple[int, str]:
    """(bytes, how they were counted) of one checkpoint of ``model``, all ranks' files together.

    Plain PyTorch: the weights (each parameter at its dtype's size) plus AdamW's two moments at
    4 bytes each per trainable parameter (exact for fp32 parameters, an overestimate for 16-bit
    ones). DeepSpeed: the weights twice (the Hugging Face folder, and DeepSpeed's module state,
    which ZeRO-3 does not write: an overestimate there) plus 12 bytes per trainable parameter (fp32
    master copy and two fp32 moments, every rank's shard). A LoRA policy (``models.lora``: peft
    marks the model with ``peft_config``) writes only its trainable weights, the adapters.
    Then a margin of 10 % + 64 MiB."""
    params = list(model.parameters())
    lora = getattr(model, "peft_config", None) is not None
    weights = sum(_numel(p) * p.element_size() for p in params if p.requires_grad or not lora)
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    optimizer = trainable * (12 if deepspeed else 8)
    base = weights * (2 if deepspeed else 1) + optimizer
    need = base + int(MARGIN_FRACTION * base) + MARGIN_BYTES
    how = (f"{_size(weights * (2 if deepspeed else 1))} of {'LoRA adapter ' if lora else ''}weights"
           f"{' (twice, DeepSpeed)' if deepspeed else ''} + "
           f"{_size(optimizer)} of Adam state for {trainable:,} trainable parameters + 10 % + 64 MiB margin")
    return need, how


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def output_dir_problems(output_dir: Path, need: int | None = None, how: str = "") -> list[str]:
    """Why checkpoints could not be written to ``output_dir`` (each problem naming the field), or
    []: the folder can be created, is writable (``os.access`` and a test file written, fsynced
    and removed), and its disk has ``need`` bytes free (``shutil.disk_usage``)."""
    where = f"output_dir={str(output_dir)!r}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return [f"{where}: cannot be created ({_oserror(err)}); choose a folder this user can write to"]
    if not os.access(output_dir, os.W_OK | os.X_OK):
        return [f"{where}: not writable by this user (os.access); choose another folder or fix its permissions"]
    try:
        fd, probe = tempfile.mkstemp(prefix=".preflight-", dir=output_dir)
        try:
            os.write(fd, b"pre-flight")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        return [f"{where}: writing a test file failed ({_oserror(err)}); choose a writable folder"]
    if need is not None:
        free = shutil.disk_usage(output_dir).free
        if free < need:
            return [f"{where}: {_size(free)} free on its disk, one checkpoint needs about {_size(need)} ({how}); "
                    f"free space or point output_dir to a larger disk"]
    return []


def _oserror(err: OSError) -> str:
    code = errno.errorcode.get(err.errno or -1, "")
    return f"{code + ': ' if code else ''}{err.strerror or err}"
