"""The token endpoint's limits per source address and per client.

Contract: docs/interfaces.md#token-endpoint-limits. A refusal is a 429 with Retry-After, is
audited, and is decided before the request costs anything further.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import pytest

from broker.app import create_app
from broker.config import Settings
from broker.core.request_limits import KeyedBuckets
from broker.errors import ConfigurationError

if TYPE_CHECKING:
    from broker.app import BrokerApp
    from tests.support.env import BrokerEnv

TOKEN_URL = "/broker/v1/oauth/token"
GRANT = {"grant_type": "client_credentials"}
SOURCE_RATE = 2.0  # a burst of 20
CLIENT_RATE = 0.5  # a burst of 5


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        keys=None,
        public_url=None,
        token_rate_per_source=SOURCE_RATE,
        token_rate_per_client=CLIENT_RATE,
    )


@pytest.fixture
def app(env: BrokerEnv) -> BrokerApp:
    """A broker on the test's context (its database, its clients), with limits of its own."""
    return create_app(context=env.context)


async def _mint(app: BrokerApp, client_id: str, secret: str, source: str) -> httpx.Response:
    # Each request from the address ``source``: the limits are keyed by the address the audit
    # log records.
    transport = httpx.ASGITransport(app=app, client=(source, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
        return await http.post(TOKEN_URL, data=GRANT, auth=(client_id, secret))


async def _limited(env: BrokerEnv) -> list[dict[str, Any]]:
    await env.context.audit_writer.flush()
    return [
        e for e in await env.audit(kind="token", limit=1000) if e["reason"] == "token_rate_limited"
    ]


async def test_a_source_over_its_rate_gets_429_before_its_credentials_are_even_read(
    env: BrokerEnv,
    app: BrokerApp,
) -> None:
    client_id, secret = await env.client()
    burst = int(SOURCE_RATE * 10)
    wrong = [await _mint(app, client_id, "wrong-secret", "192.0.2.7") for _ in range(burst)]
    assert {r.status_code for r in wrong} == {401}
    refused = await _mint(app, client_id, secret, "192.0.2.7")  # right secret, too late
    assert refused.status_code == 429
    assert refused.json()["error"] == "too_many_requests"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["cache-control"] == "no-store"
    # Another address is not held back.
    assert (await _mint(app, client_id, secret, "192.0.2.8")).status_code == 200
    [event] = await _limited(env)
    assert event["status"] == 429
    assert event["source_ip"] == "192.0.2.7"
    assert event["client_id"] is None  # refused before anything was looked up
    assert event["details"] == {
        "limit": "source",
        "retry_after": int(refused.headers["retry-after"]),
    }
    assert event["request_id"] == refused.headers["x-request-id"]


async def test_a_client_over_its_rate_gets_429_and_others_still_mint(
    env: BrokerEnv, app: BrokerApp
) -> None:
    greedy_id, greedy_secret = await env.client("greedy")
    calm_id, calm_secret = await env.client("calm")
    burst = int(CLIENT_RATE * 10)
    sources = [f"198.51.100.{n}" for n in range(1, burst + 2)]  # each source within its limit
    minted = [await _mint(app, greedy_id, greedy_secret, s) for s in sources[:burst]]
    assert {r.status_code for r in minted} == {200}
    refused = await _mint(app, greedy_id, greedy_secret, sources[burst])
    assert refused.status_code == 429
    assert "by this client" in refused.json()["error_description"]
    assert (await _mint(app, calm_id, calm_secret, sources[burst])).status_code == 200
    [event] = await _limited(env)
    assert event["client_id"] == greedy_id
    assert event["details"]["limit"] == "client"
    assert event["token_id"] is None


async def test_failed_attempts_with_a_clients_id_do_not_spend_its_allowance(
    env: BrokerEnv,
    app: BrokerApp,
) -> None:
    client_id, secret = await env.client()
    for n in range(int(CLIENT_RATE * 10) * 3):
        response = await _mint(app, client_id, "wrong-secret", f"203.0.113.{n + 1}")
        assert response.status_code == 401
    assert (await _mint(app, client_id, secret, "203.0.113.200")).status_code == 200
    assert await _limited(env) == []


def test_a_bucket_refills_at_its_rate_and_forgets_the_longest_idle_key() -> None:
    buckets = KeyedBuckets(2.0, burst=2, max_keys=2)
    assert buckets.take("a", 0.0) is None
    assert buckets.take("a", 0.0) is None
    assert buckets.take("a", 0.0) == 1  # empty: one request needs half a second, said as 1
    assert buckets.take("a", 0.5) is None  # refilled by one
    assert buckets.take("b", 0.5) is None
    assert buckets.take("c", 0.5) is None  # a third key: "a", idle longest, is forgotten
    assert len(buckets) == 2
    assert buckets.take("a", 0.5) is None  # a fresh, full bucket


def test_a_limit_of_zero_is_off_and_a_negative_one_is_refused() -> None:
    assert Settings(token_rate_per_source=0, token_rate_per_client=0).validated()
    with pytest.raises(ConfigurationError, match="BROKER_TOKEN_RATE_PER_CLIENT"):
        Settings(token_rate_per_client=-1).validated()
