"""``allowed_cidrs``: a client may mint tokens and call only from its listed networks.

The ASGI test transport connects from 127.0.0.1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.support.env import bearer

if TYPE_CHECKING:
    from tests.proxy.conftest import EnvFactory
    from tests.support.env import BrokerEnv

GRANT = {"grant_type": "client_credentials"}


async def test_token_request_from_an_unlisted_address_is_refused_and_audited(
    env: BrokerEnv,
) -> None:
    client_id, secret = await env.client(allowed_cidrs=["10.0.0.0/8"])
    response = await env.http.post("/broker/v1/oauth/token", data=GRANT, auth=(client_id, secret))
    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"
    [event] = await env.audit(kind="token", client=client_id)
    assert (event["decision"], event["reason"]) == ("deny", "source_not_allowed")


async def test_call_from_a_listed_address_is_forwarded(env: BrokerEnv) -> None:
    token = await env.client_token(allowed_cidrs=["127.0.0.0/8", "::1/128"])
    response = await env.http.get("/api/v1/courses/1201", headers=bearer(token))
    assert response.status_code == 200
    assert len(env.sim.state.received) == 1


async def test_narrowing_allowed_cidrs_refuses_live_tokens_at_once(env: BrokerEnv) -> None:
    client_id, secret = await env.client(allowed_cidrs=["127.0.0.1/32"])
    token = await env.token(client_id, secret)
    changed = await env.http.patch(
        f"/broker/v1/clients/{client_id}",
        headers=env.admin(),
        json={"allowed_cidrs": ["192.0.2.0/24"]},
    )
    assert changed.status_code == 200

    response = await env.http.get("/api/v1/courses/1201", headers=bearer(token))

    assert response.status_code == 403
    assert response.json()["error"] == "source_not_allowed"
    assert env.sim.state.received == []
    [event] = await env.audit(kind="proxy")
    assert (event["decision"], event["reason"], event["client_id"]) == (
        "deny",
        "source_not_allowed",
        client_id,
    )


async def test_forwarded_for_counts_only_from_a_trusted_proxy(make_env: EnvFactory) -> None:
    trusting = await make_env(trusted_proxies="127.0.0.1/32")
    client_id, secret = await trusting.client(allowed_cidrs=["198.51.100.0/24"])
    via_proxy = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7"}
    minted = await trusting.http.post(
        "/broker/v1/oauth/token", data=GRANT, auth=(client_id, secret), headers=via_proxy
    )
    assert minted.status_code == 200, minted.text
    token = minted.json()["access_token"]

    allowed = await trusting.http.get(
        "/api/v1/courses/1201", headers={**bearer(token), **via_proxy}
    )

    assert allowed.status_code == 200
    [event] = await trusting.audit(kind="proxy")
    # The rightmost address appended by the trusted proxy; the client-written one is ignored.
    assert event["source_ip"] == "198.51.100.7"


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(env: BrokerEnv) -> None:
    client_id, secret = await env.client(allowed_cidrs=["127.0.0.1/32"])
    token = await env.token(client_id, secret)
    await env.http.patch(
        f"/broker/v1/clients/{client_id}",
        headers=env.admin(),
        json={"allowed_cidrs": ["198.51.100.0/24"]},
    )
    forged = {**bearer(token), "X-Forwarded-For": "198.51.100.7"}
    response = await env.http.get("/api/v1/courses/1201", headers=forged)
    assert response.status_code == 403
    assert response.json()["error"] == "source_not_allowed"
    assert env.sim.state.received == []
