"""The bounds the broker sets on its own PostgreSQL sessions (docs/audit.md#under-faults).

Asked of the server itself (``SHOW``), on the request-serving async engine and on the audit
writer's blocking engine.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from broker.config import normalise_database_url
from broker.storage.database import IDLE_IN_TRANSACTION_FACTOR, Database
from tests.conftest import POSTGRES_URL

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="BROKER_TEST_DATABASE_URL is not set")

SETTINGS = (
    "lock_timeout",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "tcp_keepalives_idle",
)


def _ms(value: str) -> float:
    """A duration as PostgreSQL's SHOW prints it ("1500ms", "3s", "1min"), in milliseconds."""
    for unit, factor in (("ms", 1), ("min", 60000), ("s", 1000)):
        if value.endswith(unit):
            return float(value.removesuffix(unit)) * factor
    return float(value) * 1000  # tcp_keepalives_idle is printed in plain seconds


async def test_request_sessions_may_idle_longer_in_a_transaction_than_the_writer() -> None:
    assert POSTGRES_URL
    database = Database(normalise_database_url(POSTGRES_URL), timeout=1.5)
    try:
        async with database.sessions() as session:
            served = {
                n: _ms((await session.execute(text(f"SHOW {n}"))).scalar_one()) for n in SETTINGS
            }
        engine = database.blocking(bounded=True)
        try:
            with engine.connect() as connection:
                writer = {
                    n: _ms(connection.execute(text(f"SHOW {n}")).scalar_one()) for n in SETTINGS
                }
        finally:
            engine.dispose()
    finally:
        await database.aclose()

    for values in (served, writer):
        assert values["lock_timeout"] == 1500
        assert values["statement_timeout"] == 1500
        assert values["tcp_keepalives_idle"] == 2000
    assert writer["idle_in_transaction_session_timeout"] == 1500
    assert served["idle_in_transaction_session_timeout"] == 1500 * IDLE_IN_TRANSACTION_FACTOR


async def test_an_unbounded_database_leaves_the_server_defaults() -> None:
    assert POSTGRES_URL
    database = Database(normalise_database_url(POSTGRES_URL))
    try:
        async with database.sessions() as session:
            lock = (await session.execute(text("SHOW lock_timeout"))).scalar_one()
    finally:
        await database.aclose()
    assert lock == "0"
