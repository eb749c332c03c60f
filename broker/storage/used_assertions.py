"""Assertion ids of ``private_key_jwt`` clients already accepted. Flushes, never commits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import delete

from broker.storage.models import UsedAssertion

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession


async def remember(
    session: AsyncSession, client_id: str, jti: str, *, expires_at: datetime, now: datetime
) -> None:
    """Record ``jti`` as used by ``client_id`` until ``expires_at``, forgetting expired ones.

    A ``jti`` already recorded for the client raises ``IntegrityError`` here: a replay.
    """
    await session.execute(
        delete(UsedAssertion).where(
            UsedAssertion.client_id == client_id, UsedAssertion.expires_at < now
        )
    )
    session.add(UsedAssertion(client_id=client_id, jti=jti, expires_at=expires_at))
    await session.flush()
