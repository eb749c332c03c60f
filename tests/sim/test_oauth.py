"""The simulator's OAuth2 provider, following canvas-lms oauth2_provider_controller.rb."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from broker.sim.oauth import pkce_challenge
from tests.sim.oauth_helpers import (
    REDIRECT,
    SCOPES,
    add_key,
    authorize,
    bearer,
    exchange,
    form_request_id,
    redirect_query,
    refresh,
    tokens_for,
)

if TYPE_CHECKING:
    import httpx

    from broker.sim import SimState
    from tests.sim.conftest import FakeClock


async def test_code_flow_end_to_end(client: httpx.AsyncClient, state: SimState) -> None:
    key = add_key(state)
    page = await client.get(
        "/login/oauth2/auth",
        params={
            "client_id": key.client_id,
            "response_type": "code",
            "redirect_uri": REDIRECT,
            "state": "a b&c=d",
        },
    )
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<script" not in page.text
    assert 'id="authorize"' in page.text
    assert 'id="cancel"' in page.text
    assert 'name="user_id" value="1"' in page.text

    accepted = await client.post(
        "/login/oauth2/accept",
        data={"request_id": form_request_id(page.text), "user_id": "1", "authorize": "1"},
    )
    query = redirect_query(accepted)
    assert query["state"] == "a b&c=d"
    assert len(query["code"]) == 128

    response = await exchange(client, key, query["code"])
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "token_type", "user", "refresh_token", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["user"] == {
        "id": 1,
        "name": state.data.users[1].name,
        "global_id": "10000000000001",
        "effective_locale": "en",
    }

    me = await client.get("/api/v1/users/self", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.json()["id"] == 1
    assert [r.raw_path for r in state.received].count("/login/oauth2/token") == 1


async def test_log_in_as_another_seeded_user(client: httpx.AsyncClient, state: SimState) -> None:
    key = add_key(state)
    query = await authorize(client, key, user_id="3")
    body = (await exchange(client, key, query["code"])).json()

    assert body["user"]["id"] == 3
    me = await client.get("/api/v1/users/self", headers=bearer(body["access_token"]))
    assert me.json()["id"] == 3


async def test_cancel_redirects_with_access_denied(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = add_key(state)
    page = await client.get(
        "/login/oauth2/auth",
        params={
            "client_id": key.client_id,
            "response_type": "code",
            "redirect_uri": REDIRECT,
            "state": "s1",
        },
    )
    denied = await client.post(
        "/login/oauth2/accept", data={"request_id": form_request_id(page.text), "cancel": "1"}
    )

    assert redirect_query(denied) == {"error": "access_denied", "state": "s1"}


async def test_accept_without_a_pending_request_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/login/oauth2/accept", data={"request_id": "nope"})

    assert response.status_code == 400
    assert response.text == "Invalid or missing session for oauth"


async def test_unknown_and_inactive_client_is_401_invalid_client(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = add_key(state)
    state.disable_developer_key(key.client_id)
    for client_id in ("99999", "not-a-number", key.client_id):
        response = await client.get(
            "/login/oauth2/auth",
            params={"client_id": client_id, "response_type": "code", "redirect_uri": REDIRECT},
        )
        assert response.status_code == 401
        assert response.json() == {"error": "invalid_client", "error_description": "unknown client"}
        assert response.headers["www-authenticate"] == "Canvas OAuth 2.0"


async def test_wrong_redirect_uri_is_400(client: httpx.AsyncClient, state: SimState) -> None:
    key = add_key(state)
    response = await client.get(
        "/login/oauth2/auth",
        params={
            "client_id": key.client_id,
            "response_type": "code",
            "redirect_uri": "https://evil.example.test/cb",
        },
    )

    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_request",
        "error_description": "redirect_uri does not match client settings",
    }


async def test_unsupported_response_type_redirects(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = add_key(state)
    response = await client.get(
        "/login/oauth2/auth",
        params={
            "client_id": key.client_id,
            "response_type": "token",
            "redirect_uri": REDIRECT,
            "state": "q",
        },
    )

    assert redirect_query(response) == {
        "error": "unsupported_response_type",
        "error_description": "Only response_type=code is permitted",
        "state": "q",
    }


async def test_scopes_outside_the_key_redirect_with_invalid_scope(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = add_key(state, require_scopes=True)
    wanted = f"{SCOPES[0]} url:GET|/api/v1/accounts url:POST|/api/v1/courses"
    response = await client.get(
        "/login/oauth2/auth",
        params={
            "client_id": key.client_id,
            "response_type": "code",
            "redirect_uri": REDIRECT,
            "scope": wanted,
        },
    )

    query = redirect_query(response)
    assert query["error"] == "invalid_scope"
    assert query["error_description"].endswith(
        "requested, but not granted: url:GET|/api/v1/accounts and url:POST|/api/v1/courses"
    )


async def test_enforcing_key_needs_scopes_requested(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = add_key(state, require_scopes=True)
    response = await client.get(
        "/login/oauth2/auth",
        params={"client_id": key.client_id, "response_type": "code", "redirect_uri": REDIRECT},
    )

    assert redirect_query(response)["error"] == "invalid_scope"


async def test_code_is_single_use(client: httpx.AsyncClient, state: SimState) -> None:
    key = add_key(state)
    code = (await authorize(client, key))["code"]
    assert (await exchange(client, key, code)).status_code == 200

    again = await exchange(client, key, code)

    assert again.status_code == 400
    assert again.json() == {
        "error": "invalid_grant",
        "error_description": "authorization_code not found",
    }


async def test_code_expires_after_ten_minutes(
    client: httpx.AsyncClient, state: SimState, clock: FakeClock
) -> None:
    key = add_key(state)
    code = (await authorize(client, key))["code"]
    clock.advance(601)

    response = await exchange(client, key, code)

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


async def test_code_of_another_client_is_incorrect_client(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = add_key(state)
    other = state.add_developer_key(secret="other-secret", redirect_uris=[REDIRECT])
    code = (await authorize(client, key))["code"]

    response = await exchange(client, other, code)

    assert response.status_code == 400
    assert response.json() == {"error": "invalid_grant", "error_description": "incorrect client"}


async def test_bad_secret_is_401_invalid_client(client: httpx.AsyncClient, state: SimState) -> None:
    key = add_key(state)
    code = (await authorize(client, key))["code"]

    response = await exchange(client, key, code, client_secret="wrong")

    assert response.status_code == 401
    assert response.json() == {"error": "invalid_client", "error_description": "invalid client"}
    assert response.headers["www-authenticate"] == "Canvas OAuth 2.0"


async def test_client_credentials_by_http_basic(client: httpx.AsyncClient, state: SimState) -> None:
    key = add_key(state)
    code = (await authorize(client, key))["code"]

    response = await client.post(
        "/login/oauth2/token",
        data={"grant_type": "authorization_code", "code": code},
        auth=(key.client_id, key.secret),
    )

    assert response.status_code == 200


async def test_json_body_is_accepted(client: httpx.AsyncClient, state: SimState) -> None:
    key = add_key(state)
    code = (await authorize(client, key))["code"]

    response = await client.post(
        "/login/oauth2/token",
        json={
            "grant_type": "authorization_code",
            "client_id": key.client_id,
            "client_secret": key.secret,
            "code": code,
        },
    )

    assert response.status_code == 200


async def test_unsupported_and_missing_grant_parameters(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = add_key(state)
    creds = {"client_id": key.client_id, "client_secret": key.secret}

    unsupported = await client.post("/login/oauth2/token", data={**creds, "grant_type": "password"})
    no_code = await client.post(
        "/login/oauth2/token", data={**creds, "grant_type": "authorization_code"}
    )
    no_refresh = await client.post(
        "/login/oauth2/token", data={**creds, "grant_type": "refresh_token"}
    )

    assert unsupported.status_code == 400
    assert unsupported.json()["error"] == "unsupported_grant_type"
    assert no_code.json()["error"] == "invalid_request"
    assert no_code.json()["error_description"].startswith("You must provide the code parameter")
    assert no_refresh.json()["error_description"].startswith("You must provide the refresh_token")


# --- PKCE (lib/canvas/oauth/pkce.rb) ---------------------------------------------------------


async def test_pkce_right_verifier(client: httpx.AsyncClient, state: SimState) -> None:
    key = add_key(state)
    verifier = "v" * 50
    pkce = {"code_challenge": pkce_challenge(verifier), "code_challenge_method": "S256"}
    code = (await authorize(client, key, extra=pkce))["code"]

    response = await exchange(client, key, code, code_verifier=verifier)

    assert response.status_code == 200


async def test_pkce_wrong_or_missing_verifier_is_invalid_grant(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = add_key(state)
    pkce = {"code_challenge": pkce_challenge("right-verifier"), "code_challenge_method": "S256"}
    wrong = (await authorize(client, key, extra=pkce))["code"]
    missing = (await authorize(client, key, extra=pkce))["code"]

    wrong_response = await exchange(client, key, wrong, code_verifier="wrong-verifier")
    missing_response = await exchange(client, key, missing)
    retry = await exchange(client, key, wrong, code_verifier="right-verifier")

    assert wrong_response.status_code == 400
    assert wrong_response.json()["error"] == "invalid_grant"
    assert missing_response.json()["error"] == "invalid_grant"
    # The challenge was consumed by the failed attempt, as Canvas's fetch_code_challenge_for does.
    assert retry.json()["error"] == "invalid_grant"


async def test_pkce_plain_method_is_ignored(client: httpx.AsyncClient, state: SimState) -> None:
    key = add_key(state)
    pkce = {"code_challenge": "abc", "code_challenge_method": "plain"}
    code = (await authorize(client, key, extra=pkce))["code"]

    response = await exchange(client, key, code)

    assert response.status_code == 200


# --- refresh, expiry, logout ------------------------------------------------------------------


async def test_refresh_issues_a_new_access_token_and_counts(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = add_key(state)
    first = await tokens_for(client, key)

    response = await refresh(client, key, str(first["refresh_token"]))

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "token_type", "user", "expires_in"}  # no refresh_token
    assert body["access_token"] != first["access_token"]
    assert key.refresh_count == 1
    assert state.refresh_count == 1
    old = await client.get("/api/v1/users/self", headers=bearer(first["access_token"]))
    new = await client.get("/api/v1/users/self", headers=bearer(body["access_token"]))
    assert old.status_code == 401
    assert new.status_code == 200
    # The refresh token is not rotated: it works again.
    assert (await refresh(client, key, str(first["refresh_token"]))).status_code == 200


async def test_access_token_expires_on_the_clock(
    client: httpx.AsyncClient, state: SimState, clock: FakeClock
) -> None:
    state.oauth_access_token_lifetime = 2
    key = add_key(state)
    first = await tokens_for(client, key)
    assert first["expires_in"] == 2

    clock.advance(3)
    expired = await client.get("/api/v1/users/self", headers=bearer(first["access_token"]))
    assert expired.status_code == 401
    assert expired.json() == {"errors": [{"message": "Invalid access token."}]}
    assert expired.headers["www-authenticate"] == 'Bearer realm="canvas-lms"'

    renewed = await refresh(client, key, str(first["refresh_token"]))
    again = await client.get("/api/v1/users/self", headers=bearer(renewed.json()["access_token"]))
    assert again.status_code == 200
    assert key.refresh_count == 1


async def test_disabled_key_stops_tokens_and_refresh(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = add_key(state)
    first = await tokens_for(client, key)
    state.disable_developer_key(key.client_id)

    api = await client.get("/api/v1/users/self", headers=bearer(first["access_token"]))
    renewed = await refresh(client, key, str(first["refresh_token"]))

    assert api.status_code == 401
    assert api.json() == {"errors": [{"message": "Invalid access token."}]}
    assert renewed.status_code == 401
    assert renewed.json()["error"] == "invalid_client"

    state.enable_developer_key(key.client_id)
    back = await client.get("/api/v1/users/self", headers=bearer(first["access_token"]))
    assert back.status_code == 200


async def test_logout_revokes_access_and_refresh_token(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = add_key(state)
    first = await tokens_for(client, key)

    out = await client.delete("/login/oauth2/token", headers=bearer(first["access_token"]))

    assert out.status_code == 200
    assert out.json() == {}
    api = await client.get("/api/v1/users/self", headers=bearer(first["access_token"]))
    assert api.status_code == 401
    assert api.json() == {"errors": [{"message": "Revoked access token."}]}
    renewed = await refresh(client, key, str(first["refresh_token"]))
    assert renewed.status_code == 400
    assert renewed.json() == {
        "error": "invalid_request",
        "error_description": "refresh_token not found",
    }


async def test_logout_without_a_token_is_400(client: httpx.AsyncClient) -> None:
    response = await client.delete("/login/oauth2/token")

    assert response.status_code == 400
    assert "can't delete OAuth access token" in response.json()["message"]


async def test_oob_redirect_goes_to_the_auth_page(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = state.add_developer_key(secret="x", redirect_uris=[])
    page = await client.get(
        "/login/oauth2/auth",
        params={
            "client_id": key.client_id,
            "response_type": "code",
            "redirect_uri": "urn:ietf:wg:oauth:2.0:oob",
        },
    )
    accepted = await client.post(
        "/login/oauth2/accept", data={"request_id": form_request_id(page.text), "authorize": "1"}
    )

    location = urlsplit(accepted.headers["location"])
    assert location.path == "/login/oauth2/auth"
    assert "code" in parse_qs(location.query)
    assert (await client.get(accepted.headers["location"])).status_code == 200
