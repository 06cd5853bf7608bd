"""Usage accounting and request pacing for the judge client.

:class:`Ledger` counts what the judge cost (requests, tokens, retries, failures, cache hits,
latency); :class:`RateLimiter` keeps request starts under a per-minute budget.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from typing import Callable

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


class RateLimiter:
    """Sliding window: at most ``per_minute`` request starts in any 60-second interval.

    Each call *reserves* the earliest allowed start time, so concurrent callers are served in
    arrival order without holding a lock while they sleep. Thread-safe and loop-agnostic.
    """

    def __init__(self, per_minute: float | None, clock: Callable[[], float] = time.monotonic):
        self.limit = int(per_minute) if per_minute else None
        self._clock = clock
        # Only the last `limit` starts matter: a new start must be >= 60 s after the oldest.
        self._starts: deque[float] = deque(maxlen=self.limit)
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Book the next start slot; returns how many seconds to wait for it."""
        if self.limit is None:
            return 0.0
        with self._lock:
            now = self._clock()
            start = max(now, self._starts[-1]) if self._starts else now
            if len(self._starts) == self.limit:
                start = max(start, self._starts[0] + 60.0)
            self._starts.append(start)
            return start - now

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)
