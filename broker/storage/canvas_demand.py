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


_COLUMNS = tuple(models.CanvasDemand.__table__.columns)


async def others(session: AsyncSession, holder: str, since: float) -> list[CanvasDemand]:
    """The rows of every process but ``holder`` written at or after ``since``."""
    # Plain rows rather than ORM objects: this runs twice a second in every process.
    result = await session.execute(
        select(*_COLUMNS).where(_ROW.holder != holder, _ROW.updated_at >= since)
    )
    return [CanvasDemand(**mapping) for mapping in result.mappings()]
