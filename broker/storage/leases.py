"""Leases on a row: one process of every replica does a renewal, none holds a lock meanwhile.

A lease is two columns of a row, its holder and the time it runs out. Taking it is one
conditional ``UPDATE`` (the row's lease is free or run out, and, with ``due_by``, the renewal
is due by then): of every process and replica trying at once exactly one succeeds, and no row
lock is held across the call to Canvas that follows. Used by the OAuth refresher
(``oauth_grants``) and the manual-token rotation (``credentials``); contract:
docs/interfaces.md#oauth-worker-credentials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select, update

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import InstrumentedAttribute


@dataclass(frozen=True, slots=True)
class Lease:
    """Where one kind of lease lives: the table's key column and its lease columns."""

    key: InstrumentedAttribute[Any]
    holder: InstrumentedAttribute[Any]
    until: InstrumentedAttribute[Any]
    due: InstrumentedAttribute[Any]

    async def take(
        self,
        session: AsyncSession,
        key: str,
        *,
        holder: str,
        now: datetime,
        until: datetime,
        due_by: datetime | None,
    ) -> bool:
        """Take the lease of row ``key`` if nobody holds a live one; True if taken."""
        conditions = [self.key == key, or_(self.until.is_(None), self.until < now)]
        if due_by is not None:
            conditions.append(self.due <= due_by)
        result = await session.execute(
            update(self.key.class_)
            .where(*conditions)
            .values({self.holder.key: holder, self.until.key: until})
        )
        return bool(getattr(result, "rowcount", 0) == 1)

    async def live(self, session: AsyncSession, key: str, now: datetime) -> bool:
        """Whether a process holds a live lease on row ``key`` (a renewal under way)."""
        until = await session.scalar(select(self.until).where(self.key == key))
        return until is not None and until > now
