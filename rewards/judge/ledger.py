"""Usage accounting for the judge client.

:class:`Ledger` counts what the judge cost (requests, tokens, retries, failures, cache hits,
latency); request pacing is :class:`rewards.judge.ratelimit.RateLimiter`.
"""
from __future__ import annotations

import threading
from collections import Counter, deque

_COUNTERS = ("judgments", "successes", "failures", "requests", "retries", "parse_failures",
             "cache_hits", "inflight_dedup", "prompt_tokens", "completion_tokens", "total_tokens")
_LATENCY_WINDOW = 4096


class Ledger:
    """Thread-safe cumulative counters; :meth:`snapshot` gives flat float metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.failure_reasons: Counter[str] = Counter()
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                if name not in _COUNTERS:
                    raise KeyError(f"unknown ledger counter {name!r}")
                self.counts[name] += value

    def fail(self, reason: str) -> None:
        with self._lock:
            self.counts["failures"] += 1
            self.failure_reasons[reason] += 1

    def latency(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)

    def snapshot(self, prefix: str = "judge/") -> dict[str, float]:
        """Counters, latency summary of successful judgments (last 4096), failure reasons."""
        with self._lock:
            out = {f"{prefix}{k}": float(self.counts[k]) for k in _COUNTERS}
            lat = sorted(self._latencies)
            out.update({f"{prefix}fail/{r}": float(n) for r, n in self.failure_reasons.items()})
        if lat:
            out[f"{prefix}latency_mean_s"] = sum(lat) / len(lat)
            out[f"{prefix}latency_p50_s"] = lat[len(lat) // 2]
            out[f"{prefix}latency_p95_s"] = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
            out[f"{prefix}latency_max_s"] = lat[-1]
        return out
