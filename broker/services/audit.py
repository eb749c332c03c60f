"""Recording audit events (SPEC §6): fail closed, never a silent gap.

Proxied calls are recorded in two steps: ``begin`` commits a ``pending`` event before anything
is sent upstream and ``complete`` records the outcome. Refusals, token events and management
actions are written complete in one step. If the store cannot commit, ``AuditUnavailableError``
tells the caller to answer 503 and forward nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from broker.errors import AuditUnavailableError
from broker.storage.models import AuditEvent, utcnow
from broker.storage.queries import AuditFilter, audit_page, decode_cursor, encode_cursor

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

logger = logging.getLogger(__name__)

PENDING = "pending"
COMPLETE = "complete"


def new_event(**fields: Any) -> AuditEvent:  # noqa: ANN401 - column values of many types
    """An event with defaults filled in (complete, now)."""
    fields.setdefault("time", utcnow())
    fields.setdefault("state", COMPLETE)
    if fields["state"] == COMPLETE:
        fields.setdefault("completed_at", fields["time"])
    return AuditEvent(**fields)


class AuditService:
    """Writes and reads audit events."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def record(self, **fields: Any) -> int:  # noqa: ANN401
        """Commit one complete event; raise ``AuditUnavailableError`` if it cannot be."""
        return await self._commit(new_event(**fields))

    async def begin(self, **fields: Any) -> int:  # noqa: ANN401
        """Commit a pending event for a call about to be forwarded."""
        return await self._commit(new_event(state=PENDING, **fields))

    async def complete(self, seq: int, **fields: Any) -> None:  # noqa: ANN401
        """Record the outcome of a pending event.

        The call already happened, so a failure here cannot be undone; it is logged and the
        event stays visibly ``pending``.
        """
        try:
            async with self._sessions.begin() as session:
                await session.execute(
                    update(AuditEvent)
                    .where(AuditEvent.seq == seq)
                    .values(state=COMPLETE, completed_at=utcnow(), **fields)
                )
        except (SQLAlchemyError, OSError):
            logger.exception("could not complete audit event %s; it stays pending", seq)

    async def _commit(self, event: AuditEvent) -> int:
        try:
            async with self._sessions.begin() as session:
                session.add(event)
                await session.flush()
                seq = event.seq
        except (SQLAlchemyError, OSError) as exc:
            logger.exception("audit store unavailable")
            raise AuditUnavailableError(
                "the audit log is unavailable; nothing was forwarded"
            ) from exc
        return seq

    async def query(
        self, selection: AuditFilter, *, cursor: str | None, limit: int
    ) -> tuple[list[AuditEvent], str | None]:
        """One newest-first page of events and the cursor of the next page."""
        before = decode_cursor(cursor) if cursor else None
        async with self._sessions() as session:
            events, last = await audit_page(session, selection, before=before, limit=limit)
        return events, (encode_cursor(last) if last is not None else None)


def add_admin_event(session: AsyncSession, **fields: Any) -> None:  # noqa: ANN401
    """Add a management-action event to the caller's transaction (atomic with the change)."""
    session.add(new_event(kind="admin", decision="allow", **fields))
