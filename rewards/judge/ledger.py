"""Usage accounting for the judge client.

:class:`Ledger` counts what the judge cost (requests, tokens, retries, failures, cache hits,
latency); request pacing is :class:`rewards.judge.ratelimit.RateLimiter`.

``judgments``, ``successes``, ``failures``, ``cache_hits``, ``inflight_dedup`` and
``fail/<reason>`` count *chains* (samples) in both judging modes, so ``failures / judgments`` is
the abstain rate either way; ``requests`` and the token counters count what was sent. Group
judging adds ``groups`` (group judgments asked for), ``group_duplicates`` (chains identical to
another chain of their group, sent once) and ``group_incomplete`` (replies that did not grade
every chain). ``out_of_range`` counts replies refused for a score outside ``[0, 1]``.
``preflight_requests`` counts the requests of pre-flight probes (:meth:`JudgeClient.probe`, sent
once per training process before its first rollout); they are in ``requests`` and the token
counters too, since they are paid like any other.

Across a resume: :meth:`Ledger.state_dict` is what a checkpoint stores (the run's totals) and
:meth:`Ledger.load_state_dict` makes the totals that again, so :meth:`snapshot` (the logged
``judge/*`` metrics) is cumulative over every process of a run. ``counts`` and
``failure_reasons`` stay this process's own; the latency summary is this process's only.
"""
from __future__ import annotations

import threading
from collections import Counter, deque

_COUNTERS = ("judgments", "successes", "failures", "requests", "retries", "parse_failures",
             "cache_hits", "inflight_dedup", "prompt_tokens", "completion_tokens", "total_tokens",
             "out_of_range", "groups", "group_duplicates", "group_incomplete", "preflight_requests")
_LATENCY_WINDOW = 4096


class Ledger:
    """Thread-safe cumulative counters; :meth:`snapshot` gives flat float metrics.

    ``counts`` and ``failure_reasons`` hold what this process counted. A run resumed from a
    checkpoint adds the totals the checkpoint recorded (:meth:`load_state_dict`): :meth:`total`,
    :meth:`snapshot` and :meth:`state_dict` report the run's totals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.failure_reasons: Counter[str] = Counter()
        # restored totals minus what this process had counted when they were restored
        self._offset: Counter[str] = Counter()
        self._offset_reasons: Counter[str] = Counter()
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                if name not in _COUNTERS:
                    raise KeyError(f"unknown ledger counter {name!r}")
                self.counts[name] += value

    def fail(self, reason: str, n: int = 1) -> None:
        """``n`` judgments (chains) failed for ``reason``."""
        with self._lock:
            self.counts["failures"] += n
            self.failure_reasons[reason] += n

    def count(self, name: str) -> int:
        """What this process counted (not the restored totals)."""
        with self._lock:
            return self.counts[name]

    def total(self, name: str) -> int:
        """The run's total: restored from a checkpoint, plus this process's since."""
        with self._lock:
            return self.counts[name] + self._offset[name]

    def latency(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)

    def _totals(self) -> tuple[dict[str, int], dict[str, int]]:
        counts = {k: self.counts[k] + self._offset[k] for k in _COUNTERS}
        reasons = {r: self.failure_reasons[r] + self._offset_reasons[r]
                   for r in set(self.failure_reasons) | set(self._offset_reasons)}
        return counts, {r: n for r, n in reasons.items() if n}

    def state_dict(self) -> dict:
        """The run's totals as plain JSON (what a checkpoint stores): ``{"counts": {counter: n},
        "failure_reasons": {reason: n}}``. No latencies, no secrets."""
        with self._lock:
            counts, reasons = self._totals()
        return {"counts": {k: v for k, v in counts.items() if v}, "failure_reasons": reasons}

    def load_state_dict(self, state: dict) -> None:
        """Make the totals those of ``state`` (from :meth:`state_dict`): what is counted from now
        on adds to them. Loading the same state twice (two rewards sharing a client) is harmless."""
        counts, reasons = _read_counter_map(state, "counts"), _read_counter_map(state, "failure_reasons")
        unknown = sorted(set(counts) - set(_COUNTERS))
        if unknown:
            raise ValueError(f"ledger state has unknown counters {unknown}; was it written by a newer version?")
        with self._lock:
            self._offset = Counter({k: counts.get(k, 0) - self.counts[k] for k in _COUNTERS})
            self._offset_reasons = Counter({r: reasons.get(r, 0) - self.failure_reasons[r]
                                            for r in set(reasons) | set(self.failure_reasons)})

    def snapshot(self, prefix: str = "judge/") -> dict[str, float]:
        """The run's counters, latency summary of this process's successful judgments (last
        4096), failure reasons."""
        with self._lock:
            counts, reasons = self._totals()
            out = {f"{prefix}{k}": float(counts[k]) for k in _COUNTERS}
            lat = sorted(self._latencies)
            out.update({f"{prefix}fail/{r}": float(n) for r, n in reasons.items()})
        if lat:
            out[f"{prefix}latency_mean_s"] = sum(lat) / len(lat)
            out[f"{prefix}latency_p50_s"] = lat[len(lat) // 2]
            out[f"{prefix}latency_p95_s"] = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
            out[f"{prefix}latency_max_s"] = lat[-1]
        return out


def _read_counter_map(state, key: str) -> dict[str, int]:
    value = state.get(key, {}) if isinstance(state, dict) else None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              and v >= 0 for k, v in value.items()):
        raise ValueError(f"ledger state: {key!r} must map names to counts >= 0, got {value!r}")
    return dict(value)
