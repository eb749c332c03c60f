"""The audit hub: the one writer all workers of ``broker serve --workers N`` share.

Each test runs brokers whose audit events go to a hub over its Unix socket, as the workers of
a multi-worker server do, and checks the guarantees of docs/audit.md#audit-hub through it: one
chain that verifies, and no request forwarded unless its event was committed.
"""

from __future__ import annotations

import asyncio
import socket
import stat
import struct
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import func, select

from broker.app import create_app
from broker.context import ProcessContext
from broker.errors import AuditWriteError
from broker.keyring import Keyring
from broker.services.audit import new_event
from broker.services.audit_hub import RemoteAuditWriter
from broker.storage.models import AuditEventRow
from tests.conftest import running_hub
from tests.proxy.support import make_caller
from tests.support.env import BrokerEnv

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from broker.config import Settings
    from broker.core.audit_chain import AuditEvent
    from broker.services.audit_hub import AuditHub
    from broker.sim.server import SimServer

COURSE = "/api/v1/courses/1201"
ASSIGNMENTS = "/api/v1/courses/1201/assignments"


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture
def hub(settings: Settings, keyring: Keyring) -> Iterator[AuditHub]:
    with running_hub(settings, keyring) as running:
        yield running


@pytest.fixture
async def workers(
    settings: Settings, keyring: Keyring, hub: AuditHub, sim: SimServer
) -> AsyncIterator[list[BrokerEnv]]:
    """Two brokers ("workers") on one database, both writing through ``hub``."""
    shared = settings.model_copy(update={"audit_socket": hub.path})
    envs = []
    clients = []
    for _ in range(2):
        context = ProcessContext.from_settings(shared, keyring=keyring)
        transport = httpx.ASGITransport(app=create_app(context=context))
        http = httpx.AsyncClient(transport=transport, base_url="http://broker.test")
        clients.append(http)
        envs.append(BrokerEnv(context=context, http=http, sim=sim))
    await envs[0].provision()
    # The second worker shares the first's keys, credential and client (one database).
    envs[1].admin_key, envs[1].auditor_key = envs[0].admin_key, envs[0].auditor_key
    envs[1].created = envs[0].created
    try:
        yield envs
    finally:
        for env, http in zip(envs, clients, strict=True):
            await http.aclose()
            await env.context.aclose()


async def test_two_workers_extend_one_chain_through_the_hub(workers: list[BrokerEnv]) -> None:
    first, second = workers
    assert isinstance(first.context.audit_writer, RemoteAuditWriter)
    caller = await make_caller(first)
    calls = [
        env.http.request(method, path, headers=caller.headers)
        for env in workers
        for method, path in [("GET", ASSIGNMENTS), ("DELETE", COURSE), ("GET", COURSE)]
        for _ in range(8)
    ]
    responses = await asyncio.gather(*calls)
    assert sorted({r.status_code for r in responses}) == [200, 403]
    forwarded = [r for r in responses if r.status_code == 200]
    assert len(first.sim.state.received) == len(forwarded) == 32
    for env in workers:
        await env.context.audit_writer.flush()
    report = await second.verify_audit()
    assert report["ok"], report
    async with first.context.sessions() as session:
        stored = await session.scalar(select(func.count()).select_from(AuditEventRow))
    assert report["checked"] == stored
    assert report["incomplete"] == {"count": 0, "oldest": []}
    events = await first.audit(kind="proxy", limit=200)
    assert sorted(e["request_id"] for e in events) == sorted(
        r.headers["x-request-id"] for r in responses
    )


@pytest.fixture
def hub_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every event goes to the hub: no lone request commits in its worker (as on PostgreSQL)."""
    monkeypatch.setattr(RemoteAuditWriter, "_commit_inline", lambda *_: None)


@pytest.mark.usefixtures("hub_only")
async def test_a_worker_fails_closed_when_the_hub_is_gone(
    workers: list[BrokerEnv], hub: AuditHub
) -> None:
    env = workers[0]
    caller = await make_caller(env)
    assert (await env.http.get(COURSE, headers=caller.headers)).status_code == 200
    env.sim.state.received.clear()
    hub.stop()
    for method, path in [("GET", COURSE), ("DELETE", COURSE)]:
        response = await env.http.request(method, path, headers=caller.headers)
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "audit_unavailable"
    assert env.sim.state.received == []
    hub.start()  # back on the same socket: the next call reconnects
    response = await env.http.get(COURSE, headers=caller.headers)
    assert response.status_code == 200, response.text
    assert len(env.sim.state.received) == 1


@pytest.mark.usefixtures("hub_only")
async def test_a_worker_fails_closed_when_the_hub_cannot_commit(
    workers: list[BrokerEnv], hub: AuditHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = workers[0]
    caller = await make_caller(env)

    def broken(events: list[object], **_: object) -> list[BaseException]:
        return [OSError("disk full") for _ in events]

    monkeypatch.setattr(hub._committer, "commit", broken)
    response = await env.http.get(COURSE, headers=caller.headers)
    assert response.status_code == 503
    assert env.sim.state.received == []


async def test_the_hub_drops_a_peer_that_sends_garbage_and_serves_the_others(
    workers: list[BrokerEnv], hub: AuditHub
) -> None:
    reader, writer = await asyncio.open_unix_connection(str(hub.path))
    writer.write(struct.pack("!I", 5) + b"\xff\x00junk")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the hub
    writer.close()
    env = workers[1]
    caller = await make_caller(env)
    assert (await env.http.get(COURSE, headers=caller.headers)).status_code == 200
    assert (await env.verify_audit())["ok"]


async def test_a_frame_over_the_limit_closes_the_connection(hub: AuditHub) -> None:
    reader, writer = await asyncio.open_unix_connection(str(hub.path))
    writer.write(struct.pack("!I", 0xFFFFFFFF))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


def test_the_hub_socket_is_private(hub: AuditHub) -> None:
    assert stat.S_IMODE(hub.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(hub.path.parent.stat().st_mode) == 0o700
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(hub.path))  # the broker's own user may connect


async def test_a_waiter_that_went_away_is_recorded_as_abandoned(
    workers: list[BrokerEnv],
) -> None:
    writer = workers[0].context.audit_writer

    def abandoned(seq: int) -> AuditEvent:
        return new_event(
            request_id="gone", kind="proxy", action="proxy", decision="error", completes=seq
        )

    event = new_event(
        request_id="gone", kind="proxy", action="proxy", decision="allow", state="pending"
    )
    task = asyncio.create_task(writer.write(event, abandoned=abandoned))
    await asyncio.sleep(0)  # queued and about to be sent
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await writer.flush()
    await writer.flush()  # the abandonment is written when the answer arrives
    async with workers[0].context.sessions() as session:
        rows = (
            await session.execute(
                select(AuditEventRow.seq, AuditEventRow.completes, AuditEventRow.decision)
                .where(AuditEventRow.request_id == "gone")
                .order_by(AuditEventRow.seq)
            )
        ).all()
    assert len(rows) == 2
    (pending_seq, _, _), (_, completes, decision) = rows
    assert (completes, decision) == (pending_seq, "error")


async def test_a_closed_remote_writer_refuses_events(workers: list[BrokerEnv]) -> None:
    writer = workers[0].context.audit_writer
    await writer.aclose()
    event = new_event(request_id="late", kind="proxy", action="proxy", decision="allow")
    with pytest.raises(AuditWriteError):
        await writer.write(event)


async def test_an_unreachable_hub_refuses_at_once(tmp_path: Path) -> None:
    writer = RemoteAuditWriter(tmp_path / "no-hub.sock")
    event = new_event(request_id="x", kind="proxy", action="proxy", decision="allow")
    with pytest.raises(AuditWriteError):
        await asyncio.wait_for(writer.write(event), 10)
    await writer.aclose()


async def test_a_lone_request_on_sqlite_commits_in_its_worker(
    workers: list[BrokerEnv], hub: AuditHub
) -> None:
    env = workers[0]
    if env.context.engine.dialect.name != "sqlite":
        pytest.skip("a PostgreSQL commit is a network round trip: always the hub's")
    caller = await make_caller(env)
    hub.stop()  # only a commit in the worker itself can let these through
    for _ in range(3):
        response = await env.http.get(COURSE, headers=caller.headers)
        assert response.status_code == 200, response.text
    assert len(env.sim.state.received) == 3
    hub.start()
    report = await env.verify_audit()
    assert report["ok"], report
    assert report["incomplete"] == {"count": 0, "oldest": []}
