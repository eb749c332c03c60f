"""Bad proxy tokens get a 401 challenge; revocation works on the very next call.

Contract: docs/interfaces.md#status-codes-and-error-codes, docs/storage-and-keys.md#revocation.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import update

from broker.core.tokens import SecretKind, generate_secret
from broker.storage.models import ProxyToken, utcnow
from tests.proxy.support import Caller, assert_refused, make_caller
from tests.support.env import bearer

if TYPE_CHECKING:
    import httpx

    from tests.support.env import BrokerEnv

COURSE = "/api/v1/courses/1201"
CHALLENGE = 'Bearer realm="canvas-token-broker", error="invalid_token"'


async def _assert_challenged(
    env: BrokerEnv, response: httpx.Response, error: str, caller: Caller | None = None
) -> None:
    await assert_refused(env, response, 401, error, caller)
    assert response.headers.get_list("www-authenticate") == [CHALLENGE]
    assert response.headers["cache-control"] == "no-store"


async def test_missing_token_is_challenged(env: BrokerEnv) -> None:
    await make_caller(env)
    response = await env.http.get(COURSE)
    await _assert_challenged(env, response, "missing_token")


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Bearer", id="bearer-without-token"),
        pytest.param("Bearer    ", id="bearer-blank"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic"),
        pytest.param("Bearer not-a-broker-token", id="not-a-token"),
        pytest.param("Bearer sim-worker-token-7f3a9c2e", id="canvas-token"),
        pytest.param("Bearer cba_abcdefghijklmnopqrstuvwxyz0123456789", id="other-prefix"),
    ],
)
async def test_malformed_token_is_challenged(env: BrokerEnv, authorization: str) -> None:
    await make_caller(env)
    response = await env.http.get(COURSE, headers={"Authorization": authorization})
    await _assert_challenged(env, response, "malformed_token")


async def test_token_with_a_typo_is_challenged_as_malformed(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    typo = caller.token[:10] + ("A" if caller.token[10] != "A" else "B") + caller.token[11:]
    response = await env.http.get(COURSE, headers=bearer(typo))
    await _assert_challenged(env, response, "malformed_token")


async def test_two_authorization_headers_are_challenged_as_malformed(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    headers = [("Authorization", f"Bearer {caller.token}")] * 2
    response = await env.http.get(COURSE, headers=headers)
    await _assert_challenged(env, response, "malformed_token")


async def test_unknown_token_is_challenged(env: BrokerEnv) -> None:
    await make_caller(env)
    response = await env.http.get(COURSE, headers=bearer(generate_secret(SecretKind.PROXY_TOKEN)))
    await _assert_challenged(env, response, "unknown_token")


async def test_expired_token_is_challenged(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    async with env.context.sessions.begin() as session:
        await session.execute(
            update(ProxyToken)
            .where(ProxyToken.id == caller.token_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    response = await env.http.get(COURSE, headers=caller.headers)
    await _assert_challenged(env, response, "token_expired", caller)


async def test_token_revoked_by_its_client_is_challenged(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    revoked = await env.http.post(
        "/broker/v1/oauth/revoke",
        data={"token": caller.token},
        auth=(caller.client_id, caller.secret),
    )
    assert revoked.status_code == 200, revoked.text
    response = await env.http.get(COURSE, headers=caller.headers)
    await _assert_challenged(env, response, "token_revoked", caller)


REVOCATIONS = [
    pytest.param("/broker/v1/tokens/{token_id}/revoke", "token_revoked", id="revoke-token"),
    pytest.param(
        "/broker/v1/clients/{client_id}/revoke-tokens", "token_revoked", id="revoke-client-tokens"
    ),
    pytest.param("/broker/v1/clients/{client_id}/disable", "client_disabled", id="disable-client"),
    pytest.param("/broker/v1/credentials/worker/disable", "credential_disabled", id="credential"),
    pytest.param("/broker/v1/upstreams/sim/disable", "upstream_disabled", id="upstream"),
]


@pytest.mark.parametrize(("action", "reason"), REVOCATIONS)
async def test_revocation_takes_effect_on_the_very_next_call(
    env: BrokerEnv, action: str, reason: str
) -> None:
    caller = await make_caller(env)
    allowed = await env.http.get(COURSE, headers=caller.headers)
    assert allowed.status_code == 200, allowed.text
    done = await env.http.post(
        action.format(token_id=caller.token_id, client_id=caller.client_id), headers=env.admin()
    )
    assert done.status_code == 200, done.text
    response = await env.http.get(COURSE, headers=caller.headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == CHALLENGE
    assert response.json()["error"] == reason
    assert env.received == [COURSE]
    [event, *_] = await env.audit(kind="proxy")
    assert (event["decision"], event["reason"], event["status"]) == ("deny", reason, 401)
    assert (event["client_id"], event["token_id"]) == (caller.client_id, caller.token_id)


async def test_revoking_one_token_leaves_the_clients_other_tokens_working(
    env: BrokerEnv,
) -> None:
    client_id, secret = await env.client()
    first = await env.token(client_id, secret)
    second = await env.token(client_id, secret)
    introspected = await env.http.post(
        "/broker/v1/oauth/introspect", data={"token": first}, headers=env.admin()
    )
    first_id = introspected.json()["jti"]
    revoked = await env.http.post(f"/broker/v1/tokens/{first_id}/revoke", headers=env.admin())
    assert revoked.status_code == 200, revoked.text
    assert (await env.http.get(COURSE, headers=bearer(first))).status_code == 401
    assert (await env.http.get(COURSE, headers=bearer(second))).status_code == 200
    assert env.received == [COURSE]
