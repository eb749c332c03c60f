"""Canvas's rate limit as the broker sees it, and its fair share.

Contract: docs/proxy-rules.md#canvas-capacity.

Canvas throttles per access token with a leaky bucket (``app/middleware/request_throttle.rb``
in canvas-lms): every answer carries ``X-Request-Cost`` (what the call cost) and
``X-Rate-Limit-Remaining`` (the high-water mark minus the bucket's count, after the call), and
the bucket leaks ``outflow`` units a second. Every client of one worker credential spends that
one bucket, so the broker keeps, per credential, a :class:`Budget`:

- the remaining capacity Canvas last reported, aged by the outflow since (never above the most
  Canvas has reported), less the up-front cost Canvas holds for each call of this process
  still in flight;
- per client: its weight, what it spent (the costs Canvas reported, and an estimate for calls
  in flight), what it asked for (every call, admitted or not, at its usual cost), averaged
  over :data:`WINDOW` seconds.

While the estimate is at or above the reserve, every call goes. Below it, the outflow is
shared among the clients asking (those that asked within the window) by weighted max-min
fairness: a client asking less than its weighted share gets all it asks, the rest is split
among the others by weight. A call whose client already spends its allowance is held back
(``429 canvas_capacity``). A client alone on a credential is never held back: it may use all
of it, and Canvas's own ``403`` is relayed as Canvas sent it. What is shared shrinks from the
whole outflow at the reserve to nothing at Canvas's up-front cost (below which Canvas refuses
every call), so the bucket climbs back to the reserve.

Every process and replica of one broker keeps its own Budget and shares the rest
(``services.canvas_capacity``): each publishes :meth:`Budget.demand` (per client: weight, rates
asked and spent, calls in flight, its last sight of the bucket) and hands the others' to
:meth:`Budget.merge`. Merged, the asking set and the water fill are global, a client's spend
is its spend everywhere, the others' calls in flight hold their up-front cost here too, and
"alone" means alone across every process. What others published counts for :data:`FRESH`
seconds after it was merged; without it a process falls back to what it sees itself.

Pure: the caller passes the time; nothing here blocks or does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

WINDOW: Final = 10.0
"""Seconds over which spending and asking are averaged, and a client counts as asking."""

CANVAS_UP_FRONT_COST: Final = 50.0
"""What Canvas charges a call while it is in flight (request_throttle.rb, ``up_front_cost``)."""

FRESH: Final = 5.0
"""Seconds the other processes' demand counts after it was merged (then only this process's)."""

_MAX_RETRY_AFTER: Final = 60
_IDLE: Final = 1e-3  # a rate below this (units a second) is no demand worth publishing
_exp = math.exp


@dataclass(slots=True)
class _Decayed:
    """A sum that decays with time constant :data:`WINDOW`; ``rate`` is per second."""

    value: float = 0.0
    at: float = 0.0

    def _aged(self, now: float) -> float:
        elapsed = now - self.at
        return self.value * _exp(-elapsed / WINDOW) if elapsed > 0 else self.value

    def add(self, now: float, amount: float) -> None:
        # On every call (twice): the ageing written out rather than called.
        elapsed = now - self.at
        value = (self.value * _exp(-elapsed / WINDOW) if elapsed > 0 else self.value) + amount
        self.value = value if value > 0 else 0.0
        self.at = now

    def rate(self, now: float) -> float:
        return self._aged(now) / WINDOW


@dataclass(slots=True)
class _Client:
    weight: float
    asked_at: float
    mean_cost: float | None = None
    spent: _Decayed = field(default_factory=_Decayed)
    asked: _Decayed = field(default_factory=_Decayed)
    spent_total: float = 0.0
    in_flight: int = 0

    def usual_cost(self) -> float:
        return 1.0 if self.mean_cost is None else self.mean_cost


class Decision(NamedTuple):
    """Whether a call may go to Canvas now; when not, how long the client should wait.

    A named tuple rather than a frozen dataclass: one is made on every proxied call, and a
    tuple is built in one step where a frozen dataclass sets each field through ``object``.
    """

    allowed: bool
    estimate: float  # the cost counted for the call until Canvas says what it cost
    retry_after: int = 0
    share: float | None = None  # the client's share of the outflow, when sharing applied


@dataclass(frozen=True, slots=True)
class ClientShare:
    """One client's view of its credential's bucket, for ``clients get`` and metrics."""

    weight: float
    share: float  # the client's fraction of the outflow if every asking client wants more
    asking: bool
    spent_per_second: float
    spent_total: float


@dataclass(frozen=True, slots=True)
class Demand:
    """One client's demand on a credential in one process: what processes share."""

    client_id: str
    weight: float
    asked: float  # units a second, averaged over WINDOW
    spent: float  # units a second, averaged over WINDOW
    spent_total: float
    in_flight: int
    asking: bool  # called within WINDOW


@dataclass(frozen=True, slots=True)
class Sighting:
    """What Canvas last reported of the bucket to one process, on the caller's clock."""

    remaining: float
    seen_at: float
    ceiling: float


def water_fill(total: float, wants: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Weighted max-min fair allocation of ``total`` among ``{id: (weight, demand)}``."""
    allocation: dict[str, float] = {}
    active = dict(wants)
    left = max(0.0, total)
    while active:
        weights = sum(weight for weight, _ in active.values())
        level = left / weights if weights > 0 else 0.0
        satisfied = [key for key, (w, demand) in active.items() if demand <= level * w]
        if not satisfied:
            for key, (weight, _) in active.items():
                allocation[key] = level * weight
            break
        for key in satisfied:
            allocation[key] = active.pop(key)[1]
            left -= allocation[key]
    return allocation


@dataclass
class Budget:
    """One worker credential's Canvas bucket, as this process has seen it (see the module)."""

    remaining: float | None = None
    seen_at: float = 0.0
    ceiling: float = 0.0
    in_flight: int = 0
    held_back: int = 0
    clients: dict[str, _Client] = field(default_factory=dict)
    others: dict[str, Demand] = field(default_factory=dict)  # summed over the other processes
    others_in_flight: int = 0
    merged_at: float | None = None

    def estimate(self, now: float, outflow: float) -> float | None:
        """Canvas's remaining capacity now, as far as this broker knows; None before any."""
        if self.remaining is None:
            return None
        aged = min(self.ceiling, self.remaining + outflow * max(0.0, now - self.seen_at))
        in_flight = self.in_flight + (self.others_in_flight if self._fresh(now) else 0)
        return aged - CANVAS_UP_FRONT_COST * in_flight

    def _fresh(self, now: float) -> bool:
        return self.merged_at is not None and now - self.merged_at <= FRESH

    def _wants(self, now: float) -> dict[str, tuple[float, float]]:
        """``{client: (weight, asked a second)}`` of the clients asking, in every process."""
        wants = {
            key: (c.weight, c.asked.rate(now))
            for key, c in self.clients.items()
            if now - c.asked_at <= WINDOW
        }
        if self._fresh(now):
            for key, other in self.others.items():
                if not other.asking:
                    continue
                local = self.clients.get(key)
                weight, asked = wants.get(
                    key, (other.weight if local is None else local.weight, 0.0)
                )
                wants[key] = (weight, asked + other.asked)
        return wants

    def _spent_elsewhere(self, now: float, client_id: str) -> float:
        other = self.others.get(client_id) if self._fresh(now) else None
        return 0.0 if other is None else other.spent

    def admit(
        self, now: float, client_id: str, weight: float, *, reserve: float, outflow: float
    ) -> Decision:
        """Decide one call of ``client_id``; an allowed call counts as in flight until settled."""
        client = self.clients.get(client_id)
        if client is None:
            client = self.clients[client_id] = _Client(weight=weight, asked_at=now)
        client.weight = weight
        client.asked_at = now
        cost = client.usual_cost()
        client.asked.add(now, cost)
        estimate = self.estimate(now, outflow)
        if (
            reserve <= 0  # sharing is off (BROKER_CANVAS_RESERVE=0)
            or estimate is None
            or estimate >= reserve
        ):
            return self._allow(now, client, cost)
        if len(self.clients) == 1 and not self._fresh(now):  # alone here, none known elsewhere
            return self._allow(now, client, cost)
        wants = self._wants(now)
        if len(wants) <= 1:  # alone on the credential, across every process
            return self._allow(now, client, cost)
        # Canvas refuses any call arriving with no more than its up-front cost left, so what is
        # shared out shrinks from the whole outflow at the reserve to nothing at that floor.
        floor = min(CANVAS_UP_FRONT_COST, reserve / 2)
        level = min(1.0, max(0.0, (estimate - floor) / (reserve - floor)))
        allowance = water_fill(outflow * level, wants).get(client_id, 0.0)
        spent = client.spent.rate(now) + self._spent_elsewhere(now, client_id)
        if spent + cost / WINDOW <= allowance:
            return self._allow(now, client, cost, share=allowance)
        self.held_back += 1
        wait = cost / allowance if allowance > 0 else float(_MAX_RETRY_AFTER)
        retry = min(_MAX_RETRY_AFTER, max(1, math.ceil(wait)))
        return Decision(allowed=False, estimate=0.0, retry_after=retry, share=allowance)

    def _allow(
        self, now: float, client: _Client, cost: float, share: float | None = None
    ) -> Decision:
        self.in_flight += 1
        client.in_flight += 1
        client.spent.add(now, cost)
        return Decision(allowed=True, estimate=cost, share=share)

    def settle(
        self,
        now: float,
        client_id: str,
        decision: Decision,
        *,
        cost: float | None,
        remaining: float | None,
    ) -> None:
        """An allowed call is answered: what Canvas said it cost and what is left."""
        self.in_flight = max(0, self.in_flight - 1)
        client = self.clients.get(client_id)
        if client is not None:
            client.in_flight = max(0, client.in_flight - 1)
        if client is not None and cost is not None:
            client.spent.add(now, cost - decision.estimate)
            client.spent_total += cost
            client.mean_cost = (
                cost if client.mean_cost is None else 0.8 * client.mean_cost + 0.2 * cost
            )
        elif client is not None:
            client.spent.add(now, -decision.estimate)
        if remaining is not None:
            self.observe(now, remaining)

    def observe(self, now: float, remaining: float) -> None:
        """Canvas reported ``remaining`` (``X-Rate-Limit-Remaining``) at ``now``."""
        self.remaining = remaining
        self.seen_at = now
        self.ceiling = max(self.ceiling, remaining)

    def demand(self, now: float) -> list[Demand]:
        """The demand of the clients served here that have any (what is published to the others)."""
        demands = []
        for key, c in self.clients.items():
            asking = now - c.asked_at <= WINDOW
            asked, spent = c.asked.rate(now), c.spent.rate(now)
            if asking or c.in_flight > 0 or spent > _IDLE:
                demands.append(
                    Demand(
                        client_id=key,
                        weight=c.weight,
                        asked=asked,
                        spent=spent,
                        spent_total=c.spent_total,
                        in_flight=c.in_flight,
                        asking=asking,
                    )
                )
        return demands

    def sighting(self) -> Sighting | None:
        """What Canvas last reported to this process, if anything."""
        if self.remaining is None:
            return None
        return Sighting(remaining=self.remaining, seen_at=self.seen_at, ceiling=self.ceiling)

    def merge(
        self, now: float, demands: Iterable[Demand], sightings: Iterable[Sighting] = ()
    ) -> None:
        """The other processes' demand, replacing what was merged before, and their sightings.

        A sighting newer than this process's own becomes the estimate's starting point: the
        bucket is Canvas's one count, whoever read it last.
        """
        summed: dict[str, Demand] = {}
        for d in demands:
            was = summed.get(d.client_id)
            summed[d.client_id] = (
                d
                if was is None
                else Demand(
                    client_id=d.client_id,
                    weight=d.weight,
                    asked=was.asked + d.asked,
                    spent=was.spent + d.spent,
                    spent_total=was.spent_total + d.spent_total,
                    in_flight=was.in_flight + d.in_flight,
                    asking=was.asking or d.asking,
                )
            )
        self.others = summed
        self.others_in_flight = sum(d.in_flight for d in summed.values())
        self.merged_at = now
        for seen in sightings:
            self.ceiling = max(self.ceiling, seen.ceiling)
            if self.remaining is None or seen.seen_at > self.seen_at:
                self.remaining = seen.remaining
                self.seen_at = min(now, seen.seen_at)

    def share_of(self, now: float, client_id: str) -> ClientShare | None:
        """The client's share as things stand (weights of the clients asking everywhere)."""
        client = self.clients.get(client_id)
        other = self.others.get(client_id) if self._fresh(now) else None
        if client is None and other is None:
            return None
        wants = self._wants(now)
        if client is not None:
            weight = client.weight
        elif other is not None:
            weight = other.weight
        wants.setdefault(client_id, (weight, 0.0))
        weights = sum(w for w, _ in wants.values())
        local_asking = client is not None and now - client.asked_at <= WINDOW
        spent = (0.0 if client is None else client.spent.rate(now)) + (
            0.0 if other is None else other.spent
        )
        total = (0.0 if client is None else client.spent_total) + (
            0.0 if other is None else other.spent_total
        )
        return ClientShare(
            weight=weight,
            share=weight / weights if weights > 0 else 1.0,
            asking=local_asking or (other is not None and other.asking),
            spent_per_second=round(spent, 3),
            spent_total=round(total, 3),
        )


CANVAS_RATE_LIMITED: Final = "canvas_rate_limited"
"""The outcome of a relayed call Canvas refused with its rate-limit 403."""


def canvas_throttled(status: int, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether Canvas's answer is its throttle's 403.

    Canvas's throttle answers 403 with ``X-Rate-Limit-Remaining`` and, alone among its
    answers, without ``X-Request-Cost`` (canvas-lms app/middleware/request_throttle.rb: the
    cost header is set ``unless throttled``); a 403 of a permission check carries both.
    """
    if status != 403:  # noqa: PLR2004
        return False
    names = {name.lower() for name, _ in headers}
    return b"x-rate-limit-remaining" in names and b"x-request-cost" not in names


def parse_number(value: bytes | None) -> float | None:
    """A Canvas header's number (``X-Request-Cost``, ``X-Rate-Limit-Remaining``), if it is one."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
