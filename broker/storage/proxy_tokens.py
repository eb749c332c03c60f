"""Proxy tokens in the database (metadata; values are never stored). Flushes, never commits.

The proxy's own lookup of a presented token, joined to its client, credential and upstream,
is ``queries.find_token``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import func, select, update

from broker.domain import ProxyToken
from broker.errors import NotFoundError
from broker.storage import models

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession

_Row = models.ProxyToken


def record(row: models.ProxyToken) -> ProxyToken:
    """The token's metadata a row holds."""
    return ProxyToken(
        id=row.id,
        client_id=row.client_id,
        scopes=tuple(row.scopes),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        revoked_by=row.revoked_by,
        source_ip=row.source_ip,
    )


async def add(session: AsyncSession, token: ProxyToken, *, token_hash: str) -> ProxyToken:
    """Insert a newly minted token, stored as its keyed hash."""
    row = _Row(
        id=token.id,
        token_hash=token_hash,
        client_id=token.client_id,
        scopes=list(token.scopes),
        created_at=token.created_at,
        expires_at=token.expires_at,
        revoked_at=token.revoked_at,
        revoked_by=token.revoked_by,
        source_ip=token.source_ip,
    )
    session.add(row)
    await session.flush()
    return record(row)


async def find(session: AsyncSession, token_id: str) -> ProxyToken | None:
    """The token with this id, if any."""
    row = await session.get(_Row, token_id)
    return None if row is None else record(row)


async def find_by_hash(session: AsyncSession, hashes: Sequence[str]) -> ProxyToken | None:
    """The token (of any client) whose keyed hash is one of ``hashes``, if any."""
    row = await session.scalar(select(_Row).where(_Row.token_hash.in_(list(hashes))))
    return None if row is None else record(row)


async def find_of_client(
    session: AsyncSession, hashes: Sequence[str], client_id: str
) -> ProxyToken | None:
    """The token of ``client_id`` whose keyed hash is one of ``hashes``, if any."""
    row = await session.scalar(
        select(_Row).where(_Row.token_hash.in_(list(hashes)), _Row.client_id == client_id)
    )
    return None if row is None else record(row)


async def newest(
    session: AsyncSession, *, client_id: str | None, live_at: datetime | None, limit: int
) -> list[ProxyToken]:
    """Up to ``limit`` tokens, newest first: of one client if given; live ones if ``live_at``.

    A live token is neither revoked nor expired at ``live_at``.
    """
    query = select(_Row).order_by(_Row.created_at.desc()).limit(limit)
    if client_id is not None:
        query = query.where(_Row.client_id == client_id)
    if live_at is not None:
        query = query.where(_Row.revoked_at.is_(None), _Row.expires_at > live_at)
    return [record(row) for row in await session.scalars(query)]


async def count_live(session: AsyncSession, at: datetime) -> int:
    """How many tokens are neither revoked nor expired at ``at``."""
    count = await session.scalar(
        select(func.count())
        .select_from(_Row)
        .where(_Row.revoked_at.is_(None), _Row.expires_at > at)
    )
    return count or 0


async def revoke(session: AsyncSession, token_id: str, *, at: datetime, by: str) -> ProxyToken:
    """Mark the token revoked ``at`` by ``by``, or raise ``NotFoundError``; returns it.

    A token already revoked keeps its first revocation.
    """
    row = await session.get(_Row, token_id)
    if row is None:
        raise NotFoundError(f"no token {token_id!r}")
    if row.revoked_at is None:
        row.revoked_at, row.revoked_by = at, by
        await session.flush()
    return record(row)


async def revoke_of_client(session: AsyncSession, client_id: str, *, at: datetime, by: str) -> int:
    """Revoke every token of ``client_id`` not yet revoked; returns how many."""
    result = await session.execute(
        update(_Row)
        .where(_Row.client_id == client_id, _Row.revoked_at.is_(None))
        .values(revoked_at=at, revoked_by=by)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
