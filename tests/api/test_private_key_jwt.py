"""private_key_jwt client authentication (RFC 7523) at the token endpoint, end to end."""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from broker.core.assertions import ASSERTION_TYPE
from tests.support.env import DEFAULT_SCOPES, bearer

if TYPE_CHECKING:
    import httpx

    from tests.support.env import BrokerEnv

TOKEN_URL = "/broker/v1/oauth/token"
AUDIENCE = "http://broker.test/broker/v1/oauth/token"


def _assertion(key: Any, client_id: str, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 120,
        "jti": secrets.token_hex(8),
        **overrides,
    }
    alg = "ES256" if isinstance(key, ECKey) else "RS256"
    header = {"alg": alg, **({"kid": key.kid} if key.kid else {})}
    return jwt.encode(header, claims, key, algorithms=[alg])


async def _jwt_client(env: BrokerEnv, key: Any, name: str = "signed-job") -> dict[str, Any]:
    response = await env.http.post(
        "/broker/v1/clients",
        headers=env.admin(),
        json={
            "name": name,
            "credential": "worker",
            "scopes": list(DEFAULT_SCOPES),
            "auth_method": "private_key_jwt",
            "jwks": {"keys": [key.as_dict(private=False)]},
        },
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _mint(env: BrokerEnv, assertion: str, **form: str) -> httpx.Response:
    return await env.http.post(
        TOKEN_URL,
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
            **form,
        },
    )


@pytest.fixture
def key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "job-key-1"})


async def test_client_with_a_key_set_gets_no_secret(env: BrokerEnv, key: ECKey) -> None:
    client = await _jwt_client(env, key)
    assert client["client_secret"] is None
    assert client["auth_method"] == "private_key_jwt"
    assert client["jwks"] == {"keys": [key.as_dict(private=False)]}


@pytest.mark.parametrize(
    "make_key", [lambda: ECKey.generate_key("P-256"), lambda: RSAKey.generate_key(2048)]
)
async def test_signed_assertion_mints_a_token_that_calls_the_proxy(
    env: BrokerEnv, make_key: Any
) -> None:
    signing_key = make_key()
    client = await _jwt_client(env, signing_key)
    minted = await _mint(env, _assertion(signing_key, client["client_id"]))
    assert minted.status_code == 200, minted.text
    assert minted.headers["cache-control"] == "no-store"
    token = minted.json()["access_token"]
    response = await env.http.get("/api/v1/courses/1201", headers=bearer(token))
    assert response.status_code == 200
    [event] = await env.audit(kind="token", decision="allow")
    assert event["client_id"] == client["client_id"]


async def test_replayed_assertion_is_refused_and_audited(env: BrokerEnv, key: ECKey) -> None:
    client = await _jwt_client(env, key)
    assertion = _assertion(key, client["client_id"])
    assert (await _mint(env, assertion)).status_code == 200

    replay = await _mint(env, assertion)

    assert replay.status_code == 401
    assert replay.json()["error"] == "invalid_client"
    [event] = await env.audit(kind="token", decision="deny")
    assert (event["reason"], event["client_id"]) == ("assertion_replayed", client["client_id"])


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"aud": "https://elsewhere.example/token"}, "invalid_assertion"),
        ({"exp": int(time.time()) - 3600}, "invalid_assertion"),
        ({"exp": int(time.time()) + 86400}, "invalid_assertion"),
        ({"sub": "cli_someoneelse"}, "invalid_assertion"),
        ({"jti": None}, "invalid_assertion"),
    ],
)
async def test_assertion_with_bad_claims_is_refused(
    env: BrokerEnv, key: ECKey, overrides: dict[str, Any], reason: str
) -> None:
    client = await _jwt_client(env, key)
    claims = {k: v for k, v in overrides.items() if v is not None}
    assertion = _assertion(key, client["client_id"], **claims)
    if overrides.get("jti", "") is None:
        now = int(time.time())
        assertion = jwt.encode(
            {"alg": "ES256"},
            {
                "iss": client["client_id"],
                "sub": client["client_id"],
                "aud": AUDIENCE,
                "exp": now + 60,
            },
            key,
        )
    response = await _mint(env, assertion)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    [event] = await env.audit(kind="token", decision="deny")
    assert event["reason"] == reason


async def test_assertion_signed_by_another_key_is_refused(env: BrokerEnv, key: ECKey) -> None:
    client = await _jwt_client(env, key)
    impostor = ECKey.generate_key("P-256")
    response = await _mint(env, _assertion(impostor, client["client_id"]))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_secret_authentication_is_refused_for_a_key_client(
    env: BrokerEnv, key: ECKey
) -> None:
    client = await _jwt_client(env, key)
    _, some_secret = await env.client("secret-job")
    response = await env.http.post(
        TOKEN_URL,
        data={"grant_type": "client_credentials"},
        auth=(client["client_id"], some_secret),
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_assertion_for_a_secret_client_is_refused(env: BrokerEnv, key: ECKey) -> None:
    client_id, _secret = await env.client("secret-job")
    response = await _mint(env, _assertion(key, client_id))
    assert response.status_code == 401


async def test_assertion_and_basic_authentication_together_is_invalid_request(
    env: BrokerEnv, key: ECKey
) -> None:
    client = await _jwt_client(env, key)
    response = await env.http.post(
        TOKEN_URL,
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": _assertion(key, client["client_id"]),
        },
        auth=(client["client_id"], "x"),
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_unknown_assertion_type_is_invalid_client(env: BrokerEnv, key: ECKey) -> None:
    client = await _jwt_client(env, key)
    response = await env.http.post(
        TOKEN_URL,
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:example:saml",
            "client_assertion": _assertion(key, client["client_id"]),
        },
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_replacing_the_key_set_rotates_keys_at_once(env: BrokerEnv, key: ECKey) -> None:
    client = await _jwt_client(env, key)
    new_key = ECKey.generate_key("P-256", parameters={"kid": "job-key-2"})
    replaced = await env.http.patch(
        f"/broker/v1/clients/{client['client_id']}",
        headers=env.admin(),
        json={"jwks": {"keys": [new_key.as_dict(private=False)]}},
    )
    assert replaced.status_code == 200, replaced.text
    assert (await _mint(env, _assertion(key, client["client_id"]))).status_code == 401
    assert (await _mint(env, _assertion(new_key, client["client_id"]))).status_code == 200
    [change] = [e for e in await env.audit(kind="admin") if e["action"] == "client.update"]
    assert change["details"]["changes"]["key_ids"]["new"] == ["job-key-2"]
    assert "job-key-2" not in change["details"]["changes"]["key_ids"]["old"]
    assert '"kty"' not in json.dumps(change["details"])  # no key material, only ids


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"auth_method": "private_key_jwt"}, "jwks"),
        ({"auth_method": "private_key_jwt", "jwks": {"keys": []}}, "jwks"),
        ({"auth_method": "client_secret", "jwks": {"keys": [{"kty": "EC"}]}}, "jwks"),
    ],
)
async def test_bad_key_configuration_is_refused_naming_the_field(
    env: BrokerEnv, body: dict[str, Any], field: str
) -> None:
    response = await env.http.post(
        "/broker/v1/clients",
        headers=env.admin(),
        json={"name": "bad", "credential": "worker", "scopes": list(DEFAULT_SCOPES), **body},
    )
    assert response.status_code == 422
    assert response.json()["message"].startswith(field)


async def test_private_key_in_the_key_set_is_refused_and_not_echoed(env: BrokerEnv) -> None:
    private = ECKey.generate_key("P-256").as_dict(private=True)
    response = await env.http.post(
        "/broker/v1/clients",
        headers=env.admin(),
        json={
            "name": "leaky",
            "credential": "worker",
            "scopes": list(DEFAULT_SCOPES),
            "auth_method": "private_key_jwt",
            "jwks": {"keys": [private]},
        },
    )
    assert response.status_code == 422
    assert "private key material" in response.json()["message"]
    assert str(private["d"]) not in response.text


async def test_rotating_the_secret_of_a_key_client_is_a_conflict(
    env: BrokerEnv, key: ECKey
) -> None:
    client = await _jwt_client(env, key)
    response = await env.http.post(
        f"/broker/v1/clients/{client['client_id']}/rotate-secret", headers=env.admin(), json={}
    )
    assert response.status_code == 409
