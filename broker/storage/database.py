"""The database: its engines, built in one place (``Database``), and the schema (Alembic)."""

from __future__ import annotations

import math
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import sqlalchemy
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, event, make_url, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import NullPool

import broker

SQLITE_BUSY_TIMEOUT_MS = 30000
"""How long a SQLite connection waits for another's write lock, unless bounded (``timeout``)."""

IDLE_IN_TRANSACTION_FACTOR = 5
"""A request-serving session may sit idle in a transaction this many bounds (see below)."""

WRITE_OPTION = "broker_write"
"""Execution option marking a write transaction (``BEGIN IMMEDIATE`` on SQLite)."""


def busy_timeout_ms(timeout: float | None) -> int:
    """SQLite's busy timeout for a database wait bound (None: the unbounded default)."""
    return SQLITE_BUSY_TIMEOUT_MS if timeout is None else max(1, round(timeout * 1000))


def _postgresql_bounds(timeout: float, *, statements: bool, idle_factor: int = 1) -> dict[str, str]:
    """Server settings bounding the broker's own PostgreSQL sessions (docs/audit.md#under-faults).

    ``lock_timeout`` bounds a wait for a row lock (the chain head's ``FOR UPDATE``);
    ``idle_in_transaction_session_timeout`` (``idle_factor`` bounds) makes the server end the
    session of a broker that went silent holding a transaction, releasing its locks; the
    server's TCP keepalives and ``tcp_user_timeout`` find a peer that is gone (PostgreSQL docs,
    "Client Connection Defaults" and "Connection Settings"; all are user-settable at connect
    time).

    The audit writer's own sessions hold a transaction only to link and insert, so one bound
    is plenty. A request-serving session on the event loop may legitimately sit idle in its
    transaction while the loop runs other work (a busy process, a password hash), so it gets
    ``IDLE_IN_TRANSACTION_FACTOR`` bounds; a replica cut off mid-transaction is found sooner
    by the keepalives (about the bound plus three seconds) either way.
    """
    ms = str(max(1, round(timeout * 1000)))
    idle = str(max(1, math.ceil(timeout)))
    bounds = {
        "lock_timeout": ms,
        "idle_in_transaction_session_timeout": str(max(1, round(timeout * 1000 * idle_factor))),
        "tcp_keepalives_idle": idle,
        "tcp_keepalives_interval": "1",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": ms,
    }
    if statements:
        bounds["statement_timeout"] = ms
    return bounds


def create_engine(url: str, *, pool: bool = True, timeout: float | None = None) -> AsyncEngine:
    """An async engine; SQLite gets WAL, full fsync, foreign keys and a busy timeout.

    With ``timeout`` (``BROKER_AUDIT_TIMEOUT``), every wait on the database is bounded by it:
    connecting, each statement (client and server side), a lock, a transaction left idle.
    """
    # Database errors must never carry statement parameters (ciphertexts, keyed hashes, audit
    # details) into logs or exception messages.
    kwargs: dict[str, Any] = {"hide_parameters": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": busy_timeout_ms(timeout) / 1000}
    elif timeout is not None:
        # asyncpg.connect: ``timeout`` bounds connecting, ``command_timeout`` each statement
        # on the client side (a server that stops answering), ``server_settings`` are sent
        # in the startup packet (asyncpg docs, "asyncpg.connection.connect").
        kwargs["connect_args"] = {
            "timeout": timeout,
            "command_timeout": timeout,
            "server_settings": _postgresql_bounds(
                timeout, statements=True, idle_factor=IDLE_IN_TRANSACTION_FACTOR
            ),
        }
    if not pool:
        kwargs["poolclass"] = NullPool
    elif timeout is not None:
        # A connection from the pool is not waited for longer than the bound either.
        kwargs["pool_timeout"] = timeout
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        _sqlite_transactions(engine.sync_engine, busy_timeout_ms(timeout))
    return engine


def sync_database_url(url: str) -> str:
    """The blocking-driver form of an async database URL (the audit writer's thread uses it)."""
    return url.replace("sqlite+aiosqlite://", "sqlite://", 1).replace(
        "postgresql+asyncpg://", "postgresql+psycopg://", 1
    )


def create_sync_engine(url: str, *, write: bool = False, timeout: float | None = None) -> Engine:
    """A blocking engine of one connection for a worker thread; SQLite as in ``create_engine``.

    With ``write``, every transaction is a write transaction (``BEGIN IMMEDIATE`` on SQLite).
    With ``timeout``, every wait on the database is bounded by it, as in ``create_engine``.
    """
    sync_url = sync_database_url(url)
    kwargs: dict[str, Any] = {"hide_parameters": True, "pool_size": 1, "max_overflow": 0}
    if sync_url.startswith("sqlite"):
        kwargs["connect_args"] = {
            "timeout": busy_timeout_ms(timeout) / 1000,
            "check_same_thread": False,
        }
    elif timeout is not None:
        options = " ".join(
            f"-c {name}={value}"
            for name, value in _postgresql_bounds(timeout, statements=True).items()
        )
        # libpq connection parameters (PostgreSQL docs, "Parameter Key Words"):
        # connect_timeout is whole seconds, at least 2; keepalives and tcp_user_timeout
        # make the client's kernel give up on a server that stopped acknowledging.
        kwargs["connect_args"] = {
            "connect_timeout": max(2, math.ceil(timeout)),
            "options": options,
            "keepalives": 1,
            "keepalives_idle": max(1, math.ceil(timeout)),
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "tcp_user_timeout": max(1, round(timeout * 1000)),
        }
    engine = sqlalchemy.create_engine(sync_url, **kwargs)
    if sync_url.startswith("sqlite"):
        _sqlite_transactions(engine, busy_timeout_ms(timeout))
    return engine.execution_options(**{WRITE_OPTION: True}) if write else engine


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, or None for other databases."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database:
        return None
    return Path(parsed.database)


def _sqlite_transactions(engine: Engine, busy_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
    """Take transaction control from the driver: ``BEGIN``, or ``BEGIN IMMEDIATE`` to write.

    A deferred transaction that reads and then writes fails outright (SQLITE_BUSY_SNAPSHOT)
    when another connection committed in between, which the audit writer does all the time
    under load; a write transaction must take the write lock before it reads.
    """

    def connect(dbapi_connection: Any, _record: Any) -> None:  # noqa: ANN401 - DB-API object
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.close()

    event.listen(engine, "connect", connect)
    event.listen(engine, "begin", _sqlite_begin)


def _sqlite_begin(connection: Connection) -> None:
    write = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class Sessions(async_sessionmaker[AsyncSession]):
    """Sessions in two kinds: ``sessions()`` to read, ``sessions.begin()`` to write.

    Loaded objects stay usable after commit. A write transaction on SQLite takes the write
    lock up front (``BEGIN IMMEDIATE``); on PostgreSQL both kinds are the same.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, expire_on_commit=False)
        self._writer = async_sessionmaker(
            engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False
        )

    def begin(self) -> Any:  # noqa: ANN401 - SQLAlchemy's private context-manager type
        """A write transaction: committed on success, rolled back on error."""
        return self._writer.begin()


async def ping(session: AsyncSession) -> None:
    """One round trip to the database (readiness checks)."""
    await session.execute(text("SELECT 1"))


def session_factory(engine: AsyncEngine) -> Sessions:
    """The read and write sessions of ``engine``."""
    return Sessions(engine)


class Database:
    """The broker's database: its URL and every engine the broker uses on it.

    ``engine`` and ``sessions`` serve requests on the event loop (built on first use);
    ``blocking()`` gives a thread (the audit writer, the revocation poller, verification and
    retention) an engine of its own. Nothing else builds engines.
    """

    def __init__(self, url: str, *, pool: bool = True, timeout: float | None = None) -> None:
        self.url = url
        self._pool = pool
        self.timeout = timeout
        """The bound of every wait on the database (``BROKER_AUDIT_TIMEOUT``), if any."""

    @cached_property
    def engine(self) -> AsyncEngine:
        """The async engine (SQLite: WAL, full fsync, foreign keys, busy timeout)."""
        return create_engine(self.url, pool=self._pool, timeout=self.timeout)

    @cached_property
    def sessions(self) -> Sessions:
        """Read and write sessions on :attr:`engine`."""
        return session_factory(self.engine)

    @property
    def sqlite_file(self) -> Path | None:
        """The database file, if it is SQLite."""
        return sqlite_path(self.url)

    def blocking(self, *, write: bool = False, bounded: bool = False) -> Engine:
        """A new blocking engine of one connection for a thread; dispose of it when done.

        ``bounded``: its waits are bounded by :attr:`timeout` (the audit writer's and the
        revocation poller's; maintenance such as verification and pruning may run long).
        """
        return create_sync_engine(self.url, write=write, timeout=self.timeout if bounded else None)

    async def aclose(self) -> None:
        """Release the async engine's connections (if it was ever built)."""
        if "engine" in self.__dict__:
            await self.engine.dispose()


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


@cache
def _scripts() -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    return ScriptDirectory.from_config(config)


def head_revision() -> str | None:
    """The newest migration this broker ships (Alembic's head)."""
    return _scripts().get_current_head()


def _revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def schema_revision(session: AsyncSession) -> str | None:
    """The migration the database is at, or None if it was never initialised."""
    connection = await session.connection()
    return await connection.run_sync(_revision)


def schema_problem(revision: str | None) -> str | None:
    """What is wrong with a database at ``revision`` for this broker, and the fix; or None.

    Said of BROKER_DATABASE_URL ("points at a database ..."), as every problem here is.
    """
    head = head_revision()
    if revision == head:
        return None
    if revision is None:
        return "points at a database with no broker schema (never initialised): run `broker init`"
    known = {script.revision for script in _scripts().walk_revisions()}
    if revision not in known:
        return (
            f"points at a database at migration {revision}, unknown to this broker (made by a "
            "newer release?): run the release that migrated it"
        )
    return (
        f"points at a database at migration {revision}, not {head}: run `broker init` "
        "(it upgrades the schema)"
    )


def sqlite_directory_problem(url: str) -> str | None:
    """If ``url`` names a SQLite file in a directory that does not exist, say so and the fix."""
    path = sqlite_path(url)
    if path is None or path.parent.is_dir():
        return None
    return (
        f"names a SQLite file in {path.parent.resolve()}, a directory that does not exist: "
        "create it (or point BROKER_DATABASE_URL elsewhere), then run `broker init`"
    )


def check_database(url: str, *, connect_timeout: float = 10.0) -> str | None:
    """Why the broker cannot run on the database at ``url`` (async URL), naming the fix; or None.

    Blocking; for ``broker serve`` before it starts. A SQLite file that does not exist is
    reported, never created.
    """
    problem = sqlite_directory_problem(url)
    if problem is not None:
        return problem
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return f"names {path.resolve()}, which does not exist: run `broker init` to create it"
    sync_url = sync_database_url(url)
    connect_args: dict[str, Any] = (
        {"timeout": connect_timeout}
        if sync_url.startswith("sqlite")
        else {"connect_timeout": max(1, int(connect_timeout))}
    )
    engine = sqlalchemy.create_engine(
        sync_url, hide_parameters=True, poolclass=NullPool, connect_args=connect_args
    )
    try:
        with engine.connect() as connection:
            revision = _revision(connection)
    except SQLAlchemyError as exc:
        return (
            f"points at a database that cannot be used ({database_problem(exc)}): "
            "check the URL and that the database is running"
        )
    finally:
        engine.dispose()
    return schema_problem(revision)


def database_problem(exc: SQLAlchemyError) -> str:
    """The driver's own first line (statement parameters are hidden by the engine)."""
    origin = getattr(exc, "orig", None) or exc
    lines = str(origin).strip().splitlines()
    return lines[0][:300] if lines else type(origin).__name__
