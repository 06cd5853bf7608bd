"""Per-step metrics as JSON lines (one object per optimizer step), safe across resumes -- the
always-on backend of ``grpo.reporting`` -- and the guard that stops a run whose judge-based reward
has mostly abstained."""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections import deque
from pathlib import Path
from typing import Callable

log = logging.getLogger("grpo")


def _clean(value):
    """JSON has no NaN/inf: write them as null so every line parses with any JSON reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends ``{"step": k, ...}`` lines to ``path``. Opening it to resume at step k first drops
    every line with step > k (written after the checkpoint being resumed), so the log ends up with
    each step exactly once. The ``"jsonl"`` backend of :class:`grpo.reporting.Reporter`."""

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh run (resume_step None) starts a fresh log.
        keep_up_to = resume_step if resume_step is not None else -1
        truncate_jsonl(self.path, lambda obj: int(obj["step"]) <= keep_up_to)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **{k: _clean(v) for k, v in metrics.items()}})
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    # the backend interface of grpo.reporting.Reporter
    def log_metrics(self, step: int, metrics: dict) -> None:
        self.write(step, metrics)

    def log_table(self, step: int, name: str, columns: list, rows: list) -> None:
        """Tables are not kept here (GRPO's sample completions go to completions.jsonl)."""

    def close(self, failed: bool = False) -> None:
        """Nothing to do: every line is flushed and fsynced when written."""


def truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite ``path`` (atomically) with only the lines for which ``keep(obj)`` is true. Lines
    that do not parse -- a torn last line from a crash -- are dropped."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if keep(json.loads(line)):
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


class AbstainRateError(RuntimeError):
    """A reward abstained so often that its signal is meaningless (``GRPOConfig.max_abstain_rate``)."""


class AbstainGuard:
    """Watches ``reward/<name>/abstain_rate`` after each generation round.

    Any abstention is logged (a ``logging`` warning each round, a ``RuntimeWarning`` the first time
    per reward) with the judge's failure reasons. When ``max_rate`` is set and the mean rate over
    the last ``window`` rounds exceeds it, :class:`AbstainRateError` stops the run. Every rank
    sees the same all-reduced rates, so every rank raises at the same step.
    """

    def __init__(self, names: list[str], max_rate: float | None, window: int = 1):
        self.names, self.max_rate = list(names), max_rate
        self.history = {n: deque(maxlen=window) for n in self.names}
        self._warned: set[str] = set()

    def state(self) -> dict:
        return {n: list(h) for n, h in self.history.items()}

    def load_state(self, state: dict) -> None:
        for n, rates in (state or {}).items():
            if n in self.history:
                self.history[n].extend(rates)

    def check(self, step: int, metrics: dict) -> None:
        failures = {k.removeprefix("judge/fail/"): int(v) for k, v in metrics.items()
                    if k.startswith("judge/fail/") and v}
        for name in self.names:
            rate = float(metrics.get(f"reward/{name}/abstain_rate", 0.0))
            self.history[name].append(rate)
            if rate > 0:
                self._warn(step, name, rate, failures)
            hist = self.history[name]
            if self.max_rate is None or len(hist) < hist.maxlen:
                continue
            mean = sum(hist) / len(hist)
            if mean > self.max_rate:
                raise AbstainRateError(
                    f"reward {name!r} abstained on {mean:.1%} of samples over the last {len(hist)} "
                    f"generation round(s) up to step {step}, above GRPOConfig.max_abstain_rate="
                    f"{self.max_rate}; judge failures so far: {failures or 'none recorded'}. How to fix: "
                    f"check the judge server (URL, key, timeout) and resume_from_checkpoint='auto', "
                    f"or raise max_abstain_rate / abstain_window")

    def _warn(self, step: int, name: str, rate: float, failures: dict) -> None:
        msg = (f"step {step}: reward {name!r} abstained on {rate:.1%} of samples (judge failures so "
               f"far: {failures or 'none recorded'}); training continues with the rewards that exist")
        log.warning(msg)
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
