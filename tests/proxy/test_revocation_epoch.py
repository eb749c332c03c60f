"""Revocation reaching cached tokens on other replicas, through the polled epoch.

Contract: docs/storage-and-keys.md#revocation.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import delete, update

from broker.app import create_app
from broker.context import ProcessContext
from broker.services.revocation import CacheEpoch
from broker.storage.database import Database
from broker.storage.models import RevocationEpoch
from tests.proxy.support import make_caller

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from broker.config import Settings
    from broker.sim.server import SimServer
    from tests.support.env import BrokerEnv

COURSE = "/api/v1/courses/1201"


async def _bounded_until(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_revocation_on_one_replica_reaches_the_others_cache(
    env: BrokerEnv, settings: Settings, sim: SimServer
) -> None:
    # A second replica: its own process context (cache, poller), the same database and keys,
    # no shared epoch file, as two `broker serve` machines behind a load balancer.
    other_context = ProcessContext.from_settings(settings, keyring=env.context.keyring)
    transport = httpx.ASGITransport(app=create_app(context=other_context))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://b.test") as other:
            caller = await make_caller(env)
            for http in (env.http, other):  # both replicas now hold the token in cache
                for _ in range(2):
                    assert (await http.get(COURSE, headers=caller.headers)).status_code == 200
            revoked = await env.http.post(
                f"/broker/v1/clients/{caller.client_id}/revoke-tokens", headers=env.admin()
            )
            assert revoked.status_code == 200, revoked.text
            assert (await env.http.get(COURSE, headers=caller.headers)).status_code == 401
            forwarded = len(sim.state.received)

            async def refused() -> bool:
                response = await other.get(COURSE, headers=caller.headers)
                return response.status_code == 401

            assert await _bounded_until(refused)
            # Calls the other replica let through before it heard are the poll's window;
            # the refused ones never reached Canvas.
            assert len(sim.state.received) >= forwarded
            after = len(sim.state.received)
            assert (await other.get(COURSE, headers=caller.headers)).status_code == 401
            assert len(sim.state.received) == after
    finally:
        await other_context.aclose()


@pytest.fixture
async def polling(database_url: str) -> AsyncIterator[CacheEpoch]:
    """An epoch polling the test's database from its own thread, once it has read it."""
    epoch = CacheEpoch(database=Database(database_url))
    try:
        # It polls with a connection of its own: no sessions needed.
        epoch.start(None)  # type: ignore[arg-type]

        async def fresh() -> bool:
            return epoch.current() is not None

        assert await _bounded_until(fresh)
        yield epoch
    finally:
        await epoch.aclose()


async def test_the_epoch_stays_fresh_while_the_event_loop_is_busy(polling: CacheEpoch) -> None:
    # A loop crowded with requests, for longer than the staleness limit: the poll runs on
    # its own thread, so the cache stays usable rather than switching off under load.
    time.sleep(1.5)  # noqa: ASYNC251 - blocking the loop is the point
    assert polling.current() is not None


async def test_a_moved_counter_invalidates_the_cached_value(
    polling: CacheEpoch, context: ProcessContext
) -> None:
    before = polling.current()
    async with context.sessions.begin() as session:
        await session.execute(update(RevocationEpoch).values(epoch=RevocationEpoch.epoch + 1))

    async def moved() -> bool:
        current = polling.current()
        return current is not None and current != before

    assert await _bounded_until(moved)


async def test_a_poller_that_cannot_read_turns_the_cache_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("broker.services.revocation.STALE_AFTER", 0.3)
    missing = f"sqlite+aiosqlite:///{tmp_path}/no-such-dir/none.sqlite3"
    epoch = CacheEpoch(database=Database(missing))
    try:
        epoch.start(None)  # type: ignore[arg-type]
        await asyncio.sleep(0.6)
        assert epoch.current() is None
    finally:
        await epoch.aclose()


async def test_without_the_counter_row_the_cache_stays_off(
    database_url: str, context: ProcessContext
) -> None:
    # Revocations bump that row; without it they could not reach other replicas' caches.
    async with context.sessions.begin() as session:
        await session.execute(delete(RevocationEpoch))
    epoch = CacheEpoch(database=Database(database_url))
    try:
        epoch.start(None)  # type: ignore[arg-type]
        await asyncio.sleep(0.6)  # two polls or more
        assert epoch.current() is None
    finally:
        await epoch.aclose()
