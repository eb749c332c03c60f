"""Per-client rate limits: a token bucket per client, kept in the database.

The bucket's clock is replaced by a settable one, so refill is tested without sleeping.

Contract: docs/proxy-rules.md#rate-limit, docs/deployment.md#what-replicas-share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import func, select, text

from broker.app import create_app
from broker.storage.models import RateBucket
from tests.proxy.support import make_caller

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from broker.services.ratelimit import RateLimitService
    from tests.support.env import BrokerEnv

COURSE = "/api/v1/courses/1201"
V1 = "/broker/v1"


@dataclass
class Clock:
    """A settable epoch clock."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        """The current time."""
        return self.now


@dataclass
class Limited:
    """``env`` plus a broker app whose rate limiter reads ``clock``."""

    env: BrokerEnv
    http: httpx.AsyncClient
    clock: Clock

    async def get(self, token: str, path: str = COURSE) -> httpx.Response:
        """A proxied GET with ``token``."""
        return await self.http.get(path, headers={"Authorization": f"Bearer {token}"})

    async def statuses(self, token: str, count: int) -> list[int]:
        """Status codes of ``count`` successive calls."""
        return [(await self.get(token)).status_code for _ in range(count)]


@pytest.fixture
async def limited(env: BrokerEnv) -> AsyncIterator[Limited]:
    """``env``'s database and simulator behind an app whose limiter uses a fake clock."""
    app = create_app(context=env.context)
    clock = Clock()
    rate_limits: RateLimitService = app.state.rate_limits
    rate_limits.clock = clock
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
        yield Limited(env=env, http=http, clock=clock)


async def bucket_rows(env: BrokerEnv) -> int:
    """How many rate buckets exist."""
    async with env.context.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(RateBucket)) or 0)


async def patch_client(env: BrokerEnv, client_id: str, **fields: Any) -> httpx.Response:
    """PATCH a client as admin."""
    return await env.http.patch(f"{V1}/clients/{client_id}", headers=env.admin(), json=fields)


async def test_burst_is_allowed_then_refused_with_429_and_retry_after(limited: Limited) -> None:
    env = limited.env
    caller = await make_caller(env, rate_limit=2, rate_burst=3)

    assert await limited.statuses(caller.token, 3) == [200, 200, 200]
    refused = await limited.get(caller.token)

    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    body = refused.json()
    assert body["error"] == "rate_limited"
    assert body["errors"][0]["message"]
    assert body["request_id"] == refused.headers["x-request-id"]
    assert len(env.sim.state.received) == 3


async def test_refusal_is_audited_as_deny_rate_limited(limited: Limited) -> None:
    env = limited.env
    caller = await make_caller(env, rate_limit=1, rate_burst=1)
    await limited.get(caller.token)
    refused = await limited.get(caller.token)

    newest = (await env.audit(kind="proxy"))[0]

    assert refused.status_code == 429
    assert newest["request_id"] == refused.headers["x-request-id"]
    assert (newest["decision"], newest["reason"], newest["status"]) == ("deny", "rate_limited", 429)
    assert (newest["client_id"], newest["token_id"]) == (caller.client_id, caller.token_id)


async def test_retry_after_counts_whole_seconds_until_a_token_is_back(limited: Limited) -> None:
    caller = await make_caller(limited.env, rate_limit=0.25, rate_burst=1)
    await limited.get(caller.token)
    limited.clock.now += 1

    refused = await limited.get(caller.token)

    # One token every 4 s; 1 s has passed.
    assert refused.headers["retry-after"] == "3"


async def test_bucket_refills_as_the_clock_advances(limited: Limited) -> None:
    env = limited.env
    caller = await make_caller(env, rate_limit=2, rate_burst=3)
    assert await limited.statuses(caller.token, 4) == [200, 200, 200, 429]

    limited.clock.now += 0.5
    assert await limited.statuses(caller.token, 2) == [200, 429]
    limited.clock.now += 60
    # A long pause refills the bucket only up to the burst.
    assert await limited.statuses(caller.token, 4) == [200, 200, 200, 429]
    assert len(env.sim.state.received) == 7


async def test_refused_calls_do_not_spend_tokens(limited: Limited) -> None:
    caller = await make_caller(limited.env, rate_limit=1, rate_burst=1)
    await limited.get(caller.token)
    for _ in range(3):
        limited.clock.now += 0.25
        assert (await limited.get(caller.token)).status_code == 429
    limited.clock.now += 0.25
    assert (await limited.get(caller.token)).status_code == 200


async def test_a_clock_going_backwards_never_refills(limited: Limited) -> None:
    caller = await make_caller(limited.env, rate_limit=1, rate_burst=1)
    await limited.get(caller.token)
    limited.clock.now -= 30
    assert (await limited.get(caller.token)).status_code == 429
    limited.clock.now += 30.5
    # The bucket's time did not move back, so only 0.5 s of refill is due.
    assert (await limited.get(caller.token)).status_code == 429
    limited.clock.now += 0.5
    assert (await limited.get(caller.token)).status_code == 200


async def test_calls_refused_by_the_grant_still_spend_tokens(limited: Limited) -> None:
    caller = await make_caller(limited.env, rate_limit=1, rate_burst=2)
    denied = await limited.http.delete(COURSE, headers=caller.headers)
    assert denied.status_code == 403
    assert await limited.statuses(caller.token, 2) == [200, 429]


async def test_client_without_a_limit_never_writes_a_bucket(limited: Limited) -> None:
    env = limited.env
    caller = await make_caller(env)
    assert await limited.statuses(caller.token, 20) == [200] * 20
    assert await bucket_rows(env) == 0


async def test_two_clients_have_independent_buckets(limited: Limited) -> None:
    first = await make_caller(limited.env, "first", rate_limit=1, rate_burst=1)
    second = await make_caller(limited.env, "second", rate_limit=1, rate_burst=2)
    assert await limited.statuses(first.token, 2) == [200, 429]
    assert await limited.statuses(second.token, 3) == [200, 200, 429]
    assert await bucket_rows(limited.env) == 2


async def test_tokens_of_one_client_share_its_bucket(limited: Limited) -> None:
    caller = await make_caller(limited.env, rate_limit=1, rate_burst=2)
    other_token = await limited.env.token(caller.client_id, caller.secret)
    assert await limited.statuses(caller.token, 1) == [200]
    assert await limited.statuses(other_token, 2) == [200, 429]


async def test_patching_the_rate_applies_at_once(limited: Limited) -> None:
    env = limited.env
    caller = await make_caller(env, rate_limit=1, rate_burst=1)
    assert await limited.statuses(caller.token, 2) == [200, 429]

    raised = await patch_client(env, caller.client_id, rate_limit=10, rate_burst=20)
    assert raised.status_code == 200
    limited.clock.now += 0.5
    # 0.5 s at the new rate of 10/s refills 5 tokens.
    assert await limited.statuses(caller.token, 6) == [200] * 5 + [429]

    removed = await patch_client(env, caller.client_id, rate_limit=None)
    assert (removed.json()["rate_limit"], removed.json()["rate_burst"]) == (None, None)
    assert await limited.statuses(caller.token, 30) == [200] * 30
    assert await bucket_rows(env) == 0


async def test_adding_a_limit_to_a_client_with_live_tokens_applies_at_once(
    limited: Limited,
) -> None:
    caller = await make_caller(limited.env)
    assert await limited.statuses(caller.token, 3) == [200] * 3
    await patch_client(limited.env, caller.client_id, rate_limit=1)
    assert await limited.statuses(caller.token, 2) == [200, 429]


async def test_refuses_with_503_and_forwards_nothing_when_the_bucket_cannot_be_written(
    limited: Limited,
) -> None:
    env = limited.env
    caller = await make_caller(env, rate_limit=5)
    async with env.context.engine.begin() as connection:
        await connection.execute(text("ALTER TABLE rate_buckets RENAME TO rate_buckets_offline"))
    try:
        response = await limited.get(caller.token)
    finally:
        async with env.context.engine.begin() as connection:
            await connection.execute(
                text("ALTER TABLE rate_buckets_offline RENAME TO rate_buckets")
            )
        await env.context.engine.dispose()

    assert response.status_code == 503
    assert response.json()["error"] == "rate_limit_unavailable"
    assert env.sim.state.received == []
    newest = (await env.audit(kind="proxy"))[0]
    assert (newest["decision"], newest["reason"]) == ("deny", "rate_limit_unavailable")


# Client settings ----------------------------------------------------------------------------


async def test_rate_settings_are_shown_and_burst_defaults_to_the_rounded_up_rate(
    env: BrokerEnv,
) -> None:
    client_id, _secret = await env.client(rate_limit=2.5)
    shown = (await env.http.get(f"{V1}/clients/{client_id}", headers=env.auditor())).json()
    assert (shown["rate_limit"], shown["rate_burst"]) == (2.5, 3)

    slow_id, _secret = await env.client("slow", rate_limit=0.1)
    slow = (await env.http.get(f"{V1}/clients/{slow_id}", headers=env.auditor())).json()
    assert (slow["rate_limit"], slow["rate_burst"]) == (0.1, 1)

    free_id, _secret = await env.client("free")
    free = (await env.http.get(f"{V1}/clients/{free_id}", headers=env.auditor())).json()
    assert (free["rate_limit"], free["rate_burst"]) == (None, None)


async def test_rate_settings_are_audited_in_the_admin_event(env: BrokerEnv) -> None:
    client_id, _secret = await env.client(rate_limit=5, rate_burst=10)
    [created] = [e for e in await env.audit(kind="admin") if e["action"] == "client.create"]
    assert created["details"]["changes"]["rate_limit"] == 5
    assert created["details"]["changes"]["rate_burst"] == 10

    await patch_client(env, client_id, rate_burst=7)
    [updated, *_] = [e for e in await env.audit(kind="admin") if e["action"] == "client.update"]
    assert updated["details"]["changes"] == {"rate_burst": {"old": 10, "new": 7}}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param({"rate_limit": 0}, "rate_limit", id="zero-rate"),
        pytest.param({"rate_limit": -1}, "rate_limit", id="negative-rate"),
        pytest.param({"rate_limit": 1e9}, "rate_limit", id="huge-rate"),
        pytest.param({"rate_limit": 1, "rate_burst": 0}, "rate_burst", id="zero-burst"),
        pytest.param({"rate_limit": 1, "rate_burst": 10**9}, "rate_burst", id="huge-burst"),
        pytest.param({"rate_burst": 5}, "rate_burst", id="burst-without-rate"),
        pytest.param({"rate_limit": 1, "rate_burst": 1.5}, "rate_burst", id="fractional-burst"),
        pytest.param({"rate_limit": "fast"}, "rate_limit", id="not-a-number"),
    ],
)
async def test_bad_rate_settings_are_422_naming_the_field(
    env: BrokerEnv, fields: dict[str, Any], field: str
) -> None:
    created = await env.http.post(
        f"{V1}/clients",
        headers=env.admin(),
        json={"name": "job", "credential": "worker", "scopes": ["url:GET|/api/v1/courses/:id"]}
        | fields,
    )
    assert created.status_code == 422, created.text
    assert field in created.json()["message"]

    client_id, _secret = await env.client("other")
    patched = await patch_client(env, client_id, **fields)
    assert patched.status_code == 422, patched.text
    assert field in patched.json()["message"]
    shown = (await env.http.get(f"{V1}/clients/{client_id}", headers=env.auditor())).json()
    assert (shown["rate_limit"], shown["rate_burst"]) == (None, None)


async def test_non_finite_rate_is_422(env: BrokerEnv) -> None:
    response = await env.http.post(
        f"{V1}/clients",
        headers={**env.admin(), "Content-Type": "application/json"},
        content=b'{"name": "job", "credential": "worker", "scopes": ["url:GET|/api/v1/courses/:id"]'
        b', "rate_limit": Infinity}',
    )
    assert response.status_code == 422, response.text
