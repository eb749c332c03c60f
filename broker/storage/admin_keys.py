"""Management keys in the database (metadata; values are never stored). Flushes, never commits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select

from broker.domain import AdminKey
from broker.errors import NotFoundError
from broker.storage import models

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession

_Row = models.AdminKey


def record(row: models.AdminKey) -> AdminKey:
    """The key's metadata a row holds."""
    return AdminKey(
        id=row.id,
        name=row.name,
        role=row.role,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        created_by=row.created_by,
    )


async def add(session: AsyncSession, key: AdminKey, *, key_hash: str) -> AdminKey:
    """Insert a new key, stored as its keyed hash."""
    row = _Row(
        id=key.id,
        name=key.name,
        role=key.role,
        key_hash=key_hash,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
        created_by=key.created_by,
    )
    session.add(row)
    await session.flush()
    return record(row)


async def oldest_first(session: AsyncSession) -> list[AdminKey]:
    """Every key, oldest first."""
    return [record(row) for row in await session.scalars(select(_Row).order_by(_Row.created_at))]


async def find(session: AsyncSession, key_id: str) -> AdminKey | None:
    """The key with this id, if any."""
    row = await session.get(_Row, key_id)
    return None if row is None else record(row)


async def find_by_hash(session: AsyncSession, hashes: Sequence[str]) -> AdminKey | None:
    """The key whose keyed hash is one of ``hashes`` (one per keyring key), if any."""
    row = await session.scalar(select(_Row).where(_Row.key_hash.in_(list(hashes))))
    return None if row is None else record(row)


async def revoke(session: AsyncSession, key_id: str, *, at: datetime) -> AdminKey:
    """Mark the key revoked ``at``, or raise ``NotFoundError``; returns it.

    A key already revoked keeps its first revocation.
    """
    row = await session.get(_Row, key_id)
    if row is None:
        raise NotFoundError(f"no admin key {key_id!r}")
    if row.revoked_at is None:
        row.revoked_at = at
        await session.flush()
    return record(row)
