"""Per-step metrics as JSON lines (one object per optimizer step), safe across resumes."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(value):
    """JSON has no NaN/inf: write them as null so every line parses with any JSON reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends ``{"step": k, ...}`` lines to ``path``. Opening it to resume at step k first drops
    every line with step > k (written after the checkpoint being resumed), so the log ends up with
    each step exactly once."""

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and _step_of(ln) is not None and _step_of(ln) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **{k: _clean(v) for k, v in metrics.items()}})
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line from a crash is dropped


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
