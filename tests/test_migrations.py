"""Alembic migrations and the SQLAlchemy models never drift.

Contract: docs/storage-and-keys.md#tables-and-migrations.
"""

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


async def test_database_errors_never_show_statement_parameters(database_url: str) -> None:
    import pytest  # noqa: PLC0415
    from sqlalchemy import text  # noqa: PLC0415
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    engine = create_engine(database_url, pool=False)
    try:
        async with engine.connect() as connection:
            with pytest.raises(SQLAlchemyError) as info:
                await connection.execute(
                    text("INSERT INTO no_such_table (secret) VALUES (:secret)"),
                    {"secret": "cbs_do-not-log-me"},
                )
    finally:
        await engine.dispose()
    assert "cbs_do-not-log-me" not in str(info.value)
