"""The token endpoint (RFC 6749 §4.4), revocation (RFC 7009) and introspection (RFC 7662)."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

from broker.core.tokens import SecretKind, generate_secret
from tests.support.env import DEFAULT_SCOPES, bearer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import httpx

    from tests.api.conftest import ResponseLog
    from tests.support.env import BrokerEnv

    Refused = Callable[[BrokerEnv, str, str], Awaitable[httpx.Response]]

BROKER_ORIGIN = "http://broker.test/"
TOKEN_URL = "/broker/v1/oauth/token"
REVOKE_URL = "/broker/v1/oauth/revoke"
INTROSPECT_URL = "/broker/v1/oauth/introspect"
GRANT = {"grant_type": "client_credentials"}
PROXY_TOKEN = re.compile(r"cbt_[0-9A-Za-z]{36}")
COURSE = "/api/v1/courses/1201"
ASSIGNMENTS = "/api/v1/courses/1201/assignments"
COURSE_SCOPE = "url:GET|/api/v1/courses/:id"


async def mint(env: BrokerEnv, client_id: str, secret: str, **form: str) -> httpx.Response:
    """POST the token endpoint with client_secret_basic."""
    return await env.http.post(TOKEN_URL, data={**GRANT, **form}, auth=(client_id, secret))


async def token_events(env: BrokerEnv) -> list[dict[str, Any]]:
    """Every ``kind=token`` audit event, newest first."""
    return await env.audit(kind="token", limit=1000)


# Successful minting ------------------------------------------------------------------------


async def test_client_secret_basic_mints_a_bearer_token(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await mint(env, client_id, secret)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert PROXY_TOKEN.fullmatch(body["access_token"])
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert body["scope"].split(" ") == list(DEFAULT_SCOPES)


async def test_client_secret_post_mints_a_bearer_token(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await env.http.post(
        TOKEN_URL, data={**GRANT, "client_id": client_id, "client_secret": secret}
    )
    assert response.status_code == 200
    assert PROXY_TOKEN.fullmatch(response.json()["access_token"])
    assert response.json()["token_type"] == "Bearer"


async def test_token_response_is_not_cacheable(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await mint(env, client_id, secret)
    assert response.headers["cache-control"] == "no-store"


async def test_minted_token_is_accepted_by_the_proxy(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = (await mint(env, client_id, secret)).json()["access_token"]
    response = await env.http.get(COURSE, headers=bearer(token))
    assert response.status_code == 200
    assert response.json()["id"] == 1201


async def test_each_mint_returns_a_different_token(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    first = await env.token(client_id, secret)
    second = await env.token(client_id, secret)
    assert first != second


async def test_client_token_ttl_is_the_default_expires_in(env: BrokerEnv) -> None:
    client_id, secret = await env.client(token_ttl=300)
    assert (await mint(env, client_id, secret)).json()["expires_in"] == 300


# Client authentication and request errors --------------------------------------------------


async def test_wrong_secret_is_invalid_client(env: BrokerEnv) -> None:
    client_id, _secret = await env.client()
    response = await mint(env, client_id, generate_secret(SecretKind.CLIENT_SECRET))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_another_clients_secret_is_invalid_client(env: BrokerEnv) -> None:
    client_id, _secret = await env.client("one")
    _other_id, other_secret = await env.client("two")
    response = await mint(env, client_id, other_secret)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_unknown_client_is_invalid_client(env: BrokerEnv) -> None:
    response = await mint(env, "cli_doesnotexist0000", generate_secret(SecretKind.CLIENT_SECRET))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_missing_client_authentication_is_invalid_client(env: BrokerEnv) -> None:
    response = await env.http.post(TOKEN_URL, data=GRANT)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_invalid_client_after_basic_authentication_challenges_basic(
    env: BrokerEnv,
) -> None:
    client_id, _secret = await env.client()
    response = await mint(env, client_id, generate_secret(SecretKind.CLIENT_SECRET))
    assert response.headers["www-authenticate"].lower().startswith("basic")


@pytest.mark.parametrize(
    "client_id", ["cli_a\x00b", "c" * 5000, "cli_\u00e9t\u00e9", "' OR 1=1 --"]
)
async def test_malformed_client_id_is_invalid_client(env: BrokerEnv, client_id: str) -> None:
    _client_id, secret = await env.client()
    response = await env.http.post(
        TOKEN_URL, data={**GRANT, "client_id": client_id, "client_secret": secret}
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_basic_and_post_authentication_together_is_invalid_request(
    env: BrokerEnv,
) -> None:
    client_id, secret = await env.client()
    response = await env.http.post(
        TOKEN_URL,
        data={**GRANT, "client_id": client_id, "client_secret": secret},
        auth=(client_id, secret),
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_missing_grant_type_is_invalid_request(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await env.http.post(
        TOKEN_URL, data={"scope": COURSE_SCOPE}, auth=(client_id, secret)
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_password_grant_is_unsupported_grant_type(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await env.http.post(
        TOKEN_URL,
        data={"grant_type": "password", "username": "u", "password": "p"},
        auth=(client_id, secret),
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"


async def test_json_body_is_invalid_request(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await env.http.post(TOKEN_URL, json=GRANT, auth=(client_id, secret))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_repeated_parameter_is_invalid_request(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await env.http.post(
        TOKEN_URL,
        content=f"grant_type=client_credentials&scope={COURSE_SCOPE}&scope={COURSE_SCOPE}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        auth=(client_id, secret),
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_error_responses_are_not_cacheable(env: BrokerEnv) -> None:
    client_id, _secret = await env.client()
    response = await mint(env, client_id, generate_secret(SecretKind.CLIENT_SECRET))
    assert response.headers["cache-control"] == "no-store"
    assert set(response.json()) == {"error", "error_description"}


# Scopes and lifetime -----------------------------------------------------------------------


async def test_scope_subset_is_granted_and_echoed(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await mint(env, client_id, secret, scope=COURSE_SCOPE)
    assert response.status_code == 200
    assert response.json()["scope"] == COURSE_SCOPE


async def test_down_scoped_token_can_call_its_subset(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret, scope=COURSE_SCOPE)
    response = await env.http.get(COURSE, headers=bearer(token))
    assert response.status_code == 200


async def test_down_scoped_token_cannot_call_the_rest_of_the_grant(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret, scope=COURSE_SCOPE)
    response = await env.http.get(ASSIGNMENTS, headers=bearer(token))
    assert response.status_code == 403
    assert response.json()["error"] == "scope_not_granted"
    assert env.received == []


async def test_scope_not_in_grant_is_invalid_scope(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await mint(env, client_id, secret, scope=f"{COURSE_SCOPE} url:GET|/api/v1/accounts")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"


async def test_blank_scope_is_the_whole_grant(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await mint(env, client_id, secret, scope="  ")
    assert response.status_code == 200
    assert response.json()["scope"].split(" ") == list(DEFAULT_SCOPES)


async def test_expires_in_below_the_maximum_is_honoured(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await mint(env, client_id, secret, expires_in="120")
    assert response.json()["expires_in"] == 120


async def test_expires_in_above_the_client_maximum_is_capped(env: BrokerEnv) -> None:
    client_id, secret = await env.client(max_token_ttl=1200)
    response = await mint(env, client_id, secret, expires_in="5000")
    assert response.status_code == 200
    assert response.json()["expires_in"] == 1200
    [token] = (await env.http.get("/broker/v1/tokens", headers=env.admin())).json()
    lifetime = datetime.fromisoformat(token["expires_at"]) - datetime.fromisoformat(
        token["created_at"]
    )
    assert lifetime.total_seconds() == 1200


@pytest.mark.parametrize(
    "value", ["soon", "-5", "0", "000", "1.5", "1e3", " 60", "\u00b2", "\u0661"]
)
async def test_malformed_expires_in_is_invalid_request(env: BrokerEnv, value: str) -> None:
    client_id, secret = await env.client()
    response = await mint(env, client_id, secret, expires_in=value)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_expires_in_with_thousands_of_digits_is_capped(env: BrokerEnv) -> None:
    client_id, secret = await env.client(max_token_ttl=1200)
    response = await mint(env, client_id, secret, expires_in="9" * 5000)
    assert response.status_code == 200
    assert response.json()["expires_in"] == 1200


# Disabled clients and credentials ----------------------------------------------------------


async def test_disabled_client_is_invalid_client(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    disabled = await env.http.post(f"/broker/v1/clients/{client_id}/disable", headers=env.admin())
    assert disabled.status_code == 200
    response = await mint(env, client_id, secret)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_disabled_credential_refuses_minting(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    disabled = await env.http.post("/broker/v1/credentials/worker/disable", headers=env.admin())
    assert disabled.status_code == 200
    response = await mint(env, client_id, secret)
    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"
    assert "access_token" not in response.json()


@pytest.mark.parametrize(
    ("disable", "reason"),
    [
        ("/broker/v1/credentials/worker/disable", "credential_disabled"),
        ("/broker/v1/upstreams/sim/disable", "upstream_disabled"),
    ],
)
async def test_a_disabled_credential_or_upstream_refuses_minting_alike_and_audits_it(
    env: BrokerEnv, disable: str, reason: str
) -> None:
    client_id, secret = await env.client()
    assert (await env.http.post(disable, headers=env.admin())).status_code == 200
    response = await mint(env, client_id, secret)
    assert response.status_code == 400
    assert set(response.json()) == {"error", "error_description"}
    assert response.json()["error"] == "unauthorized_client"
    assert "disabled" in response.json()["error_description"]
    [event, *_] = await token_events(env)
    assert (event["decision"], event["reason"], event["client_id"]) == ("deny", reason, client_id)
    listed = await env.http.get("/broker/v1/tokens", headers=env.admin())
    assert listed.json() == []


async def test_minting_works_again_once_the_upstream_is_enabled(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    await env.http.post("/broker/v1/upstreams/sim/disable", headers=env.admin())
    assert (await mint(env, client_id, secret)).status_code == 400
    await env.http.post("/broker/v1/upstreams/sim/enable", headers=env.admin())
    assert (await mint(env, client_id, secret)).status_code == 200


# Revocation (RFC 7009) ---------------------------------------------------------------------


async def test_client_revokes_its_own_token(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    response = await env.http.post(REVOKE_URL, data={"token": token}, auth=(client_id, secret))
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    proxied = await env.http.get(COURSE, headers=bearer(token))
    assert proxied.status_code == 401
    assert proxied.json()["error"] == "token_revoked"


async def test_client_revokes_with_client_secret_post(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    response = await env.http.post(
        REVOKE_URL, data={"token": token, "client_id": client_id, "client_secret": secret}
    )
    assert response.status_code == 200
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 401


async def test_revoking_another_clients_token_has_no_effect(env: BrokerEnv) -> None:
    owner_id, owner_secret = await env.client("owner")
    other_id, other_secret = await env.client("other")
    token = await env.token(owner_id, owner_secret)
    response = await env.http.post(REVOKE_URL, data={"token": token}, auth=(other_id, other_secret))
    assert response.status_code == 200
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200
    [latest, *_] = await token_events(env)
    assert (latest["action"], latest["decision"], latest["reason"]) == (
        "token.revoke",
        "deny",
        "unknown_token",
    )
    assert (latest["client_id"], latest["status"]) == (other_id, 200)


async def test_revoking_an_unknown_token_answers_200(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    unknown = generate_secret(SecretKind.PROXY_TOKEN)
    response = await env.http.post(REVOKE_URL, data={"token": unknown}, auth=(client_id, secret))
    assert response.status_code == 200
    [latest, *_] = await token_events(env)
    assert (latest["action"], latest["decision"], latest["reason"]) == (
        "token.revoke",
        "deny",
        "unknown_token",
    )


@pytest.mark.parametrize(
    ("value", "reason"), [("not-a-token", "malformed_token"), (None, "token_revoked")]
)
async def test_revocations_that_revoke_nothing_are_audited_with_the_reason(
    env: BrokerEnv, value: str | None, reason: str
) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    if value is None:
        await env.http.post(REVOKE_URL, data={"token": token}, auth=(client_id, secret))
    response = await env.http.post(
        REVOKE_URL, data={"token": value or token}, auth=(client_id, secret)
    )
    assert response.status_code == 200
    [latest, *_] = await token_events(env)
    assert (latest["action"], latest["decision"], latest["reason"]) == (
        "token.revoke",
        "deny",
        reason,
    )
    assert "not-a-token" not in str(latest)


async def test_revoke_with_wrong_secret_is_invalid_client(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    response = await env.http.post(
        REVOKE_URL,
        data={"token": token},
        auth=(client_id, generate_secret(SecretKind.CLIENT_SECRET)),
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200


async def test_revocation_is_audited_as_token_revoke(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    await env.http.post(REVOKE_URL, data={"token": token}, auth=(client_id, secret))
    [latest, *_] = await token_events(env)
    assert latest["action"] == "token.revoke"
    assert latest["decision"] == "allow"
    assert latest["client_id"] == client_id
    assert latest["token_id"] is not None


async def test_refused_revocation_is_audited_as_token_revoke(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    await env.http.post(
        REVOKE_URL,
        data={"token": token},
        auth=(client_id, generate_secret(SecretKind.CLIENT_SECRET)),
    )
    [latest, *_] = await token_events(env)
    assert latest["action"] == "token.revoke"
    assert latest["decision"] == "deny"
    assert latest["reason"] == "invalid_client"


# Introspection (RFC 7662) ------------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "auditor"])
async def test_introspection_describes_a_live_token(env: BrokerEnv, role: str) -> None:
    client_id, secret = await env.client()
    before = int(datetime.now(UTC).timestamp())
    token = await env.token(client_id, secret, scope=COURSE_SCOPE)
    headers = env.admin() if role == "admin" else env.auditor()
    response = await env.http.post(INTROSPECT_URL, data={"token": token}, headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert body["active"] is True
    assert body["client_id"] == client_id
    assert body["scope"] == COURSE_SCOPE
    assert before + 900 <= body["exp"] <= int(datetime.now(UTC).timestamp()) + 900


async def test_introspection_of_a_revoked_token_is_inactive(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    await env.http.post(REVOKE_URL, data={"token": token}, auth=(client_id, secret))
    response = await env.http.post(INTROSPECT_URL, data={"token": token}, headers=env.admin())
    assert response.status_code == 200
    assert response.json() == {"active": False}


async def test_introspection_of_an_unknown_token_is_inactive(env: BrokerEnv) -> None:
    unknown = generate_secret(SecretKind.PROXY_TOKEN)
    response = await env.http.post(INTROSPECT_URL, data={"token": unknown}, headers=env.admin())
    assert response.json() == {"active": False}


async def test_introspection_without_an_admin_key_is_401(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    response = await env.http.post(INTROSPECT_URL, data={"token": token})
    assert response.status_code == 401
    assert "active" not in response.json()


async def test_introspection_with_client_credentials_is_401(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    response = await env.http.post(INTROSPECT_URL, data={"token": token}, auth=(client_id, secret))
    assert response.status_code == 401


# Audit -------------------------------------------------------------------------------------


async def test_successful_mint_is_audited(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    await env.token(client_id, secret, scope=COURSE_SCOPE)
    [event] = await token_events(env)
    assert event["action"] == "token.mint"
    assert event["decision"] == "allow"
    assert event["client_id"] == client_id
    assert event["token_id"] is not None
    assert event["status"] == 200
    assert event["details"]["scopes"] == [COURSE_SCOPE]


async def test_mint_event_names_the_listed_token(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    await env.token(client_id, secret)
    [event] = await token_events(env)
    [token] = (await env.http.get("/broker/v1/tokens", headers=env.admin())).json()
    assert event["token_id"] == token["id"]


async def _wrong_secret(env: BrokerEnv, client_id: str, _secret: str) -> httpx.Response:
    return await mint(env, client_id, generate_secret(SecretKind.CLIENT_SECRET))


async def _unknown_client(env: BrokerEnv, _client_id: str, secret: str) -> httpx.Response:
    return await mint(env, "cli_unknown", secret)


async def _two_methods(env: BrokerEnv, client_id: str, secret: str) -> httpx.Response:
    form = {**GRANT, "client_id": client_id, "client_secret": secret}
    return await env.http.post(TOKEN_URL, data=form, auth=(client_id, secret))


async def _no_grant_type(env: BrokerEnv, client_id: str, secret: str) -> httpx.Response:
    return await env.http.post(TOKEN_URL, data={"scope": COURSE_SCOPE}, auth=(client_id, secret))


async def _password_grant(env: BrokerEnv, client_id: str, secret: str) -> httpx.Response:
    return await env.http.post(TOKEN_URL, data={"grant_type": "password"}, auth=(client_id, secret))


async def _foreign_scope(env: BrokerEnv, client_id: str, secret: str) -> httpx.Response:
    return await mint(env, client_id, secret, scope="url:GET|/api/v1/accounts")


async def _bad_expires_in(env: BrokerEnv, client_id: str, secret: str) -> httpx.Response:
    return await mint(env, client_id, secret, expires_in="soon")


async def _json_body(env: BrokerEnv, client_id: str, secret: str) -> httpx.Response:
    return await env.http.post(TOKEN_URL, json=GRANT, auth=(client_id, secret))


async def _disabled_client(env: BrokerEnv, client_id: str, secret: str) -> httpx.Response:
    await env.http.post(f"/broker/v1/clients/{client_id}/disable", headers=env.admin())
    return await mint(env, client_id, secret)


async def _disabled_credential(env: BrokerEnv, client_id: str, secret: str) -> httpx.Response:
    await env.http.post("/broker/v1/credentials/worker/disable", headers=env.admin())
    return await mint(env, client_id, secret)


REFUSED_MINTS: dict[str, tuple[Refused, bool]] = {
    # name: (request, whether the event can name the client)
    "wrong_secret": (_wrong_secret, True),
    "unknown_client": (_unknown_client, False),
    "two_methods": (_two_methods, False),
    "no_grant_type": (_no_grant_type, True),
    "password_grant": (_password_grant, True),
    "foreign_scope": (_foreign_scope, True),
    "bad_expires_in": (_bad_expires_in, True),
    "json_body": (_json_body, False),
    "disabled_client": (_disabled_client, True),
    "disabled_credential": (_disabled_credential, True),
}


@pytest.mark.parametrize("case", list(REFUSED_MINTS))
async def test_every_refused_mint_is_audited(env: BrokerEnv, case: str) -> None:
    request, names_client = REFUSED_MINTS[case]
    client_id, secret = await env.client()
    response = await request(env, client_id, secret)
    assert response.status_code in {400, 401}
    [event] = await token_events(env)
    assert event["action"] == "token.mint"
    assert event["decision"] == "deny"
    assert event["reason"]
    assert event["status"] == response.status_code
    assert event["token_id"] is None
    assert event["request_id"] == response.headers["x-request-id"]
    if names_client:
        assert event["client_id"] == client_id


async def test_no_secret_is_audited_logged_or_returned_after_creation(
    env: BrokerEnv, responses: ResponseLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client_id, secret = await env.client()
    after_secret = responses.mark()
    minted = await mint(env, client_id, secret)
    token = minted.json()["access_token"]
    after_token = responses.mark()
    await env.http.post(TOKEN_URL, data={**GRANT, "client_id": client_id, "client_secret": secret})
    await mint(env, client_id, secret, scope="url:GET|/api/v1/accounts")
    await mint(env, client_id, secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    await env.http.post(TOKEN_URL, json={**GRANT, "client_secret": secret})
    await env.http.get(COURSE, headers=bearer(token))
    await env.http.get(ASSIGNMENTS + "?access_token=" + token, headers=bearer(token))
    await env.http.post(INTROSPECT_URL, data={"token": token}, headers=env.admin())
    await env.http.post(REVOKE_URL, data={"token": token}, auth=(client_id, secret))
    await env.http.get(COURSE, headers=bearer(token))
    await env.http.get(f"/broker/v1/clients/{client_id}", headers=env.admin())
    await env.http.get("/broker/v1/tokens?include_inactive=true", headers=env.admin())
    events = json.dumps(await env.audit(limit=1000))
    # The test's own httpx client logs the URLs it requests; that is the script, not the broker.
    broker_records = [
        r for r in caplog.records if not (r.name == "httpx" and BROKER_ORIGIN in r.getMessage())
    ]
    logs = "".join(f"{r.getMessage()}{r.args!r}{r.exc_text}" for r in broker_records)
    for value in (secret, token):
        assert value not in events
        assert value not in logs
    assert responses.leaks(secret, since=after_secret) == []
    assert responses.leaks(token, since=after_token) == []
