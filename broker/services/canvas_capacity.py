"""Canvas's rate limit per worker credential, shared fairly (docs/proxy-rules.md#canvas-capacity).

One :class:`~broker.core.capacity.Budget` per worker credential, in this process's memory: a
proxied call is decided there, with no database or network round trip. Its sight of the
bucket comes from the headers Canvas returns (``X-Rate-Limit-Remaining`` is Canvas's own
count). What the fair share needs from the other processes and replicas, :meth:`sync` shares
in the background: about twice a second it replaces this process's rows of ``canvas_demand``
(per credential with activity here and per client: weight, rates asked and spent, calls in
flight, its last sight of the bucket), reads the other processes' rows written in the last
:data:`~broker.core.capacity.FRESH` seconds, and merges them into the Budgets. If the
database cannot be reached, each process falls back to what it sees itself once the merged
view is older than ``FRESH`` seconds, and the reserve absorbs the difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.exc import SQLAlchemyError

from broker.core import admission
from broker.core.capacity import (
    FRESH,
    Budget,
    ClientShare,
    Decision,
    Demand,
    Sighting,
    parse_number,
)
from broker.domain import CanvasDemand
from broker.services import renewal
from broker.storage import canvas_demand

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from broker.config import Settings
    from broker.metrics import Metrics
    from broker.storage.database import Sessions

logger = logging.getLogger(__name__)

SYNC_INTERVAL: Final = 0.5
"""Seconds between two publications of this process's demand (and reads of the others')."""

SYNC_TIMEOUT: Final = 2.0
"""The longest one publication and read may take; past it, it is abandoned and retried."""

PRUNE_AFTER: Final = 4 * FRESH
"""Rows older than this (seconds) belong to processes gone, and any process deletes them."""


_COST: Final = b"x-request-cost"
_REMAINING: Final = b"x-rate-limit-remaining"


def _cost_and_remaining(
    headers: Sequence[tuple[bytes, bytes]],
) -> tuple[bytes | None, bytes | None]:
    """``X-Request-Cost`` and ``X-Rate-Limit-Remaining`` (the first of each), in one pass."""
    cost = remaining = None
    for key, value in headers:
        name = key.lower()
        if name == _COST:
            if cost is None:
                cost = value
        elif name == _REMAINING and remaining is None:
            remaining = value
    return cost, remaining


class CanvasCapacity:
    """Admits calls by fair share while a credential's Canvas capacity is low; tracks it."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        sessions: Sessions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        holder: str | None = None,
    ) -> None:
        self._reserve = settings.canvas_reserve
        self._outflow = settings.canvas_outflow
        self._metrics = metrics
        self._sessions = sessions
        self._clock = clock
        self._wall = wall
        self.holder = holder or renewal.holder_id()
        self._published = False  # whether rows of this process may be in the table
        self._pruned_at = 0.0
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
            cost_text, remaining_text = _cost_and_remaining(headers)
            cost, remaining = parse_number(cost_text), parse_number(remaining_text)
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

    # Sharing with the other processes ---------------------------------------------------------

    def _rows(self, now: float, wall: float) -> list[CanvasDemand]:
        """The demand of the clients served here as rows, on the wall clock (a common one)."""
        rows: list[CanvasDemand] = []
        for credential_id, budget in self._budgets.items():
            seen = budget.sighting()
            rows.extend(
                CanvasDemand(
                    holder=self.holder,
                    credential_id=credential_id,
                    client_id=demand.client_id,
                    weight=demand.weight,
                    asked=demand.asked,
                    spent=demand.spent,
                    spent_total=demand.spent_total,
                    in_flight=demand.in_flight,
                    asking=demand.asking,
                    remaining=None if seen is None else seen.remaining,
                    seen_at=None if seen is None else wall - (now - seen.seen_at),
                    ceiling=None if seen is None else seen.ceiling,
                    updated_at=wall,
                )
                for demand in budget.demand(now)
            )
        return rows

    async def sync(self) -> None:
        """Publish this process's demand, read the other processes', merge them (see module)."""
        if self._sessions is None:
            return
        now, wall = self._clock(), self._wall()
        rows = self._rows(now, wall)
        if rows or self._published:
            # A process with nothing to say writes nothing, once its rows are withdrawn.
            async with self._sessions.begin() as session:
                await canvas_demand.publish(session, self.holder, rows)
                if wall - self._pruned_at > FRESH:
                    await canvas_demand.prune(session, wall - PRUNE_AFTER)
                    self._pruned_at = wall
            self._published = bool(rows)
        async with self._sessions() as session:
            others = await canvas_demand.others(session, self.holder, wall - FRESH)
        self._merge(others, self._clock(), self._wall())

    def _merge(self, rows: Sequence[CanvasDemand], now: float, wall: float) -> None:
        demands: dict[str, list[Demand]] = defaultdict(list)
        sightings: dict[str, list[Sighting]] = defaultdict(list)
        for row in rows:
            demands[row.credential_id].append(
                Demand(
                    client_id=row.client_id,
                    weight=row.weight,
                    asked=row.asked,
                    spent=row.spent,
                    spent_total=row.spent_total,
                    in_flight=row.in_flight,
                    asking=row.asking,
                )
            )
            if row.remaining is not None and row.seen_at is not None:
                sightings[row.credential_id].append(
                    Sighting(
                        remaining=row.remaining,
                        seen_at=now - max(0.0, wall - row.seen_at),
                        ceiling=row.remaining if row.ceiling is None else row.ceiling,
                    )
                )
        for credential_id in set(self._budgets) | set(demands):
            self._budget(credential_id).merge(
                now, demands.get(credential_id, []), sightings.get(credential_id, [])
            )

    async def run(self, stopping: asyncio.Event) -> None:
        """Share demand every :data:`SYNC_INTERVAL` until ``stopping``; then withdraw it.

        A failure (the database down or slow) is logged and counted, and the next round
        tries again; it never ends the loop, whose end would leave this process deciding on
        the others' demand as last merged and then on its own alone, with no word of it.
        """
        failing = False
        while not stopping.is_set():
            try:
                await asyncio.wait_for(self.sync(), SYNC_TIMEOUT)
                failing = False
            except Exception as exc:  # noqa: BLE001 - see the docstring; logged and counted
                self._metrics.canvas_sync_failures.inc()
                if not failing:  # once per outage, not twice a second
                    logger.warning("Canvas demand could not be shared: %s", type(exc).__name__)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), SYNC_INTERVAL)
        if self._sessions is not None and self._published:
            with contextlib.suppress(SQLAlchemyError, OSError):
                async with asyncio.timeout(SYNC_TIMEOUT), self._sessions.begin() as session:
                    await canvas_demand.withdraw(session, self.holder)
