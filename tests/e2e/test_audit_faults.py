"""A PostgreSQL that stops answering: prompt 503s, nothing forwarded, completions kept.

The broker reaches PostgreSQL through a loopback relay that can drop every byte while keeping
the connections open, as a partition does (tests/support/relay.py). Contract:
docs/audit.md#under-faults.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.engine import make_url

from broker.config import Settings, normalise_database_url
from tests.conftest import POSTGRES_URL
from tests.support.env import bearer
from tests.support.relay import Relay

if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx

    from tests.support.env import BrokerEnv

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="BROKER_TEST_DATABASE_URL is not set")

BOUND = 1.0
ASSIGNMENTS = "/api/v1/courses/1201/assignments"


@pytest.fixture
def relay(database_url: str) -> Iterator[Relay]:
    url = make_url(normalise_database_url(database_url))
    with Relay(url.host or "127.0.0.1", url.port or 5432) as running:
        yield running


@pytest.fixture
def settings(database_url: str, relay: Relay) -> Settings:
    """The test broker's settings, its database reached through the relay."""
    url = make_url(normalise_database_url(database_url)).set(host="127.0.0.1", port=relay.port)
    return Settings(
        database_url=url.render_as_string(hide_password=False),
        keys=None,
        public_url=None,
        audit_timeout=BOUND,
    )


def forwarded(env: BrokerEnv) -> list[str]:
    return [r.raw_path for r in env.sim.state.received if r.raw_path != "/api/v1/users/self"]


async def until(check: object, seconds: float) -> None:
    """Poll the coroutine function ``check`` until it returns true, at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if await check():  # type: ignore[operator]
                return
        except Exception:  # noqa: BLE001, S110 - the database is coming back
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s")
        await asyncio.sleep(0.2)


async def test_a_blackholed_database_answers_503_promptly_forwards_nothing_and_recovers(
    env: BrokerEnv, relay: Relay
) -> None:
    token = await env.client_token()
    assert (await env.http.get(ASSIGNMENTS, headers=bearer(token))).status_code == 200
    env.sim.state.received.clear()

    relay.blackhole()
    started = time.monotonic()
    response = await env.http.get(ASSIGNMENTS, headers=bearer(token))
    elapsed = time.monotonic() - started

    assert response.status_code == 503, response.text
    assert response.json()["error"] in {"audit_unavailable", "token_store_unavailable"}
    # One bound: for the pending event or, once the token cache is stale, for the token's
    # lookup; the refusal's own event is queued rather than waited for.
    assert elapsed < BOUND + 1, elapsed
    assert forwarded(env) == []
    started = time.monotonic()
    ready = await env.http.get("/readyz")
    assert ready.status_code == 503
    assert time.monotonic() - started < 3 * BOUND + 1.5

    relay.restore()

    async def serving() -> bool:
        answer = await env.http.get(ASSIGNMENTS, headers=bearer(token))
        return answer.status_code == 200

    async def ready_again() -> bool:
        return (await env.http.get("/readyz")).status_code == 200

    await until(serving, 20)
    await until(ready_again, 20)
    assert forwarded(env) == [ASSIGNMENTS]

    async def refusal_recorded() -> bool:
        answer = await env.http.get(
            "/broker/v1/audit",
            params={"request_id": response.headers["x-request-id"]},
            headers=env.auditor(),
        )
        events = answer.json()["events"]
        return bool(events) and events[0]["status"] == 503

    await until(refusal_recorded, 20)  # the refusal queued in the outage joined the chain
    report = await env.verify_audit()
    assert report["ok"], report


async def test_a_completion_lost_to_an_outage_is_written_once_the_database_is_back(
    env: BrokerEnv, relay: Relay
) -> None:
    token = await env.client_token()
    env.sim.state.latency = 1.0
    try:
        call = await _forwarded_call(env, token)  # its pending event is committed
        relay.blackhole()
        response: httpx.Response = await call
    finally:
        env.sim.state.latency = 0.0
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    await asyncio.sleep(2 * BOUND)  # the completion's commit fails in the outage
    relay.restore()

    async def completed() -> bool:
        answer = await env.http.get(
            "/broker/v1/audit", params={"request_id": request_id}, headers=env.auditor()
        )
        events = answer.json()["events"]
        return bool(events) and events[0]["state"] == "complete"

    await until(completed, 30)
    report = await env.verify_audit()
    assert report["ok"], report
    assert report["incomplete"]["count"] == 0


async def _forwarded_call(env: BrokerEnv, token: str) -> asyncio.Future[httpx.Response]:
    """A call to ASSIGNMENTS once Canvas has received it (its answer is delayed).

    The database is healthy here, but the bound is short: on a loaded host the call may be
    refused with a 503 before it is forwarded; then it is tried again, a few times at most.
    """
    for _ in range(5):
        env.sim.state.received.clear()
        call = asyncio.ensure_future(env.http.get(ASSIGNMENTS, headers=bearer(token)))
        deadline = time.monotonic() + 10
        while not call.done() and time.monotonic() < deadline:
            if forwarded(env) == [ASSIGNMENTS]:
                return call
            await asyncio.sleep(0.05)
        await call  # refused before it was forwarded, or answered before it was seen
    pytest.fail("no call was forwarded in five tries")


async def test_a_rate_limited_client_is_refused_within_the_bound_too(
    env: BrokerEnv, relay: Relay
) -> None:
    # Its bucket is a row taken on every call (docs/audit.md#under-faults).
    token = await env.client_token("limited", rate_limit=100)
    assert (await env.http.get(ASSIGNMENTS, headers=bearer(token))).status_code == 200
    env.sim.state.received.clear()
    relay.blackhole()
    try:
        for _ in range(2):
            started = time.monotonic()
            response = await env.http.get(ASSIGNMENTS, headers=bearer(token))
            elapsed = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert elapsed < BOUND + 0.5, elapsed  # one bound, not two
    finally:
        relay.restore()
    assert forwarded(env) == []
