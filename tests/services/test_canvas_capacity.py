"""Canvas capacity shared by the processes of one broker through the database.

Contract: docs/proxy-rules.md#canvas-capacity. Two ``CanvasCapacity`` here stand for two
processes (two workers, or two replicas) on one database; each decides calls from its own
memory and shares its demand with ``sync``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from broker.errors import BrokerError
from broker.metrics import Metrics
from broker.services.canvas_capacity import PRUNE_AFTER, CanvasCapacity
from broker.storage import models

if TYPE_CHECKING:
    from broker.context import ProcessContext
    from broker.storage.database import Sessions

CREDENTIAL = "cred-1"


class Clock:
    """A monotonic clock and a wall clock that move together, by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now


def process(context: ProcessContext, clock: Clock, name: str) -> CanvasCapacity:
    return CanvasCapacity(
        context.settings,
        Metrics(),
        context.sessions,
        clock=clock.monotonic,
        wall=clock.wall,
        holder=name,
    )


def call(capacity: CanvasCapacity, client: str, remaining: float) -> bool:
    """One call Canvas answers with cost 1 and ``remaining``, if the broker lets it go."""
    try:
        decision = capacity.admit(CREDENTIAL, client, 1.0)
    except BrokerError as refused:
        if refused.error != "canvas_capacity":
            raise
        return False
    headers = [(b"x-request-cost", b"1"), (b"x-rate-limit-remaining", str(remaining).encode())]
    capacity.settle(CREDENTIAL, client, decision, headers)
    return True


async def rows(sessions: Sessions) -> int:
    async with sessions() as session:
        counted = await session.scalar(select(func.count()).select_from(models.CanvasDemand))
    return int(counted or 0)


async def test_a_greedy_client_alone_on_one_process_is_held_back_by_steady_ones_on_another(
    context: ProcessContext,
) -> None:
    clock = Clock()
    first, second = process(context, clock, "a"), process(context, clock, "b")
    # Alone on its process, the greedy client spends freely even below the reserve...
    assert all(call(first, "greedy", 100.0) for _ in range(20))
    for steady in ("steady-1", "steady-2"):
        assert call(second, steady, 100.0)
    # ...until the processes have shared what their clients ask.
    await second.sync()
    await first.sync()
    # It has what the steady clients leave of a third of the outflow (100 left): 3.1 units a
    # second, about 31 over the averaging window, 20 of them already spent.
    outcomes = [call(first, "greedy", 100.0) for _ in range(40)]
    assert 5 <= outcomes.count(True) <= 15
    assert outcomes[-10:] == [False] * 10
    await first.sync()
    await second.sync()
    assert call(second, "steady-1", 100.0)
    share, remaining = second.share(CREDENTIAL, "greedy")  # a client second never served
    assert share is not None
    assert share.asking
    assert share.share == pytest.approx(1 / 3)
    assert share.spent_total == 20.0 + outcomes.count(True)
    assert remaining is not None


async def test_a_process_that_never_called_canvas_learns_the_bucket_from_another(
    context: ProcessContext,
) -> None:
    clock = Clock()
    first, second = process(context, clock, "a"), process(context, clock, "b")
    assert call(first, "job", 600.0)
    assert call(first, "job", 150.0)
    await first.sync()
    await second.sync()
    clock.now += 1.0
    _share, remaining = second.share(CREDENTIAL, "job")
    assert remaining == pytest.approx(150.0 + context.settings.canvas_outflow)


async def test_an_idle_process_writes_nothing_and_withdraws_what_it_wrote(
    context: ProcessContext,
) -> None:
    clock = Clock()
    capacity = process(context, clock, "a")
    await capacity.sync()
    assert await rows(context.sessions) == 0
    assert call(capacity, "job", 500.0)
    await capacity.sync()
    assert await rows(context.sessions) == 1
    clock.now += 1000.0  # long idle: its demand has decayed away
    await capacity.sync()
    assert await rows(context.sessions) == 0


async def test_rows_of_a_process_gone_are_pruned_by_another(context: ProcessContext) -> None:
    clock = Clock()
    gone, alive = process(context, clock, "gone"), process(context, clock, "alive")
    assert call(gone, "job", 500.0)
    await gone.sync()
    clock.now += PRUNE_AFTER + 1.0
    assert call(alive, "job", 500.0)
    await alive.sync()
    assert await rows(context.sessions) == 1  # only alive's own


class BrokenSessions:
    """Sessions on a database that is down: every session fails; the second one says so."""

    def __init__(self) -> None:
        self.tried = 0
        self.twice = asyncio.Event()

    def __call__(self) -> None:
        self.tried += 1
        if self.tried >= 2:
            self.twice.set()
        raise OperationalError("SELECT", {}, ConnectionRefusedError())

    def begin(self) -> None:
        self()


async def test_a_database_fault_is_counted_and_the_loop_goes_on(context: ProcessContext) -> None:
    metrics, broken = Metrics(), BrokenSessions()
    capacity = CanvasCapacity(context.settings, metrics, cast("Sessions", broken), holder="a")
    assert call(capacity, "job", 500.0)
    stopping = asyncio.Event()
    loop = asyncio.create_task(capacity.run(stopping))
    async with asyncio.timeout(10):
        await broken.twice.wait()  # two rounds failed, and the loop went on
    stopping.set()
    async with asyncio.timeout(10):
        await loop
    failures = metrics.registry.get_sample_value("broker_canvas_share_sync_failures_total")
    assert failures is not None
    assert failures >= 2
    assert call(capacity, "job", 500.0)  # calls are decided as before
