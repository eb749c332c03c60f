"""Canvas's rate limit per worker credential, shared fairly (docs/proxy-rules.md#canvas-capacity).

One :class:`~broker.core.capacity.Budget` per worker credential, in this process's memory. Its
state comes from the headers Canvas returns (``X-Rate-Limit-Remaining`` is Canvas's own count,
not a broker estimate), so the processes and replicas of one broker converge on the same view
without sharing any state; what each one shares out is the outflow among the clients it
serves itself.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from broker.core import admission
from broker.core.capacity import Budget, ClientShare, Decision, parse_number

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from broker.config import Settings
    from broker.metrics import Metrics


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


class CanvasCapacity:
    """Admits calls by fair share while a credential's Canvas capacity is low; tracks it."""

    def __init__(
        self, settings: Settings, metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._reserve = settings.canvas_reserve
        self._outflow = settings.canvas_outflow
        self._metrics = metrics
        self._clock = clock
        self._budgets: dict[str, Budget] = {}
        # Labelled metric children, looked up once each: labels() costs more than the update.
        self._costs: dict[str, Any] = {}
        self._remaining: dict[str, Any] = {}

    def _budget(self, credential_id: str) -> Budget:
        budget = self._budgets.get(credential_id)
        if budget is None:
            budget = self._budgets[credential_id] = Budget()
        return budget

    def admit(self, credential_id: str, client_id: str, weight: float) -> Decision:
        """Decide one call; a refusal raises the ``429 canvas_capacity`` refusal."""
        budget = self._budget(credential_id)
        decision = budget.admit(
            self._clock(), client_id, weight, reserve=self._reserve, outflow=self._outflow
        )
        if not decision.allowed:
            self._metrics.canvas_held_back.labels(credential=credential_id, client=client_id).inc()
            raise admission.over_canvas_share(decision.retry_after)
        return decision

    def settle(
        self,
        credential_id: str,
        client_id: str,
        decision: Decision,
        headers: Sequence[tuple[bytes, bytes]] | None,
    ) -> float | None:
        """An admitted call is over; Canvas's headers (None if it never answered). Its cost."""
        budget = self._budget(credential_id)
        cost = remaining = None
        if headers is not None:
            cost = parse_number(_header(headers, b"x-request-cost"))
            remaining = parse_number(_header(headers, b"x-rate-limit-remaining"))
        now = self._clock()
        budget.settle(now, client_id, decision, cost=cost, remaining=remaining)
        if cost is not None and cost > 0:
            counter = self._costs.get(client_id)
            if counter is None:
                counter = self._costs[client_id] = self._metrics.canvas_cost.labels(
                    client=client_id
                )
            counter.inc(cost)
        estimate = budget.estimate(now, self._outflow)
        if estimate is not None:
            gauge = self._remaining.get(credential_id)
            if gauge is None:
                gauge = self._remaining[credential_id] = self._metrics.canvas_remaining.labels(
                    credential=credential_id
                )
            gauge.set(estimate)
        return cost

    def throttled(self, credential_id: str, client_id: str) -> None:
        """Canvas refused a call of this client with its rate-limit 403."""
        self._metrics.canvas_throttled.labels(credential=credential_id, client=client_id).inc()

    def share(self, credential_id: str, client_id: str) -> tuple[ClientShare | None, float | None]:
        """The client's share and the credential's estimated remaining capacity, now."""
        budget = self._budgets.get(credential_id)
        if budget is None:
            return None, None
        now = self._clock()
        return budget.share_of(now, client_id), budget.estimate(now, self._outflow)
