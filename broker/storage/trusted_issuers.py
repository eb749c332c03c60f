"""The allowlist of workload identity issuers, and used subject tokens. Flushes, never commits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import delete, select

from broker.domain import TrustedIssuer
from broker.errors import NotFoundError
from broker.storage import models

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession


def _record(row: models.TrustedIssuer) -> TrustedIssuer:
    return TrustedIssuer(
        id=row.id,
        issuer=row.issuer,
        description=row.description,
        created_at=row.created_at,
        created_by=row.created_by,
    )


async def all_by_issuer(session: AsyncSession) -> list[TrustedIssuer]:
    """Every allowed issuer, by URL."""
    rows = await session.scalars(select(models.TrustedIssuer).order_by(models.TrustedIssuer.issuer))
    return [_record(row) for row in rows]


async def find(session: AsyncSession, issuer: str) -> TrustedIssuer | None:
    """The allowlist entry for exactly this issuer URL, if any."""
    row = await session.scalar(
        select(models.TrustedIssuer).where(models.TrustedIssuer.issuer == issuer)
    )
    return None if row is None else _record(row)


async def get(session: AsyncSession, ref: str) -> TrustedIssuer:
    """The entry with this id or issuer URL, or ``NotFoundError``."""
    row = await session.get(models.TrustedIssuer, ref) or await session.scalar(
        select(models.TrustedIssuer).where(models.TrustedIssuer.issuer == ref)
    )
    if row is None:
        raise NotFoundError(f"no trusted issuer {ref!r}")
    return _record(row)


async def add(session: AsyncSession, issuer: TrustedIssuer) -> TrustedIssuer:
    """Insert an entry (an issuer already listed raises ``IntegrityError`` here)."""
    row = models.TrustedIssuer(
        id=issuer.id,
        issuer=issuer.issuer,
        description=issuer.description,
        created_at=issuer.created_at,
        created_by=issuer.created_by,
    )
    session.add(row)
    await session.flush()
    return _record(row)


async def remove(session: AsyncSession, issuer_id: str) -> None:
    """Delete an entry."""
    await session.execute(delete(models.TrustedIssuer).where(models.TrustedIssuer.id == issuer_id))
    await session.flush()


async def remember_subject_token(
    session: AsyncSession, key: str, *, expires_at: datetime, now: datetime
) -> None:
    """Record a subject token as exchanged until ``expires_at``, forgetting expired ones.

    A key already recorded raises ``IntegrityError`` here: a replay.
    """
    await session.execute(
        delete(models.UsedSubjectToken).where(models.UsedSubjectToken.expires_at < now)
    )
    session.add(models.UsedSubjectToken(key=key, expires_at=expires_at))
    await session.flush()
