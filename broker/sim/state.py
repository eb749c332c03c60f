"""The simulator's mutable state: data, accepted tokens, rate-limit buckets, received requests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.sim.data import SimData, seed_data

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_FILE_HOST = "http://files.sim.invalid"


@dataclass(frozen=True)
class ReceivedRequest:
    """One HTTP request exactly as it reached the simulator, before anything acted on it.

    `method` is the method on the wire, before any `_method` override. `raw_path` is the
    percent-encoded path as sent; `query_string` is the raw query without the `?`. Header names
    are lower-case; values, order and duplicates are as received.
    """

    method: str
    raw_path: str
    query_string: str
    headers: list[tuple[str, str]]
    body: bytes

    def header_values(self, name: str) -> list[str]:
        """Return every value received for header `name` (case-insensitive), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key == wanted]

    def header(self, name: str) -> str | None:
        """Return the first value received for header `name`, or None if it was not sent."""
        values = self.header_values(name)
        return values[0] if values else None

    @property
    def target(self) -> str:
        """The request target: raw path plus `?query` when there was one."""
        return f"{self.raw_path}?{self.query_string}" if self.query_string else self.raw_path


@dataclass(frozen=True)
class RateLimitDecision:
    """The outcome of charging one request to a token's bucket."""

    allowed: bool
    cost: float
    remaining: float


@dataclass
class _Bucket:
    level: float
    updated_at: float


@dataclass
class SimState:
    """Everything one simulator instance knows; share it with the test that drives it.

    The rate limit is Canvas's leaky bucket: each request adds `request_cost` to its token's
    bucket, which drains at `rate_limit_leak_per_second`; a request that would overflow
    `rate_limit_capacity` is refused with 403. `clock` is injectable so tests need not sleep.
    """

    tokens: set[str] = field(default_factory=set)
    data: SimData = field(default_factory=seed_data)
    file_host: str = DEFAULT_FILE_HOST
    rate_limit_capacity: float = 700.0
    rate_limit_leak_per_second: float = 10.0
    request_cost: float = 1.0
    max_per_page: int = 100
    clock: Callable[[], float] = time.monotonic
    received: list[ReceivedRequest] = field(default_factory=list)
    _buckets: dict[str, _Bucket] = field(default_factory=dict, init=False, repr=False)

    def clear(self) -> None:
        """Forget the requests received so far."""
        self.received.clear()

    def received_paths(self) -> list[str]:
        """Return the raw path of every request received so far, in order."""
        return [request.raw_path for request in self.received]

    def charge(self, token: str) -> RateLimitDecision:
        """Charge one request to `token`'s bucket, or refuse it if the bucket would overflow."""
        now = self.clock()
        bucket = self._buckets.setdefault(token, _Bucket(0.0, now))
        drained = (now - bucket.updated_at) * self.rate_limit_leak_per_second
        bucket.level = max(0.0, bucket.level - drained)
        bucket.updated_at = now
        if bucket.level + self.request_cost > self.rate_limit_capacity:
            return RateLimitDecision(allowed=False, cost=self.request_cost, remaining=0.0)
        bucket.level += self.request_cost
        remaining = self.rate_limit_capacity - bucket.level
        return RateLimitDecision(allowed=True, cost=self.request_cost, remaining=remaining)
