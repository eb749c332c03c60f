"""Worker tokens are verified with Canvas before they are stored.

Contract: docs/interfaces.md#worker-credentials.

The simulator stands in for Canvas: it answers ``GET /api/v1/users/self`` as Grace Hopper (user
1) for the tokens it knows and 401 for any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tests.support.env import WORKER_TOKEN, bearer

if TYPE_CHECKING:
    import httpx

    from tests.api.conftest import SimTokens
    from tests.support.env import BrokerEnv

V1 = "/broker/v1"
NEW_TOKEN = "sim-verified-new-token-5d1e"
UNKNOWN_TOKEN = "not-a-canvas-token-9b2f"
COURSE = "/api/v1/courses/1201"


async def create(env: BrokerEnv, token: str, **fields: Any) -> httpx.Response:
    body = {"upstream": "sim", "name": "second", "token": token, **fields}
    return await env.http.post(f"{V1}/credentials", headers=env.admin(), json=body)


async def names(env: BrokerEnv) -> list[str]:
    listed = (await env.http.get(f"{V1}/credentials", headers=env.admin())).json()
    return [c["name"] for c in listed]


async def created_events(env: BrokerEnv, name: str) -> list[dict[str, Any]]:
    events = await env.audit(action="credential.create")
    return [e for e in events if e["details"]["changes"]["name"] == name]


async def test_create_asks_canvas_who_the_token_is_and_records_the_user(
    env: BrokerEnv, sim_tokens: SimTokens
) -> None:
    sim_tokens.accept(NEW_TOKEN)
    env.sim.state.received.clear()
    response = await create(env, NEW_TOKEN)
    assert response.status_code == 201, response.text
    # Who the token is, then its own record (expiry, purpose) by its hint: the first five
    # characters (docs/interfaces.md#manual-tokens-with-a-lifecycle).
    [asked, record] = env.sim.state.received
    assert (asked.method, asked.raw_path) == ("GET", "/api/v1/users/self")
    assert asked.header("authorization") == f"Bearer {NEW_TOKEN}"
    assert (record.method, record.raw_path) == ("GET", f"/api/v1/users/self/tokens/{NEW_TOKEN[:5]}")
    assert record.header("authorization") == f"Bearer {NEW_TOKEN}"
    assert (response.json()["canvas_user_id"], response.json()["canvas_user_name"]) == (
        "1",
        "Grace Hopper",
    )
    fetched = (await env.http.get(f"{V1}/credentials/second", headers=env.admin())).json()
    assert fetched["canvas_user_name"] == "Grace Hopper"
    [event] = await created_events(env, "second")
    assert event["details"]["changes"]["verified"] is True
    assert event["details"]["changes"]["canvas_user_name"] == "Grace Hopper"


async def test_create_with_a_token_canvas_rejects_is_422_and_stores_nothing(
    env: BrokerEnv,
) -> None:
    response = await create(env, UNKNOWN_TOKEN)
    assert response.status_code == 422
    assert response.json()["error"] == "canvas_rejected_token"
    assert "Canvas rejected this token" in response.json()["message"]
    assert UNKNOWN_TOKEN not in response.text
    assert await names(env) == ["worker"]
    assert await created_events(env, "second") == []


async def test_create_with_an_unreachable_canvas_is_502_naming_no_verify(env: BrokerEnv) -> None:
    await env.http.post(
        f"{V1}/upstreams",
        headers=env.admin(),
        json={"name": "gone", "base_url": "http://127.0.0.1:9"},
    )
    response = await create(env, NEW_TOKEN, upstream="gone")
    assert response.status_code == 502
    assert response.json()["error"] == "canvas_unreachable"
    assert "--no-verify" in response.json()["message"]
    assert NEW_TOKEN not in response.text
    assert await names(env) == ["worker"]


async def test_create_without_verification_asks_canvas_nothing(env: BrokerEnv) -> None:
    env.sim.state.received.clear()
    response = await create(env, UNKNOWN_TOKEN, verify=False, canvas_user_id="42")
    assert response.status_code == 201, response.text
    assert env.sim.state.received == []
    assert (response.json()["canvas_user_id"], response.json()["canvas_user_name"]) == ("42", None)
    [event] = await created_events(env, "second")
    assert event["details"]["changes"]["verified"] is False


async def test_create_naming_another_canvas_user_than_the_tokens_is_422(
    env: BrokerEnv, sim_tokens: SimTokens
) -> None:
    sim_tokens.accept(NEW_TOKEN)
    response = await create(env, NEW_TOKEN, canvas_user_id="42")
    assert response.status_code == 422
    assert "belongs to Canvas user 1, not 42" in response.json()["message"]
    assert await names(env) == ["worker"]


async def test_rotate_to_a_rejected_token_keeps_the_old_one_working(env: BrokerEnv) -> None:
    token = await env.client_token()
    response = await env.http.post(
        f"{V1}/credentials/worker/rotate", headers=env.admin(), json={"token": UNKNOWN_TOKEN}
    )
    assert response.status_code == 422
    assert response.json()["error"] == "canvas_rejected_token"
    assert UNKNOWN_TOKEN not in response.text
    proxied = await env.http.get(COURSE, headers=bearer(token))
    assert proxied.status_code == 200
    assert env.sim.state.received[-1].header("authorization") == f"Bearer {WORKER_TOKEN}"


async def test_rotate_records_the_user_of_the_new_token(
    env: BrokerEnv, sim_tokens: SimTokens
) -> None:
    sim_tokens.accept(NEW_TOKEN)
    response = await env.http.post(
        f"{V1}/credentials/worker/rotate", headers=env.admin(), json={"token": NEW_TOKEN}
    )
    assert response.status_code == 200, response.text
    assert (response.json()["canvas_user_id"], response.json()["canvas_user_name"]) == (
        "1",
        "Grace Hopper",
    )
    assert response.json()["token_last4"] == NEW_TOKEN[-4:]


async def test_rotate_to_another_canvas_users_token_is_refused(
    env: BrokerEnv, sim_tokens: SimTokens
) -> None:
    sim_tokens.accept(NEW_TOKEN)
    await env.http.patch(
        f"{V1}/credentials/worker", headers=env.admin(), json={"canvas_user_id": "42"}
    )
    response = await env.http.post(
        f"{V1}/credentials/worker/rotate", headers=env.admin(), json={"token": NEW_TOKEN}
    )
    assert response.status_code == 422
    assert "create a new credential" in response.json()["message"]
    fetched = (await env.http.get(f"{V1}/credentials/worker", headers=env.admin())).json()
    assert fetched["token_last4"] == WORKER_TOKEN[-4:]


async def test_rotate_without_verification_stores_an_unknown_token(env: BrokerEnv) -> None:
    response = await env.http.post(
        f"{V1}/credentials/worker/rotate",
        headers=env.admin(),
        json={"token": UNKNOWN_TOKEN, "verify": False},
    )
    assert response.status_code == 200, response.text
    assert response.json()["token_last4"] == UNKNOWN_TOKEN[-4:]
