"""Engine creation and schema management (Alembic)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

import broker

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession


def create_engine(url: str, *, pool: bool = True) -> AsyncEngine:
    """An async engine; SQLite gets WAL, full fsync, foreign keys and a busy timeout."""
    # Database errors must never carry statement parameters (ciphertexts, keyed hashes, audit
    # details) into logs or exception messages.
    kwargs: dict[str, Any] = {"hide_parameters": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}
    if not pool:
        kwargs["poolclass"] = NullPool
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:  # noqa: ANN401 - DB-API object
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the wheel, or at the root of a checkout."""
    packaged = Path(broker.__file__).parent / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(broker.__file__).parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` that needs no alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = url
    return config


def upgrade_schema(url: str) -> None:
    """Create or upgrade the schema to the newest migration (blocking; call off the loop)."""
    command.upgrade(alembic_config(url), "head")
