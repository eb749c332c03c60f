"""No request reaches Canvas unless its audit event is committed first.

Contract: docs/audit.md#fail-closed.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text

from tests.proxy.support import make_caller

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.support.env import BrokerEnv

COURSE = "/api/v1/courses/1201"


@asynccontextmanager
async def audit_store_down(env: BrokerEnv) -> AsyncIterator[None]:
    """Make every audit write fail for real: the table is renamed away, then restored."""
    async with env.context.engine.begin() as connection:
        await connection.execute(text("ALTER TABLE audit_events RENAME TO audit_events_offline"))
    try:
        yield
    finally:
        async with env.context.engine.begin() as connection:
            await connection.execute(
                text("ALTER TABLE audit_events_offline RENAME TO audit_events")
            )
        # Connections may hold statements prepared against the renamed table. Stop the
        # revocation poller first so no connection is in use while the pool is replaced.
        await env.context.epoch.aclose()
        await env.context.engine.dispose()


@pytest.mark.parametrize(
    ("method", "path", "would_be"),
    [
        pytest.param("GET", COURSE, 200, id="granted"),
        pytest.param("DELETE", COURSE, 403, id="refused"),
        pytest.param("GET", "/api/v1//courses", 400, id="non-canonical"),
    ],
)
async def test_proxy_answers_503_and_forwards_nothing_when_the_audit_store_fails(
    env: BrokerEnv, method: str, path: str, would_be: int
) -> None:
    caller = await make_caller(env)
    async with audit_store_down(env):
        response = await env.http.request(method, path, headers=caller.headers)
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "audit_unavailable"
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["errors"][0]["message"]
    assert env.sim.state.received == []
    # With the store back, the same call gets its usual answer and is recorded.
    again = await env.http.request(method, path, headers=caller.headers)
    assert again.status_code == would_be
    events = await env.audit(kind="proxy")
    assert [event["request_id"] for event in events] == [again.headers["x-request-id"]]


async def test_missing_token_is_503_when_the_audit_store_fails(env: BrokerEnv) -> None:
    async with audit_store_down(env):
        response = await env.http.get(COURSE)
    assert response.status_code == 503
    assert response.json()["error"] == "audit_unavailable"
    assert "www-authenticate" not in response.headers
    assert env.sim.state.received == []
