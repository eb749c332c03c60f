"""A replica cut off from PostgreSQL while it holds the chain head must not stall the others.

Replica B takes the audit chain head's row lock (``SELECT … FOR UPDATE``, as its writer does
for every commit) through a loopback relay, and the relay then drops every byte, as a
partition does: B's backend sits idle in its transaction, holding the lock. Replica A, on the
same database, must answer every call within its bound (``503`` while the lock is held,
nothing forwarded) and serve again once the server ends B's session, which the settings the
broker gives its own sessions make happen within the bound. Contract:
docs/audit.md#under-faults.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from broker.config import Settings, normalise_database_url
from broker.storage.audit_chain import HEAD, HEAD_ID
from broker.storage.database import IDLE_IN_TRANSACTION_FACTOR, Database
from tests.conftest import POSTGRES_URL
from tests.support.env import bearer
from tests.support.relay import Relay

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support.env import BrokerEnv

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="BROKER_TEST_DATABASE_URL is not set")

BOUND = 1.0
ASSIGNMENTS = "/api/v1/courses/1201/assignments"
WATCH_SECONDS = 12.0  # how long replica A is watched after the cut (its loop is bounded by it)


@pytest.fixture
def settings(database_url: str) -> Settings:
    """Replica A: straight to the database, every wait bounded by BOUND."""
    return Settings(database_url=database_url, keys=None, public_url=None, audit_timeout=BOUND)


@pytest.fixture
def replica_b(database_url: str) -> Iterator[tuple[Database, Relay]]:
    """Replica B's database, reached through a relay that can cut it off."""
    url = make_url(normalise_database_url(database_url))
    with Relay(url.host or "127.0.0.1", url.port or 5432) as relay:
        through = url.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
        yield Database(through, timeout=BOUND), relay


LOCK_HEAD = text(f"SELECT last_seq FROM {HEAD.name} WHERE id = {HEAD_ID} FOR UPDATE")  # noqa: S608


@pytest.mark.parametrize(
    ("holder", "held_for"),
    # B's audit writer may idle in a transaction one bound; its request sessions (an admin
    # change appending its event) five (broker/storage/database.py).
    [("writer", BOUND), ("request", IDLE_IN_TRANSACTION_FACTOR * BOUND)],
)
async def test_a_replica_cut_off_holding_the_chain_head_does_not_stall_the_other(
    env: BrokerEnv, replica_b: tuple[Database, Relay], holder: str, held_for: float
) -> None:
    token = await env.client_token()
    assert (await env.http.get(ASSIGNMENTS, headers=bearer(token))).status_code == 200
    env.sim.state.received.clear()

    database_b, relay = replica_b
    engine = database_b.blocking(bounded=True)  # as B's audit writer connects
    connection = engine.connect() if holder == "writer" else None
    session = database_b.sessions() if holder == "request" else None
    try:
        if connection is not None:
            connection.execute(LOCK_HEAD)
        if session is not None:
            await session.execute(LOCK_HEAD)
        relay.blackhole()  # B now holds the head and says nothing more
        cut = time.monotonic()

        answers: list[tuple[float, float, int]] = []  # (since the cut, seconds, status)
        readiness: list[int] = []
        while time.monotonic() - cut < WATCH_SECONDS:
            started = time.monotonic()
            response = await env.http.get(ASSIGNMENTS, headers=bearer(token))
            answers.append((started - cut, time.monotonic() - started, response.status_code))
            if response.status_code != 200:
                readiness.append((await env.http.get("/readyz")).status_code)
            if response.status_code == 200 and time.monotonic() - cut > held_for - 0.5:
                break  # serving again once B's session can have been ended
    finally:
        # Their sockets lead nowhere: drop them rather than wait on them.
        if connection is not None:
            connection.invalidate()
        if session is not None:
            await session.invalidate()
        engine.dispose()
        await database_b.aclose()

    statuses = [status for _at, _seconds, status in answers]
    # Every call was answered within A's bound: 503 while B held the head, nothing waited
    # longer for it.
    assert set(statuses) <= {200, 503}, answers
    assert max(seconds for _at, seconds, _status in answers) < BOUND + 1.5, answers
    # A serves again once the server ends B's session, idle in its transaction for
    # ``held_for`` (the writer's bound equals A's own wait, so A's first call may just make it).
    assert statuses[-1] == 200, answers
    refused = [at + seconds for at, seconds, status in answers if status == 503]
    assert all(done < held_for + BOUND + 1 for done in refused), answers
    if held_for > 2 * BOUND:
        assert statuses[0] == 503, answers
        served = next(at + seconds for at, seconds, status in answers if status == 200)
        assert held_for - 0.5 < served, answers  # nothing committed while B held the head
        assert 503 in readiness, answers  # /readyz told the truth while A could not commit
    # Nothing refused was forwarded: Canvas saw exactly the calls answered 200.
    forwarded = [r for r in env.sim.state.received if r.raw_path != "/api/v1/users/self"]
    assert len(forwarded) == statuses.count(200)
    report = await env.verify_audit()
    assert report["ok"], report
