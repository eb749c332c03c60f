"""Alembic migrations and the SQLAlchemy models never drift (SPEC §7)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from broker.storage.database import create_engine
from broker.storage.models import Base

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_upgrade_head_creates_every_model_table_with_no_drift(database_url: str) -> None:
    engine = create_engine(database_url, pool=False)
    async with engine.connect() as connection:
        tables = await connection.run_sync(_tables)
        diff = await connection.run_sync(_diff)
    await engine.dispose()
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables
    assert diff == []
