"""The Access Tokens API (canvas-lms tokens_controller.rb, lib/api/v1/token.rb)."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from broker.sim.credentials import canvas_time
from tests.sim.conftest import AUTH, TOKEN
from tests.sim.oauth_helpers import bearer

if TYPE_CHECKING:
    import httpx

    from broker.sim import SimState
    from tests.sim.conftest import FakeClock

TOKEN_FIELDS = {
    "id",
    "created_at",
    "expires_at",
    "purpose",
    "real_user_id",
    "remember_access",
    "scopes",
    "updated_at",
    "user_id",
    "workflow_state",
    "app_name",
    "visible_token",
    "can_manually_regenerate",
}


async def test_create_returns_the_full_token_once(
    client: httpx.AsyncClient, state: SimState
) -> None:
    created = await client.post(
        "/api/v1/users/self/tokens",
        data={"token[purpose]": "integration", "token[scopes][]": ["url:GET|/api/v1/courses"]},
        headers=AUTH,
    )

    assert created.status_code == 200
    body = created.json()
    assert set(body) == TOKEN_FIELDS
    assert body["user_id"] == 1
    assert body["purpose"] == "integration"
    assert body["expires_at"] is None
    assert body["workflow_state"] == "active"
    assert body["scopes"] == ["url:GET|/api/v1/courses"]
    assert body["can_manually_regenerate"] is True
    full = body["visible_token"]
    assert len(full) == 64

    works = await client.get("/api/v1/users/self", headers=bearer(full))
    assert works.status_code == 200
    shown = await client.get(f"/api/v1/users/self/tokens/{body['id']}", headers=AUTH)
    assert shown.json()["visible_token"] == f"{full[:5]}..."


async def test_show_by_id_and_by_hint(client: httpx.AsyncClient, state: SimState) -> None:
    record = state.add_manual_token(purpose="by hint")

    by_id = await client.get(f"/api/v1/users/1/tokens/{record.id}", headers=AUTH)
    by_hint = await client.get(f"/api/v1/users/self/tokens/{record.value[:5]}", headers=AUTH)

    assert by_id.status_code == 200
    assert by_id.json() == by_hint.json()
    assert by_id.json()["purpose"] == "by hint"


async def test_plain_tokens_appear_as_manual_tokens(client: httpx.AsyncClient) -> None:
    response = await client.get(f"/api/v1/users/self/tokens/{TOKEN[:5]}", headers=AUTH)

    assert response.status_code == 200
    assert response.json()["user_id"] == 1
    assert response.json()["visible_token"] == f"{TOKEN[:5]}..."


async def test_unknown_token_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/users/self/tokens/999", headers=AUTH)

    assert response.status_code == 404
    assert response.json() == {"errors": [{"message": "The specified resource does not exist."}]}


async def test_create_errors(client: httpx.AsyncClient) -> None:
    no_token = await client.post("/api/v1/users/self/tokens", data={"x": "1"}, headers=AUTH)
    no_purpose = await client.post(
        "/api/v1/users/self/tokens", data={"token[expires_at]": ""}, headers=AUTH
    )

    assert no_token.status_code == 400
    assert no_token.json() == {"errors": [{"message": "token is missing"}]}
    assert no_purpose.status_code == 400
    assert no_purpose.json() == [{"message": "token[purpose] is missing"}]


async def test_regenerate_kills_the_old_value(client: httpx.AsyncClient, state: SimState) -> None:
    record = state.add_manual_token(purpose="rotate me")
    old = record.value

    response = await client.put(
        f"/api/v1/users/self/tokens/{record.id}", data={"token[regenerate]": "1"}, headers=AUTH
    )

    assert response.status_code == 200
    new = response.json()["visible_token"]
    assert new != old
    assert len(new) == 64
    assert (await client.get("/api/v1/users/self", headers=bearer(old))).status_code == 401
    assert (await client.get("/api/v1/users/self", headers=bearer(new))).status_code == 200


async def test_regenerating_a_plain_token_removes_it_from_the_set(
    client: httpx.AsyncClient, state: SimState
) -> None:
    response = await client.put(
        f"/api/v1/users/self/tokens/{TOKEN[:5]}",
        json={"token": {"regenerate": True}},
        headers=AUTH,
    )

    assert response.status_code == 200
    assert TOKEN not in state.tokens
    assert (await client.get("/api/v1/users/self", headers=AUTH)).status_code == 401
    new = response.json()["visible_token"]
    assert (await client.get("/api/v1/users/self", headers=bearer(new))).status_code == 200


async def test_update_purpose_and_expiry(client: httpx.AsyncClient, state: SimState) -> None:
    record = state.add_manual_token(purpose="old")

    response = await client.put(
        f"/api/v1/users/self/tokens/{record.id}",
        data={"token[purpose]": "new", "token[expires_at]": "2099-01-02T03:04:05Z"},
        headers=AUTH,
    )

    assert response.json()["purpose"] == "new"
    assert response.json()["expires_at"] == "2099-01-02T03:04:05Z"
    assert response.json()["visible_token"] == f"{record.value[:5]}..."


async def test_delete_revokes(client: httpx.AsyncClient, state: SimState) -> None:
    record = state.add_manual_token(purpose="doomed")

    response = await client.delete(f"/api/v1/users/self/tokens/{record.id}", headers=AUTH)

    assert response.status_code == 200
    assert response.json()["workflow_state"] == "deleted"
    api = await client.get("/api/v1/users/self", headers=bearer(record.value))
    assert api.status_code == 401
    assert api.json() == {"errors": [{"message": "Revoked access token."}]}


async def test_expired_manual_token_is_refused(
    client: httpx.AsyncClient, state: SimState, clock: FakeClock
) -> None:
    record = state.add_manual_token(expires_at=state.utcnow() + timedelta(seconds=60))
    assert (await client.get("/api/v1/users/self", headers=bearer(record.value))).status_code == 200

    clock.advance(61)
    response = await client.get("/api/v1/users/self", headers=bearer(record.value))

    assert response.status_code == 401
    [error] = response.json()["errors"]
    assert error["message"] == "Expired access token."
    assert error["expired_at"] == canvas_time(record.permanent_expires_at)
    assert response.headers["www-authenticate"] == 'Bearer realm="canvas-lms"'
    shown = await client.get(f"/api/v1/users/self/tokens/{record.id}", headers=AUTH)
    assert shown.json()["can_manually_regenerate"] is False


async def test_expired_token_needs_a_new_expiry_to_regenerate(
    client: httpx.AsyncClient, state: SimState, clock: FakeClock
) -> None:
    record = state.add_manual_token(expires_at=state.utcnow() + timedelta(seconds=1))
    clock.advance(2)
    url = f"/api/v1/users/self/tokens/{record.id}"

    refused = await client.put(url, data={"token[regenerate]": "1"}, headers=AUTH)
    accepted = await client.put(
        url, data={"token[regenerate]": "1", "token[expires_at]": ""}, headers=AUTH
    )

    assert refused.status_code == 400
    assert refused.json() == {
        "errors": {"message": "cannot regenerate an expired token without a new expiration date"}
    }
    assert accepted.status_code == 200
    new = accepted.json()["visible_token"]
    assert (await client.get("/api/v1/users/self", headers=bearer(new))).status_code == 200


async def test_another_users_tokens_are_out_of_reach(
    client: httpx.AsyncClient, state: SimState
) -> None:
    theirs = state.add_manual_token(user_id=2, purpose="theirs")

    shown = await client.get(f"/api/v1/users/2/tokens/{theirs.id}", headers=AUTH)
    deleted = await client.delete(f"/api/v1/users/2/tokens/{theirs.id}", headers=AUTH)
    created = await client.post(
        "/api/v1/users/2/tokens", data={"token[purpose]": "x"}, headers=AUTH
    )

    assert shown.status_code == 401
    assert deleted.status_code == 404
    assert created.status_code == 401
    assert theirs.workflow_state == "active"


async def test_a_token_acts_as_its_owner(client: httpx.AsyncClient, state: SimState) -> None:
    record = state.add_manual_token(user_id=2)

    me = await client.get("/api/v1/users/self", headers=bearer(record.value))
    mine = await client.get(f"/api/v1/users/self/tokens/{record.id}", headers=bearer(record.value))

    assert me.json()["id"] == 2
    assert mine.status_code == 200


async def test_removing_a_plain_token_from_the_set_still_works(
    client: httpx.AsyncClient, state: SimState
) -> None:
    await client.get(f"/api/v1/users/self/tokens/{TOKEN[:5]}", headers=AUTH)  # makes its record
    state.tokens.discard(TOKEN)

    assert (await client.get("/api/v1/users/self", headers=AUTH)).status_code == 401
