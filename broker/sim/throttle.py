"""Canvas's request throttle, as the simulator models it (docs/simulator.md#rate-limit).

:class:`CanvasThrottle` (the default) follows Canvas's own middleware,
``app/middleware/request_throttle.rb`` in instructure/canvas-lms, and its Redis script
``app/middleware/request_throttle/increment_bucket.lua``:

- one leaky bucket per access token; its ``count`` leaks at ``outflow`` units a second, never
  below 0, and never rises above ``maximum`` (800);
- when a request arrives its bucket is charged an *up-front cost* (50) first, and the request
  is refused if the bucket is then at or above the *high-water mark* (600): ``403`` with the
  body ``403 Forbidden (Rate Limit Exceeded)`` and no ``X-Request-Cost``;
- when it finishes, the up-front cost is credited back and the request's real cost charged
  (on Canvas, its CPU plus database seconds; here a cost per endpoint), so parallel requests
  pay for being in flight together and sequential ones do not;
- every answer carries ``X-Rate-Limit-Remaining``: the high-water mark minus the count,
  after the request settled (it can be negative, down to ``hwm - maximum``).

:class:`SimpleThrottle` is the simulator's earlier model, kept as a configuration: each request
adds ``request_cost`` to a bucket of ``capacity`` that drains at ``leak_per_second``, and a
request that would overflow it gets a bare ``403 Rate Limit Exceeded``.

Both are told the time (the simulator's injectable clock), so tests need not sleep.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Protocol

CANVAS_THROTTLED_BODY: Final = "403 Forbidden (Rate Limit Exceeded)\n"
SIMPLE_THROTTLED_BODY: Final = "Rate Limit Exceeded"

DEFAULT_COSTS: Final[tuple[tuple[str, str, float], ...]] = (
    # (method, path pattern, cost): a listing across an account or a course roster costs more
    # than a lookup, as on Canvas where cost is the request's CPU and database time.
    ("GET", r"/api/v1/accounts/[^/]+/courses", 5.0),
    ("GET", r"/api/v1/courses/[^/]+/(users|enrollments)", 2.0),
    ("POST", r"/api/v1/.*", 2.0),
    ("PUT", r"/api/v1/.*", 2.0),
    ("DELETE", r"/api/v1/.*", 2.0),
)
"""Costs of the endpoints that are not ``default_cost``; the first match wins."""


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a request may run, and what its answer reports if it may not."""

    allowed: bool
    token: str


class Throttle(Protocol):
    """What the simulator's API pipeline asks of a throttle."""

    throttled_body: str

    @property
    def full(self) -> float:
        """The capacity an untouched bucket reports."""

    def admit(self, token: str, method: str, path: str, now: float) -> Admission:
        """Charge a request's arrival to ``token``'s bucket; whether it may run."""

    def settle(
        self, admission: Admission, method: str, path: str, now: float
    ) -> tuple[float | None, float]:
        """The request is answered: its cost (None if refused) and the remaining capacity."""

    def reset(self) -> None:
        """Forget every bucket."""


@dataclass
class _Bucket:
    count: float
    touched: float


@dataclass
class CanvasThrottle:
    """Canvas's leaky bucket with a high-water mark and an up-front cost (see the module)."""

    maximum: float = 800.0
    high_water_mark: float = 600.0
    outflow: float = 10.0
    up_front_cost: float = 50.0
    default_cost: float = 1.0
    costs: tuple[tuple[str, str, float], ...] = DEFAULT_COSTS
    throttled_body: str = CANVAS_THROTTLED_BODY
    _buckets: dict[str, _Bucket] = field(default_factory=dict, init=False, repr=False)
    _patterns: list[tuple[str, re.Pattern[str], float]] = field(
        default_factory=list, init=False, repr=False
    )

    def __post_init__(self) -> None:
        self._patterns = [(m, re.compile(p), c) for m, p, c in self.costs]

    @property
    def full(self) -> float:
        """An untouched bucket's remaining capacity: the high-water mark."""
        return self.high_water_mark

    def cost_of(self, method: str, path: str) -> float:
        """The cost of one request to this endpoint (HEAD costs what GET does)."""
        method = "GET" if method == "HEAD" else method
        for wanted, pattern, cost in self._patterns:
            if wanted == method and pattern.fullmatch(path):
                return cost
        return self.default_cost

    def _increment(self, token: str, amount: float, now: float) -> float:
        # increment_bucket.lua: leak (never below 0), add, clamp to [0, maximum].
        bucket = self._buckets.setdefault(token, _Bucket(0.0, now))
        if bucket.count > 0:
            bucket.count = max(0.0, bucket.count - self.outflow * (now - bucket.touched))
        bucket.touched = now
        bucket.count = min(self.maximum, max(0.0, bucket.count + amount))
        return bucket.count

    def admit(self, token: str, method: str, path: str, now: float) -> Admission:
        """Charge the up-front cost; refused if the bucket is now "full" (at the mark)."""
        del method, path  # Canvas can set up-front costs by path; the simulator needs none.
        count = self._increment(token, self.up_front_cost, now)
        return Admission(allowed=count < self.high_water_mark, token=token)

    def settle(
        self, admission: Admission, method: str, path: str, now: float
    ) -> tuple[float | None, float]:
        """Credit the up-front cost back and charge the real cost (none if refused)."""
        cost = self.cost_of(method, path) if admission.allowed else 0.0
        count = self._increment(admission.token, cost - self.up_front_cost, now)
        return (cost if admission.allowed else None), self.high_water_mark - count

    def remaining(self, token: str, now: float) -> float:
        """The capacity ``token`` has left at ``now``, as an answer then would report it."""
        return self.high_water_mark - self._increment(token, 0.0, now)

    def reset(self) -> None:
        """Forget every bucket."""
        self._buckets.clear()


@dataclass
class SimpleThrottle:
    """The simulator's earlier bucket: a fixed cost per request, refused when it overflows."""

    capacity: float = 700.0
    leak_per_second: float = 10.0
    request_cost: float = 1.0
    throttled_body: str = SIMPLE_THROTTLED_BODY
    _buckets: dict[str, _Bucket] = field(default_factory=dict, init=False, repr=False)

    @property
    def full(self) -> float:
        """An untouched bucket's remaining capacity."""
        return self.capacity

    def admit(self, token: str, method: str, path: str, now: float) -> Admission:
        """Charge ``request_cost`` unless it would overflow ``capacity``."""
        del method, path
        bucket = self._buckets.setdefault(token, _Bucket(0.0, now))
        bucket.count = max(0.0, bucket.count - (now - bucket.touched) * self.leak_per_second)
        bucket.touched = now
        if bucket.count + self.request_cost > self.capacity:
            return Admission(allowed=False, token=token)
        bucket.count += self.request_cost
        return Admission(allowed=True, token=token)

    def settle(
        self, admission: Admission, method: str, path: str, now: float
    ) -> tuple[float | None, float]:
        """The fixed cost, and what is left (0 when refused, as this model always said)."""
        del method, path, now
        if not admission.allowed:
            return self.request_cost, 0.0
        return self.request_cost, self.capacity - self._buckets[admission.token].count

    def reset(self) -> None:
        """Forget every bucket."""
        self._buckets.clear()
