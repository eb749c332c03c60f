"""Per-client token buckets in the database. Never commits.

``take`` is the one atomic upsert that spends a token, shown and argued for in the docstring
of ``services.ratelimit``: concurrent calls on any replica never spend the same token, an
empty bucket is left unchanged, and ``updated_at`` never moves backwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Double, delete, func, literal
from sqlalchemy.dialects import postgresql, sqlite

from broker.domain import RateBucket
from broker.storage import models

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement
    from sqlalchemy.ext.asyncio import AsyncSession


async def take(
    session: AsyncSession, client_id: str, *, rate: float, burst: float, now: float
) -> bool:
    """Spend one token of the client's bucket at ``now`` (epoch seconds), if it holds one.

    A bucket not yet stored starts full. False: the bucket is empty and was left unchanged.
    """
    return await session.scalar(_take_statement(session, client_id, rate, burst, now)) is not None


def _take_statement(
    session: AsyncSession, client_id: str, rate: float, burst: float, now: float
) -> Any:  # noqa: ANN401 - the dialect's Insert construct
    """The upsert that spends a token atomically (see the module docstring)."""
    on_sqlite = session.get_bind().dialect.name == "sqlite"
    # SQLite's two-argument min()/max() are the scalar least()/greatest() of PostgreSQL.
    least, greatest = (func.min, func.max) if on_sqlite else (func.least, func.greatest)
    insert = sqlite.insert if on_sqlite else postgresql.insert
    bucket = models.RateBucket
    now_: ColumnElement[float] = literal(now, Double())
    zero: ColumnElement[float] = literal(0.0, Double())
    refilled = least(
        literal(burst, Double()),
        bucket.tokens + greatest(zero, now_ - bucket.updated_at) * rate,
    )
    return (
        insert(bucket)
        .values(client_id=client_id, tokens=burst - 1, updated_at=now)
        .on_conflict_do_update(
            index_elements=[bucket.client_id],
            set_={"tokens": refilled - 1, "updated_at": greatest(bucket.updated_at, now_)},
            where=refilled >= 1,
        )
        .returning(bucket.tokens)
    )


async def find(session: AsyncSession, client_id: str) -> RateBucket | None:
    """The client's bucket as last written, if it has one."""
    row = await session.get(models.RateBucket, client_id)
    return None if row is None else RateBucket(tokens=row.tokens, updated_at=row.updated_at)


async def forget(session: AsyncSession, client_id: str) -> None:
    """Drop the client's bucket: a limit set again later starts from a full bucket."""
    await session.execute(delete(models.RateBucket).where(models.RateBucket.client_id == client_id))
