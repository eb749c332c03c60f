"""Token buckets per key, in memory, bounded: the token endpoint's limits.

Contract: docs/interfaces.md#token-endpoint-limits. Pure: the caller passes the time.

A bucket holds up to ``burst`` requests and refills at ``rate`` a second. At most ``max_keys``
buckets are kept; past that the one touched longest ago is forgotten (it is as full as a new
one would be if it had been idle for ``burst / rate`` seconds, which is what it most likely
was), so a flood of distinct keys costs bounded memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

MAX_KEYS: Final = 10_000
BURST_SECONDS: Final = 10
"""A bucket's depth, in seconds of its rate: a client may burst ten seconds' worth."""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    touched: float


class KeyedBuckets:
    """One token bucket per key (a source address, a client id)."""

    def __init__(
        self, rate: float, *, burst: float | None = None, max_keys: int = MAX_KEYS
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate * BURST_SECONDS)
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str, now: float) -> int | None:
        """Take one request from ``key``'s bucket: None if allowed, else whole seconds to wait."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.touched)
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
            bucket.touched = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return max(1, math.ceil((1 - bucket.tokens) / self.rate))

    def __len__(self) -> int:
        return len(self._buckets)
