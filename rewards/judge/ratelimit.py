"""Request pacing for the judge client: a sliding-window limit on request starts per minute."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Callable


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
