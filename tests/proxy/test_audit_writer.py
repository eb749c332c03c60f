"""The group-commit audit writer: every kind of event lands in one chain that verifies."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import func, select, update

from broker.services.audit import new_event
from broker.storage.models import AuditEventRow, AuditHead, RevocationEpoch
from tests.proxy.support import make_caller
from tests.support.env import AUDIT_HUB

if TYPE_CHECKING:
    from broker.core.audit_chain import AuditEvent
    from tests.support.env import BrokerEnv

ASSIGNMENTS = "/api/v1/courses/1201/assignments"


async def test_mixed_traffic_forms_one_chain_that_verifies(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    calls = [
        env.http.get(ASSIGNMENTS, headers=caller.headers),
        env.http.delete("/api/v1/courses/1201", headers=caller.headers),
        env.http.get("/api/v1//courses", headers=caller.headers),
        env.http.get(ASSIGNMENTS, headers={"Authorization": "Bearer cbt_nope"}),
    ]
    responses = await asyncio.gather(*(call for _ in range(5) for call in [*calls]))
    assert sorted({r.status_code for r in responses}) == [200, 400, 401, 403]
    report = await env.verify_audit()
    assert report["ok"], report
    async with env.context.sessions() as session:
        stored = await session.scalar(select(func.count()).select_from(AuditEventRow))
    # Every event written (admin actions, token mint, calls and their completions) is checked.
    assert report["checked"] == stored
    assert report["incomplete"] == {"count": 0, "oldest": []}


async def test_concurrent_calls_share_commits_and_each_is_recorded_once(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    responses = await asyncio.gather(
        *(env.http.get(ASSIGNMENTS, headers=caller.headers) for _ in range(40))
    )
    assert {r.status_code for r in responses} == {200}
    events = await env.audit(kind="proxy", limit=100)
    assert sorted(e["request_id"] for e in events) == sorted(
        r.headers["x-request-id"] for r in responses
    )
    assert {(e["state"], e["status"]) for e in events} == {("complete", 200)}
    assert len(env.sim.state.received) == 40


async def test_a_forwarded_call_is_pending_until_its_completion_is_committed(
    env: BrokerEnv,
) -> None:
    caller = await make_caller(env)
    response = await env.http.get(ASSIGNMENTS, headers=caller.headers)
    request_id = response.headers["x-request-id"]
    async with env.context.sessions() as session:
        rows = (
            await session.scalars(
                select(AuditEventRow)
                .where(AuditEventRow.request_id == request_id)
                .order_by(AuditEventRow.seq)
            )
        ).all()
    # The pending event was durable before forwarding; its completion may still be queued.
    assert rows[0].state == "pending"
    assert rows[0].completes is None
    [event] = [e for e in await env.audit(kind="proxy") if e["request_id"] == request_id]
    assert (event["state"], event["status"], event["upstream_status"]) == ("complete", 200, 200)
    assert event["response_bytes"] == int(response.headers["content-length"])


def _event(request_id: str, **fields: Any) -> AuditEvent:
    return new_event(
        request_id=request_id, kind="proxy", action="proxy", decision="allow", **fields
    )


IN_PROCESS_WRITER = pytest.mark.skipif(
    AUDIT_HUB, reason="about the in-process writer's threads; the hub commits on its own"
)


@IN_PROCESS_WRITER
async def test_a_lone_request_commits_on_the_loop_thread_with_the_queued_completions(
    env: BrokerEnv,
) -> None:
    # On SQLite, that is; a PostgreSQL commit is a network round trip, kept off the loop.
    on_sqlite = env.context.engine.dialect.name == "sqlite"
    writer = env.context.audit_writer
    first = await writer.write(_event("first", state="pending"))
    writer.write_later(_event("first-done", completes=first))
    threads: set[str] = set()
    writer.observe = lambda _seconds, _events: threads.add(threading.current_thread().name)
    second = await writer.write(_event("second"), alone=True)
    # One commit, on this (the event loop's) thread, carried the queued completion as well.
    assert threads == {threading.current_thread().name if on_sqlite else "audit-writer"}
    assert second == first + 2
    async with env.context.sessions() as session:
        rows = (await session.execute(select(AuditEventRow.seq, AuditEventRow.request_id))).all()
    assert sorted(rows)[-3:] == [(first, "first"), (first + 1, "first-done"), (second, "second")]


@IN_PROCESS_WRITER
async def test_the_requests_of_one_loop_turn_share_one_commit(env: BrokerEnv) -> None:
    # On SQLite on the event loop's own thread; on PostgreSQL (a network round trip) in the
    # writer's thread.
    on_sqlite = env.context.engine.dialect.name == "sqlite"
    writer = env.context.audit_writer
    await writer.write(_event("warm"))
    commits: list[tuple[str, int]] = []
    writer.observe = lambda _s, events: commits.append((threading.current_thread().name, events))
    seqs = await asyncio.gather(*(writer.write(_event(f"r{n}")) for n in range(5)))
    assert commits == [(threading.current_thread().name if on_sqlite else "audit-writer", 5)]
    assert sorted(seqs) == list(range(seqs[0], seqs[0] + 5))


@IN_PROCESS_WRITER
async def test_batches_handed_while_a_commit_waits_share_the_next_commit(env: BrokerEnv) -> None:
    # The chain head is locked (SQLite: the write lock too), so the first commit waits in
    # the writer's thread while the loop hands it one batch per turn. Those batches are
    # committed together, in order, not in a transaction (and an fsync) each.
    writer = env.context.audit_writer
    await writer.write(_event("warm"))
    commits: list[tuple[str, int]] = []
    writer.observe = lambda _s, events: commits.append((threading.current_thread().name, events))
    async with asyncio.timeout(10):
        async with env.context.sessions.begin() as session:
            await session.execute(update(AuditHead).values(last_seq=AuditHead.last_seq))
            writes = []
            for n in range(6):
                writes.append(asyncio.create_task(writer.write(_event(f"t{n}"))))
                await asyncio.sleep(0.02)  # a loop turn (and more) per write
            assert not any(write.done() for write in writes)
        seqs = [await write for write in writes]
    assert commits == [("audit-writer", 1), ("audit-writer", 5)]
    assert seqs == list(range(seqs[0], seqs[0] + 6))


async def test_a_lone_request_never_waits_on_the_loop_for_a_held_write_lock(
    env: BrokerEnv,
) -> None:
    # A management transaction of this very process holds the database's write lock and
    # needs the event loop to finish. A lone request's pending event must not block the loop
    # waiting for that lock (on SQLite it would stall until the busy timeout): it goes to the
    # writer thread, which commits once the management transaction has.
    writer = env.context.audit_writer
    await writer.write(_event("warm"))
    async with asyncio.timeout(10):
        async with env.context.sessions.begin() as session:
            await session.execute(update(RevocationEpoch).values(epoch=RevocationEpoch.epoch + 1))
            pending = asyncio.create_task(writer.write(_event("lone"), alone=True))
            await asyncio.sleep(0)  # the write's first step runs: it must hand over, not block
            assert not pending.done()
        seq = await pending
    async with env.context.sessions() as session:
        stored = await session.scalar(
            select(AuditEventRow.request_id).where(AuditEventRow.seq == seq)
        )
    assert stored == "lone"
