"""Atomic, verifiable checkpoints and resumable run state.

A checkpoint is a folder ``checkpoint-<step>`` holding the model (``save_pretrained``), optimizer
and scheduler state, ``trainer_state.json`` (step, RNG states, config) and ``MANIFEST.json``
(sha256 of every file). It is written under a temporary name and renamed into place only when
complete, so a crash mid-save leaves the previous checkpoint as the latest usable one; a
checkpoint whose files do not match its manifest is reported, never half-loaded.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from data.readers import file_sha256

MANIFEST = "MANIFEST.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


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
    """Write ``checkpoint-<step>`` atomically (every rank calls this; rank 0 publishes it)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
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
        _prune(output_dir, keep)
    engine.barrier()
    return final


def _prune(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine, folder: Path) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns trainer_state."""
    verify(folder)
    engine.load(folder)
    rng_file = folder / f"rng_rank{engine.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((folder / "trainer_state.json").read_text())
