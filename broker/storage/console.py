"""What the security console stores and reads. Flushes, never commits.

Its sessions, one event's place in the chain, and activity over time.

Contract: docs/interfaces.md#security-console.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, Integer, cast, delete, func, select, update

from broker.storage import audit_chain as chain
from broker.storage.audit_events import Completion, conditions, merged_event
from broker.storage.models import AdminKey, AuditEventRow, ConsoleSession

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from sqlalchemy import ColumnElement
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import InstrumentedAttribute

    from broker.audit_filter import AuditFilter
    from broker.core.audit_chain import Checkpoint, Head


@dataclass(frozen=True, slots=True)
class OpenSession:
    """A stored session and the admin key behind it, as they stand now."""

    id_hash: str
    admin_key_id: str
    role: str
    key_revoked: bool
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime


async def add_session(
    session: AsyncSession,
    *,
    id_hash: str,
    admin_key_id: str,
    at: datetime,
    expires_at: datetime,
    source_ip: str | None,
) -> None:
    """Store a new session under the keyed hash of its id."""
    session.add(
        ConsoleSession(
            id_hash=id_hash,
            admin_key_id=admin_key_id,
            created_at=at,
            last_seen_at=at,
            expires_at=expires_at,
            source_ip=source_ip,
        )
    )
    await session.flush()


async def find_session(session: AsyncSession, id_hashes: Sequence[str]) -> OpenSession | None:
    """The session stored under one of ``id_hashes`` (one per keyring key), with its key."""
    row = (
        await session.execute(
            select(ConsoleSession, AdminKey)
            .join(AdminKey, AdminKey.id == ConsoleSession.admin_key_id)
            .where(ConsoleSession.id_hash.in_(list(id_hashes)))
        )
    ).first()
    if row is None:
        return None
    stored, key = row[0], row[1]
    return OpenSession(
        id_hash=stored.id_hash,
        admin_key_id=key.id,
        role=key.role,
        key_revoked=key.revoked_at is not None,
        created_at=stored.created_at,
        last_seen_at=stored.last_seen_at,
        expires_at=stored.expires_at,
    )


async def touch_session(session: AsyncSession, id_hash: str, at: datetime) -> None:
    """Move a session's idle clock to ``at``."""
    await session.execute(
        update(ConsoleSession).where(ConsoleSession.id_hash == id_hash).values(last_seen_at=at)
    )


async def end_session(session: AsyncSession, id_hash: str) -> None:
    """Forget a session (signed out, expired, or its key revoked)."""
    await session.execute(delete(ConsoleSession).where(ConsoleSession.id_hash == id_hash))


async def end_sessions(session: AsyncSession, id_hashes: Sequence[str]) -> None:
    """Forget the session stored under any of ``id_hashes`` (one per keyring key)."""
    await session.execute(delete(ConsoleSession).where(ConsoleSession.id_hash.in_(list(id_hashes))))


async def end_stale_sessions(session: AsyncSession, *, idle_before: datetime, now: datetime) -> int:
    """Forget every session idle since before ``idle_before`` or past its lifetime."""
    result = await session.execute(
        delete(ConsoleSession).where(
            (ConsoleSession.last_seen_at < idle_before) | (ConsoleSession.expires_at <= now)
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True, slots=True)
class EventInChain:
    """One event as stored (chain columns included), merged with its call's other half."""

    event: dict[str, Any]
    seq: int
    prev_mac: str | None
    mac: str | None
    mac_key: str | None
    completes: int | None
    completion_seq: int | None
    previous_mac: str | None
    """The MAC of the event before it (``None`` at the start, or pruned)."""
    has_next: bool


async def event_in_chain(session: AsyncSession, seq: int) -> EventInChain | None:
    """The event ``seq`` with its neighbours' links, or None if there is none."""
    row = await session.get(AuditEventRow, seq)
    if row is None:
        return None
    begin, done = row, None
    if row.completes is not None:
        begin_row = await session.get(AuditEventRow, row.completes)
        if begin_row is not None:
            begin, done = begin_row, row
    else:
        done = await session.scalar(select(AuditEventRow).where(AuditEventRow.completes == seq))
    previous_mac = await session.scalar(
        select(AuditEventRow.mac).where(AuditEventRow.seq == seq - 1)
    )
    has_next = (
        await session.scalar(select(AuditEventRow.seq).where(AuditEventRow.seq == seq + 1))
    ) is not None
    return EventInChain(
        event=merged_event(begin, done),
        seq=row.seq,
        prev_mac=row.prev_mac,
        mac=row.mac,
        mac_key=row.mac_key,
        completes=row.completes,
        completion_seq=None if done is None or done is row else done.seq,
        previous_mac=previous_mac,
        has_next=has_next,
    )


async def head_and_checkpoints(session: AsyncSession) -> tuple[Head | None, list[Checkpoint]]:
    """The signed head of the chain and the retention checkpoints, newest first."""

    def read(sync: Any) -> tuple[Head | None, list[Checkpoint]]:  # noqa: ANN401 - a sync Session
        connection = sync.connection()
        return chain.read_head(connection), chain.checkpoints(connection)

    return await session.run_sync(read)


@dataclass(frozen=True, slots=True)
class ActivityRow:
    """Calls in one time bucket for one client, decision and reason."""

    bucket: int
    client_id: str | None
    decision: str
    reason: str | None
    calls: int
    canvas_cost: float


def _epoch_seconds(column: InstrumentedAttribute[datetime], dialect: str) -> ColumnElement[Any]:
    # Times are stored naive UTC (models.UTCDateTime); both readings count from the epoch.
    if dialect == "postgresql":
        return cast(func.extract("epoch", column), Integer)
    return cast(func.strftime("%s", column), Integer)


async def activity(
    session: AsyncSession, *, since: datetime, bucket_seconds: int
) -> list[ActivityRow]:
    """Proxied calls since ``since``, counted per bucket, client, decision and reason.

    The outcome (reason, Canvas cost) of a forwarded call is its completion's; the Canvas
    cost is the ``canvas_request_cost`` a completion records (docs/audit.md#event-fields).
    """
    dialect = session.get_bind().dialect.name
    bucket = (_epoch_seconds(AuditEventRow.time, dialect) // bucket_seconds * bucket_seconds).label(
        "bucket"
    )
    reason = func.coalesce(Completion.reason, AuditEventRow.reason).label("reason")
    cost = func.coalesce(
        func.sum(cast(Completion.details["canvas_request_cost"].as_float(), Float)), 0.0
    )
    query = (
        select(
            bucket,
            AuditEventRow.client_id,
            AuditEventRow.decision,
            reason,
            func.count(),
            cost,
        )
        .outerjoin(Completion, Completion.completes == AuditEventRow.seq)
        .where(
            AuditEventRow.completes.is_(None),
            AuditEventRow.kind == "proxy",
            AuditEventRow.time >= since,
        )
        .group_by(bucket, AuditEventRow.client_id, AuditEventRow.decision, reason)
        .order_by(bucket)
    )
    return [
        ActivityRow(
            bucket=int(row[0]),
            client_id=row[1],
            decision=row[2],
            reason=row[3],
            calls=int(row[4]),
            canvas_cost=float(row[5] or 0.0),
        )
        for row in await session.execute(query)
    ]


async def newer_than(
    session: AsyncSession, selection: AuditFilter, seq: int, *, limit: int
) -> list[dict[str, Any]]:
    """Selected calls after ``seq``, oldest first (the live tail), with their completions."""
    query = (
        select(AuditEventRow, Completion)
        .outerjoin(Completion, Completion.completes == AuditEventRow.seq)
        .where(AuditEventRow.completes.is_(None), AuditEventRow.seq > seq, *conditions(selection))
        .order_by(AuditEventRow.seq)
        .limit(limit)
    )
    return [merged_event(row[0], row[1]) for row in await session.execute(query)]
