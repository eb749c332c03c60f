"""The processes' demand on Canvas buckets, shared through the database. Never commits.

Each process replaces its own rows (``publish``) and reads the others' fresh ones
(``others``); rows of a process that stopped publishing are dropped by whoever prunes
(docs/proxy-rules.md#canvas-capacity).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from sqlalchemy import delete, insert, select

from broker.domain import CanvasDemand
from broker.storage import models

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncSession

_ROW = models.CanvasDemand


async def publish(session: AsyncSession, holder: str, rows: Sequence[CanvasDemand]) -> None:
    """Replace ``holder``'s rows with ``rows`` (all of them ``holder``'s)."""
    await session.execute(delete(_ROW).where(_ROW.holder == holder))
    if rows:
        await session.execute(insert(_ROW), [asdict(row) for row in rows])
    await session.flush()


async def withdraw(session: AsyncSession, holder: str) -> None:
    """Drop ``holder``'s rows (a process that stops)."""
    await session.execute(delete(_ROW).where(_ROW.holder == holder))


async def prune(session: AsyncSession, before: float) -> None:
    """Drop every row last written before ``before`` (epoch seconds): processes gone."""
    await session.execute(delete(_ROW).where(_ROW.updated_at < before))


async def others(session: AsyncSession, holder: str, since: float) -> list[CanvasDemand]:
    """The rows of every process but ``holder`` written at or after ``since``."""
    result = await session.scalars(
        select(_ROW).where(_ROW.holder != holder, _ROW.updated_at >= since)
    )
    return [
        CanvasDemand(
            holder=row.holder,
            credential_id=row.credential_id,
            client_id=row.client_id,
            weight=row.weight,
            asked=row.asked,
            spent=row.spent,
            spent_total=row.spent_total,
            in_flight=row.in_flight,
            asking=row.asking,
            remaining=row.remaining,
            seen_at=row.seen_at,
            ceiling=row.ceiling,
            updated_at=row.updated_at,
        )
        for row in result
    ]
