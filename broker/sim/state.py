"""The simulator's mutable state: data, accepted tokens, the throttle, received requests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.sim.data import SimData, seed_data
from broker.sim.throttle import CanvasThrottle, Throttle

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


@dataclass
class SimState:
    """Everything one simulator instance knows; share it with the test that drives it.

    `throttle` is Canvas's request throttle (`broker.sim.throttle.CanvasThrottle`) or the
    simpler `SimpleThrottle`, both on `clock`. `latency` is how long
    each API call takes before it is answered, so parallel calls are in flight together, as
    Canvas's up-front cost needs them to be to show. `clock` is injectable so tests need
    not sleep.
    """

    tokens: set[str] = field(default_factory=set)
    data: SimData = field(default_factory=seed_data)
    file_host: str = DEFAULT_FILE_HOST
    throttle: Throttle = field(default_factory=CanvasThrottle)
    latency: float = 0.0
    max_per_page: int = 100
    clock: Callable[[], float] = time.monotonic
    received: list[ReceivedRequest] = field(default_factory=list)

    def clear(self) -> None:
        """Forget the requests received so far."""
        self.received.clear()

    def received_paths(self) -> list[str]:
        """Return the raw path of every request received so far, in order."""
        return [request.raw_path for request in self.received]
