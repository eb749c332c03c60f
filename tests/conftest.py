"""Fixtures: a real database (SQLite, or PostgreSQL via BROKER_TEST_DATABASE_URL), the Canvas
simulator on a loopback port, and the broker app driven over HTTP."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import URL, create_engine, make_url, text

from broker.app import create_app
from broker.config import Settings, normalise_database_url
from broker.context import ProcessContext
from broker.keyring import Keyring
from broker.services.audit_hub import AuditHub
from broker.sim.data import seed_data
from broker.sim.server import SimServer
from broker.sim.state import SimState
from broker.sim.throttle import CanvasThrottle
from broker.storage.database import Database, upgrade_schema
from broker.storage.models import Base
from tests.support.env import AUDIT_HUB, WORKER_TOKEN, BrokerEnv

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

POSTGRES_URL = os.environ.get("BROKER_TEST_DATABASE_URL")

HEALTHY_BOUND = 10.0
"""BROKER_AUDIT_TIMEOUT of the tests that do not test the bound (see ``settings``)."""


def _sync_url(url: str | URL) -> str:
    text_url = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    return (
        normalise_database_url(text_url).replace("+asyncpg", "+psycopg").replace("+aiosqlite", "")
    )


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database: a template SQLite file, or a PostgreSQL database of this run's own.

    On PostgreSQL a database named after the given one plus this process id is created (and
    dropped afterwards), so concurrent runs against one server never see each other.
    """
    if not POSTGRES_URL:
        path = tmp_path_factory.mktemp("template") / "template.sqlite3"
        upgrade_schema(f"sqlite+aiosqlite:///{path}")
        yield str(path)
        return
    given = make_url(normalise_database_url(POSTGRES_URL))
    name = f"{given.database}_run{os.getpid()}"
    admin = create_engine(_sync_url(given), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = given.set(database=name).render_as_string(hide_password=False)
    upgrade_schema(url)
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def clean_database(template_db: str, directory: Path) -> str:
    """Return the URL of a clean, migrated database: a copy of the SQLite template in
    ``directory``, or the run's PostgreSQL database emptied."""
    if POSTGRES_URL:
        engine = create_engine(_sync_url(template_db))
        with engine.begin() as connection:
            tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
            connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
            # The row the migration seeds: revocations are counted in it.
            connection.execute(text("INSERT INTO revocation_epoch (id, epoch) VALUES (1, 0)"))
        engine.dispose()
        return template_db
    path = directory / "broker.sqlite3"
    shutil.copyfile(template_db, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def database_url(template_db: str, tmp_path: Path) -> str:
    """A clean, migrated database for one test."""
    return clean_database(template_db, tmp_path)


@pytest.fixture(scope="session")
def sim_server() -> Iterator[SimServer]:
    """One simulator for the session; ``sim`` resets it per test."""
    with SimServer(SimState(tokens={WORKER_TOKEN})) as server:
        yield server


@pytest.fixture
def sim(sim_server: SimServer) -> SimServer:
    """The simulator with fresh data and nothing received."""
    state = sim_server.state
    state.received.clear()
    state.data = seed_data()
    state.throttle = CanvasThrottle()
    state.max_per_page = 100
    return sim_server


@pytest.fixture
def settings(database_url: str) -> Settings:
    """Settings for one test's broker.

    Its database bound is generous: on a loaded CI host a healthy lookup has been seen to
    take over two seconds, and a test of something else must not fail on that. The tests of
    the bound itself (tests/e2e/test_audit_faults.py, test_replica_partition.py) set theirs.
    """
    return Settings(
        database_url=database_url, keys=None, public_url=None, audit_timeout=HEALTHY_BOUND
    )


@pytest.fixture
async def context(settings: Settings) -> AsyncIterator[ProcessContext]:
    """A process context with a fresh keyring.

    With BROKER_TEST_AUDIT_HUB=1 its audit events go through an audit hub, as in each worker
    of ``broker serve --workers N`` (CI runs the proxy tests so too).
    """
    keyring = Keyring.generate()
    with running_hub(settings, keyring) if AUDIT_HUB else contextlib.nullcontext() as hub:
        if hub is not None:
            settings = settings.model_copy(update={"audit_socket": hub.path})
        process = ProcessContext.from_settings(settings, keyring=keyring)
        yield process
        await process.aclose()


@contextlib.contextmanager
def running_hub(settings: Settings, keyring: Keyring) -> Iterator[AuditHub]:
    """An audit hub for ``settings``' database, on a socket in a fresh private directory."""
    directory = Path(tempfile.mkdtemp(prefix="cth-"))  # short: a socket path has a limit
    hub = AuditHub(Database(settings.async_database_url), keyring, directory / "audit.sock")
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def env(context: ProcessContext, sim: SimServer) -> AsyncIterator[BrokerEnv]:
    """A provisioned broker driven over ASGI, forwarding to the simulator."""
    app = create_app(context=context)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
        broker_env = BrokerEnv(context=context, http=http, sim=sim)
        await broker_env.provision()
        yield broker_env
