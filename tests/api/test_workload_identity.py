"""Keyless jobs: a platform's identity token exchanged for a proxy token (issue 16).

The platform is an OpenID Connect issuer these tests run on loopback (tests/support/
oidc_issuer.py): the broker reads its discovery document and keys over real HTTP. Every
refusal is checked at the token endpoint, in the audit log, and at the simulator, which must
have received nothing.
"""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from broker.core.workload import JWT_BEARER, TOKEN_EXCHANGE, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_JWT
from tests.support.env import bearer
from tests.support.oidc_issuer import OIDCIssuer, github_claims, new_key
from tests.support.serve import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx

    from broker.config import Settings
    from tests.support.env import BrokerEnv

TOKEN_URL = "/broker/v1/oauth/token"
V1 = "/broker/v1"
AUDIENCE = "https://canvas-broker.example.edu"
REPO = "example-org/canvas-sync"
COURSE = "/api/v1/courses/1201"
COURSE_SCOPE = "url:GET|/api/v1/courses/:id"


@pytest.fixture(scope="module")
def issuer_server() -> Iterator[OIDCIssuer]:
    with OIDCIssuer() as server:
        yield server


@pytest.fixture(scope="module")
def other_server() -> Iterator[OIDCIssuer]:
    with OIDCIssuer() as server:
        yield server


@pytest.fixture
def issuer(issuer_server: OIDCIssuer) -> OIDCIssuer:
    issuer_server.reset()
    return issuer_server


@pytest.fixture
def other_issuer(other_server: OIDCIssuer) -> OIDCIssuer:
    other_server.reset()
    return other_server


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The tests' issuers are plain http on loopback, which a setting must allow."""
    return settings.model_copy(update={"workload_allow_loopback_http": True})


def policy(issuer_url: str, **claims: Any) -> dict[str, Any]:
    return {
        "issuer": issuer_url,
        "audience": AUDIENCE,
        "claims": claims or {"sub": f"repo:{REPO}:ref:refs/heads/main"},
    }


async def trust(env: BrokerEnv, issuer_url: str, *, verify: bool = True) -> dict[str, Any]:
    response = await env.http.post(
        f"{V1}/trusted-issuers",
        headers=env.admin(),
        json={"issuer": issuer_url, "description": "CI", "verify": verify},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def save_client(
    env: BrokerEnv, policies: list[dict[str, Any]], name: str = "keyless", **options: Any
) -> httpx.Response:
    return await env.http.post(
        f"{V1}/clients",
        headers=env.admin(),
        json={
            "name": name,
            "credential": "worker",
            "scopes": [COURSE_SCOPE, "url:GET|/api/v1/courses/:course_id/assignments"],
            "constraints": {"id": ["1201"], "course_id": ["1201"]},
            "auth_method": "workload_identity",
            "trust_policies": policies,
            **options,
        },
    )


async def keyless_client(
    env: BrokerEnv, policies: list[dict[str, Any]], name: str = "keyless", **options: Any
) -> str:
    response = await save_client(env, policies, name, **options)
    assert response.status_code == 201, response.text
    client_id: str = response.json()["client_id"]
    return client_id


async def exchange(env: BrokerEnv, client_id: str, token: str, **form: str) -> httpx.Response:
    return await env.http.post(
        TOKEN_URL,
        data={
            "grant_type": TOKEN_EXCHANGE,
            "client_id": client_id,
            "subject_token": token,
            "subject_token_type": TOKEN_TYPE_ID_TOKEN,
            **form,
        },
    )


async def ready(env: BrokerEnv, issuer: OIDCIssuer, **claims: Any) -> str:
    """Trust the issuer and create a client with one policy for it."""
    await trust(env, issuer.url)
    return await keyless_client(env, [policy(issuer.url, **claims)])


def github_token(issuer: OIDCIssuer, **claims: Any) -> str:
    return issuer.sign({"aud": AUDIENCE, **github_claims(**claims)})


async def exchange_events(env: BrokerEnv) -> list[dict[str, Any]]:
    return await env.audit(action="token.exchange")


async def assert_refused(
    env: BrokerEnv, response: httpx.Response, reason: str, *, status: int = 400
) -> dict[str, Any]:
    """Refused at the endpoint, audited with ``reason``, and nothing reached Canvas."""
    assert response.status_code == status, response.text
    assert response.json()["error"] in {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "temporarily_unavailable",
    }
    [event, *_] = await exchange_events(env)
    assert (event["decision"], event["reason"], event["status"]) == ("deny", reason, status)
    assert env.received == []
    return event


# The exchange ---------------------------------------------------------------------------------


async def test_keyless_client_has_no_secret_and_shows_its_trust_policies(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    await trust(env, issuer.url)
    rule = {"sub": f"repo:{REPO}:ref:refs/heads/main", "environment": {"pattern": "prod|staging"}}
    created = await save_client(env, [policy(issuer.url, **rule)])
    assert created.status_code == 201, created.text
    assert created.json()["client_secret"] is None
    shown = await env.http.get(f"{V1}/clients/keyless", headers=env.auditor())
    assert shown.json()["auth_method"] == "workload_identity"
    assert shown.json()["trust_policies"] == [
        {"issuer": issuer.url, "audience": AUDIENCE, "claims": rule}
    ]
    rotated = await env.http.post(
        f"{V1}/clients/keyless/rotate-secret", headers=env.admin(), json={}
    )
    assert rotated.status_code == 409


async def test_exchanged_token_calls_canvas_within_the_grant(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    client_id = await ready(env, issuer)
    platform_token = github_token(issuer)
    response = await exchange(env, client_id, platform_token)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert response.headers["cache-control"] == "no-store"
    called = await env.http.get(COURSE, headers=bearer(body["access_token"]))
    assert called.status_code == 200, called.text
    assert env.received == [COURSE]
    refused = await env.http.get("/api/v1/courses/1202", headers=bearer(body["access_token"]))
    assert refused.status_code == 403
    [event] = await exchange_events(env)
    assert event["decision"] == "allow"
    assert event["client_id"] == client_id
    assert event["details"]["issuer"] == issuer.url
    assert event["details"]["claims"] == {"sub": f"repo:{REPO}:ref:refs/heads/main"}
    assert event["details"]["subject"] == f"repo:{REPO}:ref:refs/heads/main"
    everything = json.dumps(await env.audit(limit=1000))
    assert platform_token not in everything
    assert platform_token.split(".")[2] not in everything


async def test_jwt_bearer_grant_and_jwt_token_type_are_accepted(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    client_id = await ready(env, issuer)
    bearer_grant = await env.http.post(
        TOKEN_URL,
        data={"grant_type": JWT_BEARER, "client_id": client_id, "assertion": github_token(issuer)},
    )
    assert bearer_grant.status_code == 200, bearer_grant.text
    assert "issued_token_type" not in bearer_grant.json()
    typed = await exchange(env, client_id, github_token(issuer), subject_token_type=TOKEN_TYPE_JWT)
    assert typed.status_code == 200, typed.text


async def test_proxy_token_lives_no_longer_than_the_platform_token(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    client_id = await ready(env, issuer)
    short = issuer.sign({"aud": AUDIENCE, **github_claims()}, lifetime=90)
    response = await exchange(env, client_id, short, expires_in="3600")
    assert response.status_code == 200, response.text
    assert 80 <= response.json()["expires_in"] <= 90


async def test_exchange_is_down_scoped_as_requested(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)
    response = await exchange(env, client_id, github_token(issuer), scope=COURSE_SCOPE)
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == COURSE_SCOPE
    wider = await exchange(env, client_id, github_token(issuer), scope="url:GET|/api/v1/users/:id")
    assert wider.status_code == 400
    assert wider.json()["error"] == "invalid_scope"


# Refusals -------------------------------------------------------------------------------------


async def test_wrong_audience_is_refused(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)
    token = issuer.sign({"aud": "https://github.com/example-org", **github_claims()})
    response = await exchange(env, client_id, token)
    event = await assert_refused(env, response, "audience_mismatch")
    assert AUDIENCE in response.json()["error_description"]
    assert event["details"]["failed"] == [{"policy": 0, "rule": "aud"}]


async def test_expired_token_is_refused(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)
    now = int(time.time())
    token = issuer.sign(
        {"aud": AUDIENCE, **github_claims(), "iat": now - 900, "nbf": now - 900, "exp": now - 60}
    )
    await assert_refused(env, await exchange(env, client_id, token), "subject_token_expired")


async def test_token_not_valid_yet_is_refused(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)
    later = int(time.time()) + 600
    token = issuer.sign({"aud": AUDIENCE, **github_claims(), "nbf": later, "exp": later + 300})
    await assert_refused(env, await exchange(env, client_id, token), "invalid_subject_token")


async def test_forged_signature_is_refused(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)
    published = issuer.state.keys[0]
    forger = new_key(kid=published.kid)  # the published key id, another private key
    token = issuer.sign({"aud": AUDIENCE, **github_claims()}, key=forger)
    response = await exchange(env, client_id, token)
    await assert_refused(env, response, "invalid_subject_token")
    assert "signature" in response.json()["error_description"]


async def test_tampered_claims_are_refused(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)
    header, _payload, signature = github_token(issuer, ref="refs/heads/dev").split(".")
    claims = {"iss": issuer.url, "aud": AUDIENCE, "exp": int(time.time()) + 300, **github_claims()}
    payload = _b64(json.dumps(claims).encode())
    response = await exchange(env, client_id, f"{header}.{payload}.{signature}")
    await assert_refused(env, response, "invalid_subject_token")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def test_alg_none_is_refused(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)
    claims = {"iss": issuer.url, "aud": AUDIENCE, "exp": int(time.time()) + 300, **github_claims()}
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    unsigned = f"{header}.{_b64(json.dumps(claims).encode())}."
    response = await exchange(env, client_id, unsigned)
    await assert_refused(env, response, "invalid_subject_token")
    assert "'none'" in response.json()["error_description"]


async def test_symmetric_signature_is_refused(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)
    # An attacker's HS256 token keyed with the issuer's public key (the alg-confusion attack).
    public = json.dumps(issuer.state.keys[0].as_dict(private=False)).encode()
    claims = {"iss": issuer.url, "aud": AUDIENCE, "exp": int(time.time()) + 300, **github_claims()}
    token = jwt.encode(
        {"alg": "HS256", "kid": issuer.state.keys[0].kid},
        claims,
        OctKey.import_key(public),
        algorithms=["HS256"],
    )
    await assert_refused(env, await exchange(env, client_id, token), "invalid_subject_token")


async def test_key_from_another_issuer_is_refused(
    env: BrokerEnv, issuer: OIDCIssuer, other_issuer: OIDCIssuer
) -> None:
    client_id = await ready(env, issuer)
    await trust(env, other_issuer.url)
    # Signed by the other (also trusted) issuer's published key, claiming to be the first.
    stolen = other_issuer.state.keys[0]
    token = other_issuer.sign({"aud": AUDIENCE, **github_claims(), "iss": issuer.url}, key=stolen)
    await assert_refused(env, await exchange(env, client_id, token), "invalid_subject_token")
    # Its own iss: the client has no policy for that issuer.
    own = other_issuer.sign({"aud": AUDIENCE, **github_claims()})
    await assert_refused(env, await exchange(env, client_id, own), "issuer_not_trusted")


async def test_another_branch_is_refused_naming_the_rule(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    client_id = await ready(env, issuer, repository=REPO, ref="refs/heads/main")
    response = await exchange(env, client_id, github_token(issuer, ref="refs/heads/feature"))
    event = await assert_refused(env, response, "claim_mismatch")
    assert "ref" in response.json()["error_description"]
    assert "refs/heads/feature" in response.json()["error_description"]
    assert event["details"]["failed"] == [{"policy": 0, "rule": "ref"}]


async def test_another_repository_is_refused(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)
    token = github_token(issuer, repository="example-org/other-job")
    await assert_refused(env, await exchange(env, client_id, token), "claim_mismatch")


@pytest.mark.parametrize(
    ("rule", "presented"),
    [
        # An exact value is never a prefix match...
        ({"repository": REPO}, f"{REPO}-evil"),
        # ...nor is a pattern: it must match the whole value.
        ({"repository": {"pattern": "example-org/canvas-sync"}}, f"{REPO}-evil"),
        ({"repository": {"pattern": "example-org/canvas-[a-z]+"}}, f"{REPO}/../evil"),
        ({"repository": {"pattern": "example-org/canvas-sync"}}, f"evil/{REPO}"),
    ],
)
async def test_claim_rules_do_not_match_by_prefix(
    env: BrokerEnv, issuer: OIDCIssuer, rule: dict[str, Any], presented: str
) -> None:
    client_id = await ready(env, issuer, **rule)
    accepted = await exchange(env, client_id, github_token(issuer, repository=REPO))
    assert accepted.status_code == 200, accepted.text
    env.sim.state.received.clear()
    token = github_token(issuer, repository=presented)
    await assert_refused(env, await exchange(env, client_id, token), "claim_mismatch")


async def test_token_for_one_client_is_refused_for_another(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    await ready(env, issuer)
    other = await keyless_client(
        env, [policy(issuer.url, repository="example-org/grades-export")], name="grades"
    )
    await assert_refused(env, await exchange(env, other, github_token(issuer)), "claim_mismatch")


async def test_replayed_jti_is_refused(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)
    second = await keyless_client(env, [policy(issuer.url)], name="second")
    token = github_token(issuer)
    assert (await exchange(env, client_id, token)).status_code == 200
    await assert_refused(env, await exchange(env, client_id, token), "subject_token_replayed")
    # The same token for another client that would accept it: still once only.
    await assert_refused(env, await exchange(env, second, token), "subject_token_replayed")


async def test_a_refused_scope_does_not_use_the_platform_token_up(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    client_id = await ready(env, issuer)
    token = github_token(issuer)
    wider = await exchange(env, client_id, token, scope="url:GET|/api/v1/users/:id")
    assert wider.status_code == 400, wider.text
    assert wider.json()["error"] == "invalid_scope"
    # The jti is spent only by a token actually minted: the same platform token still works,
    # once.
    assert (await exchange(env, client_id, token)).status_code == 200
    await assert_refused(env, await exchange(env, client_id, token), "subject_token_replayed")


async def test_issuer_off_the_allowlist_is_refused(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)
    [entry] = (await env.http.get(f"{V1}/trusted-issuers", headers=env.auditor())).json()
    removed = await env.http.post(f"{V1}/trusted-issuers/{entry['id']}/remove", headers=env.admin())
    assert removed.status_code == 200, removed.text
    assert removed.json()["clients"] == [client_id]
    response = await exchange(env, client_id, github_token(issuer))
    await assert_refused(env, response, "issuer_not_allowed")
    [event] = await env.audit(action="issuer.remove")
    assert event["details"]["changes"]["clients"] == [client_id]


async def test_unreachable_issuer_with_nothing_cached_fails_closed(env: BrokerEnv) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    await trust(env, down, verify=False)
    client_id = await keyless_client(env, [policy(down)], verify=False)
    header = _b64(json.dumps({"alg": "ES256", "kid": "k"}).encode())
    claims = {"iss": down, "aud": AUDIENCE, "exp": int(time.time()) + 300, **github_claims()}
    token = f"{header}.{_b64(json.dumps(claims).encode())}.{_b64(b'x' * 64)}"
    response = await exchange(env, client_id, token)
    await assert_refused(env, response, "issuer_unavailable", status=503)
    assert response.json()["error"] == "temporarily_unavailable"


async def test_failing_issuer_after_keys_were_cached_still_verifies(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    client_id = await ready(env, issuer)
    asked = issuer.state.discovery_requests
    issuer.state.failing = True
    keys = env.context.issuer_keys
    start = time.monotonic()
    keys.clock = lambda: start + 3600  # past the key set's max-age: a refetch is due, and fails
    response = await exchange(env, client_id, github_token(issuer))
    assert response.status_code == 200, response.text
    assert issuer.state.discovery_requests == asked + 1


async def test_key_set_is_cached_for_its_max_age(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)  # saving the policy fetched the keys
    fetched = issuer.state.jwks_requests
    for _ in range(3):
        assert (await exchange(env, client_id, github_token(issuer))).status_code == 200
    assert issuer.state.jwks_requests == fetched


async def test_key_rotation_is_picked_up_at_most_once_a_minute(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    client_id = await ready(env, issuer)
    fetched = issuer.state.jwks_requests
    issuer.rotate("RSA")
    keys = env.context.issuer_keys
    start = time.monotonic()
    # Within the minute after the last fetch, an unknown kid is not fetched again.
    early = await exchange(env, client_id, github_token(issuer))
    await assert_refused(env, early, "invalid_subject_token")
    assert issuer.state.jwks_requests == fetched
    keys.clock = lambda: start + 61
    rotated = await exchange(env, client_id, github_token(issuer))
    assert rotated.status_code == 200, rotated.text
    assert issuer.state.jwks_requests == fetched + 1
    # A forged kid does not make the broker fetch again within the minute.
    forged = issuer.sign({"aud": AUDIENCE, **github_claims()}, key=new_key())
    await assert_refused(env, await exchange(env, client_id, forged), "invalid_subject_token")
    assert issuer.state.jwks_requests == fetched + 1


async def test_eddsa_signed_tokens_verify(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    issuer.rotate("OKP")
    client_id = await ready(env, issuer)
    response = await exchange(env, client_id, github_token(issuer))
    assert response.status_code == 200, response.text


async def test_kubernetes_service_account_token_matches_nested_claims(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    await trust(env, issuer.url)
    client_id = await keyless_client(
        env,
        [
            policy(
                issuer.url,
                sub="system:serviceaccount:canvas-jobs:grade-sync",
                **{"kubernetes.io/namespace": "canvas-jobs"},
            )
        ],
    )
    claims = {
        "aud": [AUDIENCE],
        "sub": "system:serviceaccount:canvas-jobs:grade-sync",
        "kubernetes.io": {
            "namespace": "canvas-jobs",
            "serviceaccount": {"name": "grade-sync", "uid": "d9a8"},
        },
    }
    response = await exchange(env, client_id, issuer.sign(claims))
    assert response.status_code == 200, response.text
    other = {**claims, "sub": "system:serviceaccount:canvas-jobs:other"}
    await assert_refused(env, await exchange(env, client_id, issuer.sign(other)), "claim_mismatch")


async def test_exchange_refuses_client_credentials_and_unknown_clients(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    client_id = await ready(env, issuer)
    mixed = await exchange(env, client_id, github_token(issuer), client_secret="cbs_x")
    await assert_refused(env, mixed, "invalid_request")
    unknown = await exchange(env, "cli_nobody", github_token(issuer))
    await assert_refused(env, unknown, "invalid_client", status=401)
    untyped = await exchange(env, client_id, github_token(issuer), subject_token_type="saml")
    await assert_refused(env, untyped, "invalid_request")


async def test_disabled_client_cannot_exchange(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    client_id = await ready(env, issuer)
    assert (
        await env.http.post(f"{V1}/clients/{client_id}/disable", headers=env.admin())
    ).is_success
    response = await exchange(env, client_id, github_token(issuer))
    await assert_refused(env, response, "client_disabled", status=401)


# Saving policies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "field"),
    [
        ({"sub": {"pattern": ".*"}}, "claims.sub"),
        ({"sub": {"pattern": ".+"}}, "claims.sub"),
        ({"sub": {"pattern": "(?s).*"}}, "claims.sub"),
        ({"sub": {"pattern": "repo:.*:ref:refs/heads/main"}}, "claims.sub"),
        ({"sub": {"pattern": "system:serviceaccount:.*"}}, "claims.sub"),
        ({"sub": {"pattern": "repo:(unclosed"}}, "claims.sub"),
        ({"ref": "refs/heads/main"}, "claims"),  # pins no identity
        ({"sub": {"pattern": "[a-z].*:ref:refs/heads/main"}}, "claims"),  # starts open
        ({"exp": "1"}, "claims.exp"),
    ],
)
async def test_unsafe_policies_are_refused_on_save(
    env: BrokerEnv, issuer: OIDCIssuer, claims: dict[str, Any], field: str
) -> None:
    await trust(env, issuer.url)
    response = await save_client(env, [policy(issuer.url, **claims)])
    assert response.status_code == 422, response.text
    assert response.json()["message"].startswith(f"trust_policies[0].{field}")
    listed = await env.http.get(f"{V1}/clients", headers=env.admin())
    assert all(c["name"] != "keyless" for c in listed.json())


async def test_policy_for_an_issuer_not_on_the_allowlist_is_refused(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    response = await save_client(env, [policy(issuer.url)])
    assert response.status_code == 422
    assert "not on the list of trusted issuers" in response.json()["message"]


async def test_issuer_must_be_https_and_reachable(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    plain = await env.http.post(
        f"{V1}/trusted-issuers", headers=env.admin(), json={"issuer": "http://ci.example.edu"}
    )
    assert plain.status_code == 422
    assert "https" in plain.json()["message"]
    down = f"http://127.0.0.1:{free_port()}"
    unreachable = await env.http.post(
        f"{V1}/trusted-issuers", headers=env.admin(), json={"issuer": down}
    )
    assert unreachable.status_code == 422
    assert "could not be reached" in unreachable.json()["message"]
    issuer.state.issuer_override = "https://impostor.example.edu"
    impostor = await env.http.post(
        f"{V1}/trusted-issuers", headers=env.admin(), json={"issuer": issuer.url}
    )
    assert impostor.status_code == 422
    assert "names another issuer" in impostor.json()["message"]
    assert (await env.http.get(f"{V1}/trusted-issuers", headers=env.admin())).json() == []


async def test_loopback_http_issuers_need_the_setting(env: BrokerEnv, issuer: OIDCIssuer) -> None:
    service = env.management  # built on settings that allow them
    strict = type(service)(
        env.context.sessions,
        env.context.keyring,
        env.context.settings.model_copy(update={"workload_allow_loopback_http": False}),
    )
    from broker.errors import ValidationFailedError  # noqa: PLC0415
    from broker.services.management import Actor  # noqa: PLC0415

    with pytest.raises(ValidationFailedError, match="BROKER_WORKLOAD_ALLOW_LOOPBACK_HTTP"):
        await strict.add_issuer(Actor(None, "admin"), issuer=issuer.url)


async def test_changing_policies_is_audited_with_before_and_after(
    env: BrokerEnv, issuer: OIDCIssuer
) -> None:
    client_id = await ready(env, issuer)
    new = policy(issuer.url, sub=f"repo:{REPO}:environment:production")
    response = await env.http.patch(
        f"{V1}/clients/{client_id}", headers=env.admin(), json={"trust_policies": [new]}
    )
    assert response.status_code == 200, response.text
    assert response.json()["changes"]["trust_policies"] == {
        "old": [policy(issuer.url)],
        "new": [new],
    }
    [event, *_] = await env.audit(action="client.update")
    assert event["details"]["changes"]["trust_policies"]["new"] == [new]
    refused = await exchange(env, client_id, github_token(issuer))
    await assert_refused(env, refused, "claim_mismatch")


async def test_no_verify_saves_offline(env: BrokerEnv) -> None:
    offline = "https://gitlab.example.edu"
    await trust(env, offline, verify=False)
    response = await save_client(
        env,
        [policy(offline, project_path="teaching/canvas-sync", ref_type="branch")],
        verify=False,
    )
    assert response.status_code == 201, response.text
    checked = await save_client(env, [policy(offline, project_path="a/b")], name="checked")
    assert checked.status_code == 422
    assert "could not be reached" in checked.json()["message"]


# Discovery ------------------------------------------------------------------------------------


async def test_authorization_server_metadata_describes_the_token_endpoint(
    env: BrokerEnv,
) -> None:
    response = await env.http.get("/.well-known/oauth-authorization-server")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["issuer"] == "http://broker.test"
    assert body["token_endpoint"] == "http://broker.test/broker/v1/oauth/token"
    assert set(body["grant_types_supported"]) == {"client_credentials", TOKEN_EXCHANGE, JWT_BEARER}
    assert "private_key_jwt" in body["token_endpoint_auth_methods_supported"]
    assert "none" not in body["token_endpoint_auth_signing_alg_values_supported"]
    assert env.received == []
