"""Upstreams (Canvas instances) in the database. Flushes, never commits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from broker.domain import Upstream
from broker.storage import models
from broker.storage.lookup import apply, row_by_ref, rows_by_name

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.ext.asyncio import AsyncSession

UPDATABLE: Final = frozenset({"name", "base_url", "enabled", "updated_at"})


def record(row: models.Upstream) -> Upstream:
    """The upstream a row holds."""
    return Upstream(
        id=row.id,
        name=row.name,
        base_url=row.base_url,
        enabled=row.enabled,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def get(session: AsyncSession, ref: str) -> Upstream:
    """The upstream with this id or name, or ``NotFoundError``."""
    return record(await row_by_ref(session, models.Upstream, ref, "upstream"))


async def find(session: AsyncSession, upstream_id: str) -> Upstream | None:
    """The upstream with this id, if any (names are not looked at)."""
    row = await session.get(models.Upstream, upstream_id)
    return None if row is None else record(row)


async def all_by_name(session: AsyncSession) -> list[Upstream]:
    """Every upstream, by name."""
    return [record(row) for row in await rows_by_name(session, models.Upstream)]


async def add(session: AsyncSession, upstream: Upstream) -> Upstream:
    """Insert a new upstream (a taken name raises ``IntegrityError`` here)."""
    row = models.Upstream(
        id=upstream.id,
        name=upstream.name,
        base_url=upstream.base_url,
        enabled=upstream.enabled,
        created_at=upstream.created_at,
        updated_at=upstream.updated_at,
    )
    session.add(row)
    await session.flush()
    return record(row)


async def change(session: AsyncSession, ref: str, changes: Mapping[str, object]) -> Upstream:
    """Change the columns ``changes`` names (of ``UPDATABLE``); returns the upstream now."""
    row = await row_by_ref(session, models.Upstream, ref, "upstream")
    apply(row, changes, UPDATABLE)
    await session.flush()
    return record(row)
