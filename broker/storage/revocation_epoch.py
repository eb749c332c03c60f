"""The revocation epoch counter in the database (``services.revocation``). Never commits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from sqlalchemy import select, update

from broker.storage.models import RevocationEpoch

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.ext.asyncio import AsyncSession

ROW_ID: Final = 1
_READ: Final = select(RevocationEpoch.epoch).where(RevocationEpoch.id == ROW_ID)


async def bump(session: AsyncSession) -> None:
    """Move the counter on, in the caller's transaction."""
    await session.execute(
        update(RevocationEpoch)
        .where(RevocationEpoch.id == ROW_ID)
        .values(epoch=RevocationEpoch.epoch + 1)
    )


async def read(session: AsyncSession) -> int | None:
    """The counter, or None if its row is missing (the schema was never initialised)."""
    return await session.scalar(_READ)


def read_sync(connection: Connection) -> int | None:
    """``read`` on a blocking connection (the poller's own thread)."""
    return connection.scalar(_READ)
