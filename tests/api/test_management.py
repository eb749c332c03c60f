"""The management API over HTTP: resources, roles, audit of every mutation, and
secrets that never come back after their one-time creation response.

Contract: docs/interfaces.md#management-api.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import text

from broker.app import create_app
from broker.core.tokens import SecretKind, generate_secret
from tests.support.env import DEFAULT_SCOPES, WORKER_TOKEN, bearer

if TYPE_CHECKING:
    from collections.abc import Callable

    import httpx

    from tests.api.conftest import ResponseLog, SimTokens
    from tests.support.env import BrokerEnv

V1 = "/broker/v1"
SECOND_WORKER_TOKEN = "sim-second-worker-token-5d1e"
ROTATED_WORKER_TOKEN = "sim-rotated-worker-token-b04c"
WORKER_TOKENS = (WORKER_TOKEN, SECOND_WORKER_TOKEN, ROTATED_WORKER_TOKEN)
COURSE = "/api/v1/courses/1201"
ASSIGNMENTS = "/api/v1/courses/1201/assignments"
COURSE_SCOPE = "url:GET|/api/v1/courses/:id"
ASSIGNMENTS_SCOPE = "url:GET|/api/v1/courses/:course_id/assignments"
CLIENT_SECRET = re.compile(r"cbs_[0-9A-Za-z]{36}")
ADMIN_KEY = re.compile(r"cba_[0-9A-Za-z]{36}")
WRITE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})
# POST routes that only read: an auditor may test a grant or hash a value to search for.
READ_ONLY_POSTS = frozenset({f"{V1}/clients/{{ref}}/check", f"{V1}/audit/hash"})
READ_BODIES: dict[str, dict[str, Any]] = {
    f"{V1}/clients/{{ref}}/check": {"method": "GET", "path": "/api/v1/courses/1201"},
    f"{V1}/audit/hash": {"value": "a leaked value"},
}


def _operations() -> list[tuple[str, str]]:
    """Every (method, path template) in the service's own OpenAPI schema."""
    paths: dict[str, dict[str, Any]] = create_app().openapi()["paths"]
    return sorted((method.upper(), path) for path, item in paths.items() for method in item)


OPERATIONS = _operations()
MANAGEMENT = [
    (method, path)
    for method, path in OPERATIONS
    if path.startswith(f"{V1}/") and not path.startswith(f"{V1}/oauth/")
]
MUTATIONS = [
    (method, path)
    for method, path in MANAGEMENT
    if method in WRITE_METHODS and path not in READ_ONLY_POSTS
]
READS = [(method, path) for method, path in MANAGEMENT if (method, path) not in MUTATIONS]


@pytest.fixture(autouse=True)
def no_worker_token_in_any_response(responses: ResponseLog) -> Any:
    """Worker tokens are write-only: no response of any test here may contain one."""
    yield
    for token in WORKER_TOKENS:
        assert responses.leaks(token) == [], f"worker token ending {token[-4:]} returned"


@dataclass
class World:
    """Resources every mutation can act on."""

    client_id: str
    client_secret: str
    token: str
    token_id: str
    spare_key_id: str
    admin_key_id: str
    issuer_id: str = ""


@pytest.fixture
async def world(env: BrokerEnv) -> World:
    client_id, secret = await env.client("job")
    token = await env.token(client_id, secret)
    [listed] = (await env.http.get(f"{V1}/tokens", headers=env.admin())).json()
    spare = await env.http.post(
        f"{V1}/admin-keys", headers=env.admin(), json={"name": "spare", "role": "auditor"}
    )
    developer_key = {"client_id": "10000000000001", "client_secret": "k" * 64}
    oauth = await env.http.post(
        f"{V1}/credentials",
        headers=env.admin(),
        json={"upstream": "sim", "name": "oauth-worker", "developer_key": developer_key},
    )
    assert oauth.status_code == 201, oauth.text
    keys = (await env.http.get(f"{V1}/admin-keys", headers=env.admin())).json()
    [admin_key_id] = [k["id"] for k in keys if k["name"] == "test-admin"]
    issuer = await env.http.post(
        f"{V1}/trusted-issuers",
        headers=env.admin(),
        json={"issuer": "https://token.actions.githubusercontent.com", "verify": False},
    )
    assert issuer.status_code == 201, issuer.text
    return World(
        client_id,
        secret,
        token,
        listed["id"],
        spare.json()["id"],
        admin_key_id,
        issuer.json()["id"],
    )


def concrete(template: str, world: World) -> str:
    """A path template filled in with resources of ``world``."""
    refs = {
        "upstreams": "sim",
        "credentials": "worker",
        "clients": world.client_id,
        "trusted-issuers": world.issuer_id,
    }
    resource = template.removeprefix(f"{V1}/").split("/")[0]
    path = template.replace("{token_id}", world.token_id).replace("{key_id}", world.spare_key_id)
    if template.endswith("/authorize"):
        refs["credentials"] = "oauth-worker"  # only an OAuth credential is authorised
    if "{ref}" in path:
        path = path.replace("{ref}", refs[resource])
    assert "{" not in path, f"no test value for a parameter of {template}"
    return path


# A valid request for every mutation, with the audit action it must record.
MUTATION_REQUESTS: dict[tuple[str, str], tuple[dict[str, Any] | None, str]] = {
    ("POST", f"{V1}/upstreams"): (
        {"name": "beta", "base_url": "https://beta.example.edu"},
        "upstream.create",
    ),
    ("PATCH", f"{V1}/upstreams/{{ref}}"): ({"base_url": "http://127.0.0.1:9"}, "upstream.update"),
    ("POST", f"{V1}/upstreams/{{ref}}/disable"): (None, "upstream.disable"),
    ("POST", f"{V1}/upstreams/{{ref}}/enable"): (None, "upstream.enable"),
    ("POST", f"{V1}/credentials"): (
        {"upstream": "sim", "name": "second", "token": SECOND_WORKER_TOKEN},
        "credential.create",
    ),
    ("PATCH", f"{V1}/credentials/{{ref}}"): ({"notes": "owned by IT"}, "credential.update"),
    ("POST", f"{V1}/credentials/{{ref}}/rotate"): (
        {"token": ROTATED_WORKER_TOKEN},
        "credential.rotate",
    ),
    ("POST", f"{V1}/credentials/{{ref}}/authorize"): (None, "credential.authorize_start"),
    ("POST", f"{V1}/credentials/{{ref}}/disable"): (None, "credential.disable"),
    ("POST", f"{V1}/credentials/{{ref}}/enable"): (None, "credential.enable"),
    ("POST", f"{V1}/clients"): (
        {"name": "new-job", "credential": "worker", "scopes": [COURSE_SCOPE]},
        "client.create",
    ),
    ("PATCH", f"{V1}/clients/{{ref}}"): ({"scopes": [COURSE_SCOPE]}, "client.update"),
    ("POST", f"{V1}/clients/{{ref}}/rotate-secret"): (
        {"revoke_tokens": True},
        "client.rotate_secret",
    ),
    ("POST", f"{V1}/clients/{{ref}}/disable"): (None, "client.disable"),
    ("POST", f"{V1}/clients/{{ref}}/enable"): (None, "client.enable"),
    ("POST", f"{V1}/clients/{{ref}}/revoke-tokens"): (None, "client.revoke_tokens"),
    ("POST", f"{V1}/tokens/{{token_id}}/revoke"): (None, "token.revoke"),
    ("POST", f"{V1}/tokens/revoke"): ({"token": "{token}"}, "token.revoke"),
    ("POST", f"{V1}/admin-keys"): ({"name": "ops", "role": "auditor"}, "admin_key.create"),
    ("POST", f"{V1}/admin-keys/{{key_id}}/revoke"): (None, "admin_key.revoke"),
    ("POST", f"{V1}/audit/prune"): ({"before": "2000-01-01T00:00:00Z"}, "audit.prune"),
    ("POST", f"{V1}/trusted-issuers"): (
        {"issuer": "https://gitlab.example.edu", "verify": False},
        "issuer.add",
    ),
    ("POST", f"{V1}/trusted-issuers/{{ref}}/remove"): (None, "issuer.remove"),
}


def body_for(body: dict[str, Any] | None, world: World) -> dict[str, Any] | None:
    """A request body with ``"{token}"`` replaced by the world's live token value."""
    if body is None:
        return None
    return {k: world.token if v == "{token}" else v for k, v in body.items()}


async def send(
    env: BrokerEnv, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
) -> httpx.Response:
    """One request with an optional JSON body."""
    return await env.http.request(method, path, json=body, headers=headers)


async def admin_events(env: BrokerEnv) -> list[dict[str, Any]]:
    """Every ``kind=admin`` audit event, newest first."""
    return await env.audit(kind="admin", limit=1000)


def assert_error(response: httpx.Response, status: int, error: str | None = None) -> None:
    """A management API error: status, ``{"error", "message", "request_id"}``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert {"error", "message", "request_id"} <= set(body)
    assert body["request_id"] == response.headers["x-request-id"]
    if error is not None:
        assert body["error"] == error


# Roles and authentication -------------------------------------------------------------------


def test_every_mutation_route_has_a_test_request() -> None:
    assert set(MUTATION_REQUESTS) == set(MUTATIONS)


@pytest.mark.parametrize(("method", "template"), MUTATIONS)
async def test_auditor_key_gets_403_on_mutation(
    env: BrokerEnv, world: World, method: str, template: str
) -> None:
    body, _action = MUTATION_REQUESTS.get((method, template), ({}, ""))
    before = await admin_events(env)
    path = concrete(template, world)
    response = await send(env, method, path, body_for(body, world), env.auditor())
    assert_error(response, 403, "read_only_key")
    [refusal, *rest] = await admin_events(env)
    assert rest == before
    assert (refusal["action"], refusal["decision"], refusal["reason"], refusal["status"]) == (
        "admin_key.authorize",
        "deny",
        "read_only_key",
        403,
    )
    assert (refusal["method"], refusal["path"]) == (method, path)
    assert refusal["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize(("method", "template"), READS)
async def test_auditor_key_can_read(
    env: BrokerEnv, world: World, method: str, template: str
) -> None:
    body = READ_BODIES[template] if method == "POST" else None
    response = await send(env, method, concrete(template, world), body, env.auditor())
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("method", "template"), MANAGEMENT)
async def test_management_route_without_a_key_is_401(
    env: BrokerEnv, world: World, method: str, template: str
) -> None:
    body, _action = MUTATION_REQUESTS.get((method, template), (None, ""))
    response = await send(env, method, concrete(template, world), body_for(body, world), {})
    assert_error(response, 401, "invalid_admin_key")
    assert response.headers["www-authenticate"].startswith("Bearer")


BAD_KEYS: dict[str, Callable[[World], str]] = {
    "empty_bearer": lambda _w: "Bearer ",
    "basic": lambda _w: "Basic dGVzdDp0ZXN0",
    "garbage": lambda _w: "Bearer not-a-key",
    "bad_checksum": lambda _w: "Bearer cba_" + "A" * 36,
    "unknown_key": lambda _w: "Bearer " + generate_secret(SecretKind.ADMIN_KEY),
    "client_secret": lambda w: "Bearer " + w.client_secret,
    "proxy_token": lambda w: "Bearer " + w.token,
}


@pytest.mark.parametrize("kind", list(BAD_KEYS))
async def test_malformed_or_unknown_key_is_401(env: BrokerEnv, world: World, kind: str) -> None:
    headers = {"Authorization": BAD_KEYS[kind](world)}
    assert_error(await env.http.get(f"{V1}/clients", headers=headers), 401, "invalid_admin_key")
    created = await env.http.post(
        f"{V1}/upstreams", headers=headers, json={"name": "x", "base_url": "https://x.example"}
    )
    assert_error(created, 401, "invalid_admin_key")


REFUSAL_REASONS = {
    "empty_bearer": "missing_admin_key",
    "basic": "missing_admin_key",
    "garbage": "malformed_admin_key",
    "bad_checksum": "malformed_admin_key",
    "unknown_key": "unknown_admin_key",
    "client_secret": "malformed_admin_key",
    "proxy_token": "malformed_admin_key",
}


async def stored_audit_text(env: BrokerEnv) -> str:
    """Every column of every stored audit event, as text (what a DBA could read)."""
    async with env.context.engine.connect() as connection:
        rows = (await connection.execute(text("SELECT * FROM audit_events"))).all()
    return "\n".join(str(value) for row in rows for value in row)


def test_every_bad_key_has_an_expected_refusal_reason() -> None:
    assert set(REFUSAL_REASONS) == set(BAD_KEYS)


@pytest.mark.parametrize("kind", list(BAD_KEYS))
async def test_refused_admin_key_is_audited_with_reason_and_source_but_not_the_key(
    env: BrokerEnv, world: World, kind: str
) -> None:
    header = BAD_KEYS[kind](world)
    response = await env.http.post(
        f"{V1}/upstreams",
        headers={"Authorization": header, "User-Agent": "probe/1.0"},
        json={"name": "x", "base_url": "https://x.example"},
    )
    assert_error(response, 401, "invalid_admin_key")
    [event] = await env.audit(action="admin_key.authenticate")
    assert (event["kind"], event["decision"], event["reason"], event["status"]) == (
        "admin",
        "deny",
        REFUSAL_REASONS[kind],
        401,
    )
    assert (event["method"], event["path"]) == ("POST", f"{V1}/upstreams")
    assert (event["source_ip"], event["user_agent"]) == ("127.0.0.1", "probe/1.0")
    assert event["actor_key_id"] is None
    assert event["request_id"] == response.headers["x-request-id"]
    presented = header.partition(" ")[2]
    if presented:
        assert presented not in json.dumps(event)
        assert presented not in await stored_audit_text(env)


async def test_request_without_a_key_is_audited_as_missing_key(env: BrokerEnv) -> None:
    response = await env.http.get(f"{V1}/clients")
    assert_error(response, 401, "invalid_admin_key")
    [event] = await env.audit(action="admin_key.authenticate")
    assert (event["reason"], event["method"], event["path"]) == (
        "missing_admin_key",
        "GET",
        f"{V1}/clients",
    )


async def test_revoked_admin_key_is_audited_by_its_id(env: BrokerEnv) -> None:
    created = await create_key(env)
    await env.http.post(f"{V1}/admin-keys/{created['id']}/revoke", headers=env.admin())
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert_error(await env.http.get(f"{V1}/clients", headers=headers), 401, "invalid_admin_key")
    [event] = await env.audit(action="admin_key.authenticate")
    assert (event["reason"], event["actor_key_id"]) == ("revoked_admin_key", created["id"])
    assert [e["action"] for e in await env.audit(actor=created["id"])] == ["admin_key.authenticate"]
    assert created["key"] not in await stored_audit_text(env)


async def test_management_refusal_is_503_when_the_audit_store_fails(env: BrokerEnv) -> None:
    async with env.context.engine.begin() as connection:
        await connection.execute(text("ALTER TABLE audit_events RENAME TO audit_events_offline"))
    try:
        response = await env.http.get(f"{V1}/clients")
    finally:
        async with env.context.engine.begin() as connection:
            await connection.execute(
                text("ALTER TABLE audit_events_offline RENAME TO audit_events")
            )
        await env.context.engine.dispose()
    assert_error(response, 503, "audit_unavailable")


async def test_admin_event_records_where_the_change_came_from(env: BrokerEnv, world: World) -> None:
    response = await env.http.post(
        f"{V1}/clients/{world.client_id}/disable",
        headers={**env.admin(), "User-Agent": "ops-console/2"},
    )
    assert response.status_code == 200
    [event, *_] = await admin_events(env)
    assert (event["action"], event["actor_key_id"]) == ("client.disable", world.admin_key_id)
    assert (event["method"], event["path"]) == ("POST", f"{V1}/clients/{world.client_id}/disable")
    assert (event["source_ip"], event["user_agent"]) == ("127.0.0.1", "ops-console/2")


# Audit of every mutation -------------------------------------------------------------------


@pytest.mark.parametrize(("method", "template"), list(MUTATION_REQUESTS))
async def test_mutation_is_audited_with_actor_and_changes(
    env: BrokerEnv, world: World, method: str, template: str
) -> None:
    body, action = MUTATION_REQUESTS[(method, template)]
    path = concrete(template, world)
    response = await send(env, method, path, body_for(body, world), env.admin())
    assert response.status_code in {200, 201}, response.text
    [event, *_] = await admin_events(env)
    assert event["action"] == action
    assert event["decision"] == "allow"
    assert event["actor_key_id"] == world.admin_key_id
    assert event["request_id"] == response.headers["x-request-id"]
    assert isinstance(event["details"]["changes"], dict)
    shown = json.dumps(event)
    secrets = [*WORKER_TOKENS, world.client_secret, world.token, env.admin_key, env.auditor_key]
    secrets += [v for f in ("client_secret", "key") if (v := response.json().get(f))]
    for secret in secrets:
        assert secret not in shown


async def test_admin_event_records_what_changed(env: BrokerEnv, world: World) -> None:
    await env.http.patch(
        f"{V1}/clients/{world.client_id}", headers=env.admin(), json={"token_ttl": 120}
    )
    [event, *_] = await admin_events(env)
    assert event["details"]["target"] == world.client_id
    assert event["details"]["changes"] == {"token_ttl": {"old": 900, "new": 120}}


# Upstreams ---------------------------------------------------------------------------------


async def create_upstream(env: BrokerEnv, name: str, base_url: str) -> httpx.Response:
    """POST an upstream as admin."""
    return await env.http.post(
        f"{V1}/upstreams", headers=env.admin(), json={"name": name, "base_url": base_url}
    )


async def test_upstream_create_returns_it_with_a_normalised_base_url(env: BrokerEnv) -> None:
    response = await create_upstream(env, "beta", "https://Beta.Example.EDU/")
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "beta"
    assert body["base_url"] == "https://beta.example.edu"
    assert body["enabled"] is True
    assert body["id"]


async def test_upstream_list_includes_every_upstream(env: BrokerEnv) -> None:
    await create_upstream(env, "beta", "https://beta.example.edu")
    listed = (await env.http.get(f"{V1}/upstreams", headers=env.admin())).json()
    assert sorted(u["name"] for u in listed) == ["beta", "sim"]


async def test_upstream_get_by_id_and_by_name_agree(env: BrokerEnv) -> None:
    created = (await create_upstream(env, "beta", "https://beta.example.edu")).json()
    by_id = await env.http.get(f"{V1}/upstreams/{created['id']}", headers=env.admin())
    by_name = await env.http.get(f"{V1}/upstreams/beta", headers=env.admin())
    assert by_id.status_code == by_name.status_code == 200
    assert by_id.json() == by_name.json() == created


async def test_upstream_update_changes_base_url(env: BrokerEnv) -> None:
    await create_upstream(env, "beta", "https://beta.example.edu")
    response = await env.http.patch(
        f"{V1}/upstreams/beta", headers=env.admin(), json={"base_url": "https://beta2.example.edu"}
    )
    assert response.status_code == 200
    fetched = await env.http.get(f"{V1}/upstreams/beta", headers=env.admin())
    assert fetched.json()["base_url"] == "https://beta2.example.edu"


@pytest.mark.parametrize(
    "base_url",
    [
        "ftp://canvas.example.edu",
        "canvas.example.edu",
        "https://canvas.example.edu/api/v1",
        "https://admin:hunter2@canvas.example.edu",
        "https://canvas.example.edu/?x=1",
        "https://",
        "https://canvas\x00.example.edu",
        "https://canvas example.edu",
        "https://canvas.example.edu:99999",
        "https://canvas.example.edu:https",
    ],
)
async def test_upstream_bad_base_url_is_422_naming_base_url(env: BrokerEnv, base_url: str) -> None:
    response = await create_upstream(env, "beta", base_url)
    assert_error(response, 422)
    assert "base_url" in response.json()["message"]


async def test_upstream_update_to_bad_base_url_is_422(env: BrokerEnv) -> None:
    response = await env.http.patch(
        f"{V1}/upstreams/sim", headers=env.admin(), json={"base_url": "file:///etc/passwd"}
    )
    assert_error(response, 422)
    assert "base_url" in response.json()["message"]


async def test_upstream_duplicate_name_is_409(env: BrokerEnv) -> None:
    await create_upstream(env, "beta", "https://beta.example.edu")
    assert_error(await create_upstream(env, "beta", "https://other.example.edu"), 409, "conflict")


async def test_upstream_rename_onto_existing_name_is_409(env: BrokerEnv) -> None:
    await create_upstream(env, "beta", "https://beta.example.edu")
    response = await env.http.patch(
        f"{V1}/upstreams/beta", headers=env.admin(), json={"name": "sim"}
    )
    assert_error(response, 409, "conflict")


async def test_unknown_upstream_is_404(env: BrokerEnv) -> None:
    assert_error(await env.http.get(f"{V1}/upstreams/nope", headers=env.admin()), 404, "not_found")


async def test_upstream_disable_refuses_its_tokens(env: BrokerEnv) -> None:
    token = await env.client_token()
    response = await env.http.post(f"{V1}/upstreams/sim/disable", headers=env.admin())
    assert response.status_code == 200
    assert response.json()["enabled"] is False
    proxied = await env.http.get(COURSE, headers=bearer(token))
    assert proxied.status_code == 401
    assert proxied.json()["error"] == "upstream_disabled"
    assert env.received == []


async def test_upstream_enable_restores_its_tokens(env: BrokerEnv) -> None:
    token = await env.client_token()
    await env.http.post(f"{V1}/upstreams/sim/disable", headers=env.admin())
    response = await env.http.post(f"{V1}/upstreams/sim/enable", headers=env.admin())
    assert response.json()["enabled"] is True
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200


# Worker credentials ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def canvas_knows_the_extra_worker_tokens(sim_tokens: SimTokens) -> None:
    """Credentials created and rotated here are verified with the simulator, which must know
    them."""
    sim_tokens.accept(SECOND_WORKER_TOKEN)
    sim_tokens.accept(ROTATED_WORKER_TOKEN)


async def create_credential(env: BrokerEnv, **fields: Any) -> httpx.Response:
    """POST a credential as admin."""
    body = {"upstream": "sim", "name": "second", "token": SECOND_WORKER_TOKEN, **fields}
    return await env.http.post(f"{V1}/credentials", headers=env.admin(), json=body)


async def test_credential_create_returns_metadata_without_the_token(env: BrokerEnv) -> None:
    response = await create_credential(env, notes="sync job")
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "second"
    assert body["upstream"] == "sim"
    assert body["token_last4"] == SECOND_WORKER_TOKEN[-4:]
    assert body["enabled"] is True
    assert body["rotated_at"] is None
    assert "token" not in body


async def test_credential_create_keeps_an_aware_expiry(env: BrokerEnv) -> None:
    response = await create_credential(env, expires_at="2031-01-02T03:04:05+02:00")
    assert response.status_code == 201
    assert datetime.fromisoformat(response.json()["expires_at"]) == datetime(
        2031, 1, 2, 1, 4, 5, tzinfo=UTC
    )


async def test_credential_create_with_a_naive_expiry_is_422(env: BrokerEnv) -> None:
    response = await create_credential(env, expires_at="2031-01-02T03:04:05")
    assert_error(response, 422)
    assert "expires_at" in response.json()["message"]


async def test_credential_list_shows_metadata_only(env: BrokerEnv) -> None:
    await create_credential(env)
    listed = (await env.http.get(f"{V1}/credentials", headers=env.admin())).json()
    assert [c["name"] for c in listed] == ["second", "worker"]
    assert [c["token_last4"] for c in listed] == [SECOND_WORKER_TOKEN[-4:], WORKER_TOKEN[-4:]]
    assert all("token" not in c for c in listed)


async def test_credential_get_by_id_and_by_name_agree(env: BrokerEnv) -> None:
    created = (await create_credential(env)).json()
    by_id = await env.http.get(f"{V1}/credentials/{created['id']}", headers=env.admin())
    by_name = await env.http.get(f"{V1}/credentials/second", headers=env.admin())
    assert by_id.json() == by_name.json() == created


async def test_credential_with_unknown_upstream_is_404(env: BrokerEnv) -> None:
    assert_error(await create_credential(env, upstream="nope"), 404, "not_found")


async def test_credential_duplicate_name_is_409(env: BrokerEnv) -> None:
    assert_error(await create_credential(env, name="worker"), 409, "conflict")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abcd",
        "fifteen-chars-x",
        "has space-in-it-here",
        "tab\there-and-more-text",
        "nul\x00here-and-more-text",
        "caf\u00e9-token-with-accent",
        "x" * 5000,
    ],
)
async def test_credential_unusable_token_is_422_without_echo(env: BrokerEnv, token: str) -> None:
    response = await create_credential(env, token=token)
    assert_error(response, 422)
    assert "token" in response.json()["message"]
    if token:
        assert token not in response.text


async def test_credential_token_longer_than_four_is_not_revealed_by_last4(
    env: BrokerEnv,
) -> None:
    response = await create_credential(env, token="x" * 15 + "abcd", verify=False)
    assert response.status_code == 201
    assert response.json()["token_last4"] == "abcd"


async def test_credential_rotate_changes_last4(env: BrokerEnv) -> None:
    response = await env.http.post(
        f"{V1}/credentials/worker/rotate", headers=env.admin(), json={"token": ROTATED_WORKER_TOKEN}
    )
    assert response.status_code == 200
    assert response.json()["token_last4"] == ROTATED_WORKER_TOKEN[-4:]
    assert response.json()["rotated_at"] is not None


async def test_credential_rotate_forwards_the_new_token(
    env: BrokerEnv, sim_tokens: SimTokens
) -> None:
    sim_tokens.accept(ROTATED_WORKER_TOKEN)
    token = await env.client_token()
    await env.http.post(
        f"{V1}/credentials/worker/rotate", headers=env.admin(), json={"token": ROTATED_WORKER_TOKEN}
    )
    response = await env.http.get(COURSE, headers=bearer(token))
    assert response.status_code == 200
    assert env.sim.state.received[-1].header("authorization") == f"Bearer {ROTATED_WORKER_TOKEN}"


async def test_credential_disable_refuses_its_tokens_at_once(env: BrokerEnv) -> None:
    token = await env.client_token()
    response = await env.http.post(f"{V1}/credentials/worker/disable", headers=env.admin())
    assert response.json()["enabled"] is False
    proxied = await env.http.get(COURSE, headers=bearer(token))
    assert proxied.status_code == 401
    assert proxied.json()["error"] == "credential_disabled"
    assert env.received == []


async def test_credential_enable_restores_its_tokens(env: BrokerEnv) -> None:
    token = await env.client_token()
    await env.http.post(f"{V1}/credentials/worker/disable", headers=env.admin())
    response = await env.http.post(f"{V1}/credentials/worker/enable", headers=env.admin())
    assert response.json()["enabled"] is True
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200


async def test_credential_past_its_expiry_refuses_its_tokens(env: BrokerEnv) -> None:
    token = await env.client_token()
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    response = await env.http.patch(
        f"{V1}/credentials/worker", headers=env.admin(), json={"expires_at": past}
    )
    assert response.status_code == 200
    proxied = await env.http.get(COURSE, headers=bearer(token))
    assert proxied.status_code == 401
    assert proxied.json()["error"] == "credential_disabled"


async def test_credential_update_changes_notes(env: BrokerEnv) -> None:
    response = await env.http.patch(
        f"{V1}/credentials/worker", headers=env.admin(), json={"notes": "owned by IT"}
    )
    assert response.status_code == 200
    fetched = await env.http.get(f"{V1}/credentials/worker", headers=env.admin())
    assert fetched.json()["notes"] == "owned by IT"


async def test_validation_error_never_echoes_a_numeric_token(env: BrokerEnv) -> None:
    response = await create_credential(env, token=987654321987654321)
    assert_error(response, 422)
    assert "token" in response.json()["message"]
    assert "987654321987654321" not in response.text


async def test_validation_error_never_echoes_the_token_beside_an_unknown_field(
    env: BrokerEnv,
) -> None:
    response = await create_credential(env, token=SECOND_WORKER_TOKEN, tokn="typo")
    assert_error(response, 422)
    assert "tokn" in response.json()["message"]


async def test_rotate_validation_error_never_echoes_the_token(env: BrokerEnv) -> None:
    response = await env.http.post(
        f"{V1}/credentials/worker/rotate",
        headers=env.admin(),
        json={"token": ROTATED_WORKER_TOKEN, "revoke": True},
    )
    assert_error(response, 422)


async def test_malformed_json_error_never_echoes_the_body(env: BrokerEnv) -> None:
    response = await env.http.post(
        f"{V1}/credentials",
        headers={**env.admin(), "Content-Type": "application/json"},
        content=f'{{"upstream": "sim", "name": "second", "token": "{SECOND_WORKER_TOKEN}",',
    )
    assert_error(response, 422)


@pytest.mark.parametrize(
    ("field", "value"),
    [("notes", "a\x00b"), ("canvas_user_id", "4\x002"), ("name", "a\x00b")],
)
async def test_text_field_with_nul_is_422(env: BrokerEnv, field: str, value: str) -> None:
    response = await create_credential(env, **{field: value})
    assert_error(response, 422)
    assert field in response.json()["message"]


@pytest.mark.parametrize(
    "path",
    [
        f"{V1}/clients/a%00b",
        f"{V1}/credentials/a%00b",
        f"{V1}/upstreams/a%00b",
        f"{V1}/tokens?client=a%00b",
    ],
)
async def test_reference_with_nul_is_400(env: BrokerEnv, path: str) -> None:
    assert_error(await env.http.get(path, headers=env.admin()), 400, "invalid_request")


async def test_reference_by_id_wins_over_a_name_equal_to_that_id(env: BrokerEnv) -> None:
    older = (await create_client(env, name="older")).json()
    newer = (await create_client(env, name="newer")).json()
    renamed = await env.http.patch(
        f"{V1}/clients/older", headers=env.admin(), json={"name": newer["id"]}
    )
    assert renamed.status_code == 200
    # Touch the id's own row last, so storage order alone would not put it first.
    await env.http.patch(f"{V1}/clients/newer", headers=env.admin(), json={"token_ttl": 300})
    fetched = await env.http.get(f"{V1}/clients/{newer['id']}", headers=env.admin())
    assert fetched.json()["name"] == "newer"
    assert older["id"] != newer["id"]


# Clients -----------------------------------------------------------------------------------


async def create_client(env: BrokerEnv, **fields: Any) -> httpx.Response:
    """POST a client as admin."""
    body = {"name": "job", "credential": "worker", "scopes": list(DEFAULT_SCOPES), **fields}
    return await env.http.post(f"{V1}/clients", headers=env.admin(), json=body)


async def test_client_create_returns_the_secret(env: BrokerEnv) -> None:
    response = await create_client(env)
    assert response.status_code == 201
    body = response.json()
    assert CLIENT_SECRET.fullmatch(body["client_secret"])
    assert body["client_id"] == body["id"]
    assert body["scopes"] == list(DEFAULT_SCOPES)
    assert body["token_ttl"] == 900
    assert body["max_token_ttl"] == 3600
    assert body["allow_masquerade"] is False
    assert body["enabled"] is True


async def test_client_secret_is_never_returned_again(
    env: BrokerEnv, responses: ResponseLog
) -> None:
    created = (await create_client(env)).json()
    after = responses.mark()
    fetched = await env.http.get(f"{V1}/clients/{created['id']}", headers=env.admin())
    by_name = await env.http.get(f"{V1}/clients/job", headers=env.auditor())
    listed = await env.http.get(f"{V1}/clients", headers=env.admin())
    await env.http.patch(f"{V1}/clients/job", headers=env.admin(), json={"token_ttl": 300})
    await env.http.get(f"{V1}/audit", headers=env.auditor())
    assert "client_secret" not in fetched.json()
    assert "client_secret" not in by_name.json()
    assert all("client_secret" not in c for c in listed.json())
    assert responses.leaks(created["client_secret"], since=after) == []


async def test_client_get_by_id_and_by_name_agree(env: BrokerEnv) -> None:
    created = (await create_client(env)).json()
    by_id = await env.http.get(f"{V1}/clients/{created['id']}", headers=env.admin())
    by_name = await env.http.get(f"{V1}/clients/job", headers=env.admin())
    assert by_id.json() == by_name.json()
    assert by_id.json()["client_id"] == created["client_id"]


async def test_client_list_includes_every_client(env: BrokerEnv) -> None:
    await create_client(env, name="one")
    await create_client(env, name="two")
    listed = (await env.http.get(f"{V1}/clients", headers=env.admin())).json()
    assert [c["name"] for c in listed] == ["one", "two"]


async def test_client_duplicate_name_is_409(env: BrokerEnv) -> None:
    await create_client(env)
    assert_error(await create_client(env), 409, "conflict")


async def test_client_with_unknown_credential_is_404(env: BrokerEnv) -> None:
    assert_error(await create_client(env, credential="nope"), 404, "not_found")


BAD_SCOPES = [
    "url:GET/api/v1/courses",
    "url:FETCH|/api/v1/courses",
    "GET|/api/v1/courses",
    "url:GET|api/v1/courses",
    "url:GET|/api/v1/courses/:id)",
    "url:GET|/api/v1/courses?per_page=100",
    "url:GET|/api/v1/courses/:",
    "url:GET|/api/v1/course's list",
]


@pytest.mark.parametrize("scope", BAD_SCOPES)
async def test_client_invalid_scope_is_422_quoting_it(env: BrokerEnv, scope: str) -> None:
    response = await create_client(env, scopes=[COURSE_SCOPE, scope])
    assert_error(response, 422)
    assert scope in response.json()["message"]


@pytest.mark.parametrize("scope", BAD_SCOPES[:2])
async def test_grant_update_with_invalid_scope_is_422_and_keeps_the_grant(
    env: BrokerEnv, scope: str
) -> None:
    await create_client(env)
    response = await env.http.patch(
        f"{V1}/clients/job", headers=env.admin(), json={"scopes": [scope]}
    )
    assert_error(response, 422)
    assert scope in response.json()["message"]
    fetched = await env.http.get(f"{V1}/clients/job", headers=env.admin())
    assert fetched.json()["scopes"] == list(DEFAULT_SCOPES)


async def test_client_without_scopes_is_422(env: BrokerEnv) -> None:
    assert_error(await create_client(env, scopes=[]), 422)


async def test_client_scopes_as_one_string_is_422(env: BrokerEnv) -> None:
    assert_error(await create_client(env, scopes=COURSE_SCOPE), 422)


@pytest.mark.parametrize(
    "constraints",
    [
        {"course_id": []},
        {"course_id": [""]},
        {"course id": ["1201"]},
        {"course_id": "1201"},
        {"course_id": [1201]},
    ],
)
async def test_client_invalid_constraint_is_422_naming_constraints(
    env: BrokerEnv, constraints: dict[str, Any]
) -> None:
    response = await create_client(env, constraints=constraints)
    assert_error(response, 422)
    assert response.json()["message"].startswith("constraints")


@pytest.mark.parametrize(
    "fields",
    [{"description": "a\x00b"}, {"constraints": {"course_id": ["12\x0001"]}}],
)
async def test_client_text_with_nul_is_422(env: BrokerEnv, fields: dict[str, Any]) -> None:
    response = await create_client(env, **fields)
    assert_error(response, 422)
    assert next(iter(fields)) in response.json()["message"]


async def test_client_token_ttl_above_max_token_ttl_is_422(env: BrokerEnv) -> None:
    response = await create_client(env, token_ttl=1200, max_token_ttl=600)
    assert_error(response, 422)
    assert "token_ttl" in response.json()["message"]


async def test_client_max_token_ttl_above_twelve_hours_is_422(env: BrokerEnv) -> None:
    response = await create_client(env, max_token_ttl=12 * 3600 + 1)
    assert_error(response, 422)
    assert "max_token_ttl" in response.json()["message"]


async def test_client_invalid_cidr_is_422(env: BrokerEnv) -> None:
    response = await create_client(env, allowed_cidrs=["10.0.0.0/33"])
    assert_error(response, 422)
    assert "allowed_cidrs" in response.json()["message"]


async def test_grant_update_removing_a_scope_refuses_a_minted_token_at_once(
    env: BrokerEnv,
) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    assert (await env.http.get(ASSIGNMENTS, headers=bearer(token))).status_code == 200
    response = await env.http.patch(
        f"{V1}/clients/{client_id}", headers=env.admin(), json={"scopes": [COURSE_SCOPE]}
    )
    assert response.status_code == 200
    refused = await env.http.get(ASSIGNMENTS, headers=bearer(token))
    assert refused.status_code == 403
    assert refused.json()["error"] == "scope_not_granted"
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200


async def test_grant_update_adding_a_scope_does_not_widen_a_down_scoped_token(
    env: BrokerEnv,
) -> None:
    client_id, secret = await env.client(scopes=[COURSE_SCOPE, ASSIGNMENTS_SCOPE])
    token = await env.token(client_id, secret, scope=COURSE_SCOPE)
    await env.http.patch(
        f"{V1}/clients/{client_id}",
        headers=env.admin(),
        json={"scopes": [COURSE_SCOPE, ASSIGNMENTS_SCOPE, "url:GET|/api/v1/users/:user_id"]},
    )
    assert (await env.http.get(ASSIGNMENTS, headers=bearer(token))).status_code == 403


async def test_constraint_update_applies_to_a_minted_token_at_once(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    await env.http.patch(
        f"{V1}/clients/{client_id}",
        headers=env.admin(),
        json={"constraints": {"course_id": ["1202"]}},
    )
    refused = await env.http.get(ASSIGNMENTS, headers=bearer(token))
    assert refused.status_code == 403
    assert refused.json()["error"] == "constraint_violation"


async def test_rotate_secret_stops_the_old_secret(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await env.http.post(
        f"{V1}/clients/{client_id}/rotate-secret", headers=env.admin(), json={}
    )
    assert response.status_code == 200
    minted = await env.http.post(
        f"{V1}/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret)
    )
    assert minted.status_code == 401


async def test_rotate_secret_returns_a_working_new_secret(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    response = await env.http.post(
        f"{V1}/clients/{client_id}/rotate-secret", headers=env.admin(), json={}
    )
    new_secret = response.json()["client_secret"]
    assert CLIENT_SECRET.fullmatch(new_secret)
    assert new_secret != secret
    assert response.json()["secret_rotated_at"] is not None
    token = await env.token(client_id, new_secret)
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200


async def test_rotate_secret_keeps_live_tokens_by_default(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    await env.http.post(f"{V1}/clients/{client_id}/rotate-secret", headers=env.admin(), json={})
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200


async def test_rotate_secret_with_revoke_tokens_refuses_live_tokens(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    await env.http.post(
        f"{V1}/clients/{client_id}/rotate-secret",
        headers=env.admin(),
        json={"revoke_tokens": True},
    )
    proxied = await env.http.get(COURSE, headers=bearer(token))
    assert proxied.status_code == 401
    assert proxied.json()["error"] == "token_revoked"


async def test_client_disable_refuses_its_tokens_at_once(env: BrokerEnv) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    response = await env.http.post(f"{V1}/clients/{client_id}/disable", headers=env.admin())
    assert response.json()["enabled"] is False
    assert response.json()["tokens_revoked"] == 1
    assert response.json()["changes"] == {"enabled": {"old": True, "new": False}}
    proxied = await env.http.get(COURSE, headers=bearer(token))
    assert proxied.status_code == 401
    assert proxied.json()["error"] == "client_disabled"
    assert env.received == []
    [event, *_] = await admin_events(env)
    assert (event["action"], event["details"]["changes"]["tokens_revoked"]) == ("client.disable", 1)


async def test_client_enable_does_not_revive_tokens_minted_before_it_was_disabled(
    env: BrokerEnv,
) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    await env.http.post(f"{V1}/clients/{client_id}/disable", headers=env.admin())
    response = await env.http.post(f"{V1}/clients/{client_id}/enable", headers=env.admin())
    assert response.json()["enabled"] is True
    assert response.json()["tokens_revoked"] == 0
    revived = await env.http.get(COURSE, headers=bearer(token))
    assert revived.status_code == 401
    assert revived.json()["error"] == "token_revoked"
    assert env.received == []
    fresh = await env.token(client_id, secret)
    assert (await env.http.get(COURSE, headers=bearer(fresh))).status_code == 200


# Policy check ------------------------------------------------------------------------------


async def check(env: BrokerEnv, client: str, method: str, path: str) -> dict[str, Any]:
    """POST a policy check as admin."""
    response = await env.http.post(
        f"{V1}/clients/{client}/check",
        headers=env.admin(),
        json={"method": method, "path": path},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_policy_check_allows_a_granted_call_and_names_the_scope(env: BrokerEnv) -> None:
    await env.client()
    decision = await check(env, "job", "GET", ASSIGNMENTS)
    assert decision["allowed"] is True
    assert decision["rule"] == ASSIGNMENTS_SCOPE
    assert env.received == []


async def test_policy_check_refuses_an_ungranted_call(env: BrokerEnv) -> None:
    await env.client()
    decision = await check(env, "job", "DELETE", COURSE)
    assert decision["allowed"] is False
    assert decision["rule"] == "scope_not_granted"
    assert decision["reason"] == "scope_not_granted"


async def test_policy_check_refuses_a_constraint_violation(env: BrokerEnv) -> None:
    await env.client(constraints={"course_id": ["1202"]})
    decision = await check(env, "job", "GET", ASSIGNMENTS)
    assert decision["allowed"] is False
    assert decision["rule"] == "constraint_violation"
    assert decision["scope"] == ASSIGNMENTS_SCOPE


async def test_policy_check_matches_what_the_proxy_does_with_a_non_canonical_path(
    env: BrokerEnv,
) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    path = "/api/v1/courses/%2E%2E/assignments"
    decision = await check(env, "job", "GET", path)
    proxied = await env.http.get(path, headers=bearer(token))
    assert proxied.status_code == 400
    assert decision["allowed"] is False
    assert decision["reason"] == proxied.json()["error"]


async def test_policy_check_for_unknown_client_is_404(env: BrokerEnv) -> None:
    response = await env.http.post(
        f"{V1}/clients/nope/check", headers=env.admin(), json={"method": "GET", "path": COURSE}
    )
    assert_error(response, 404, "not_found")


# Tokens ------------------------------------------------------------------------------------


async def test_token_list_shows_metadata_never_values(
    env: BrokerEnv, responses: ResponseLog
) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret, scope=COURSE_SCOPE)
    after = responses.mark()
    response = await env.http.get(f"{V1}/tokens", headers=env.auditor())
    [listed] = response.json()
    assert listed["client_id"] == client_id
    assert listed["scopes"] == [COURSE_SCOPE]
    assert listed["revoked_at"] is None
    assert set(listed) == {
        "id",
        "client_id",
        "scopes",
        "created_at",
        "expires_at",
        "revoked_at",
        "revoked_by",
        "source_ip",
    }
    assert responses.leaks(token, since=after) == []


async def test_token_list_filters_by_client_name(env: BrokerEnv) -> None:
    await env.client_token("one")
    two_id, two_secret = await env.client("two")
    await env.token(two_id, two_secret)
    listed = (await env.http.get(f"{V1}/tokens?client=two", headers=env.admin())).json()
    assert [t["client_id"] for t in listed] == [two_id]


async def test_revoke_token_by_id_refuses_its_next_call(env: BrokerEnv) -> None:
    token = await env.client_token()
    [listed] = (await env.http.get(f"{V1}/tokens", headers=env.admin())).json()
    response = await env.http.post(f"{V1}/tokens/{listed['id']}/revoke", headers=env.admin())
    assert response.status_code == 200
    assert response.json()["revoked_at"] is not None
    proxied = await env.http.get(COURSE, headers=bearer(token))
    assert proxied.status_code == 401
    assert proxied.json()["error"] == "token_revoked"


async def test_revoked_token_leaves_the_live_token_list(env: BrokerEnv) -> None:
    await env.client_token()
    [listed] = (await env.http.get(f"{V1}/tokens", headers=env.admin())).json()
    await env.http.post(f"{V1}/tokens/{listed['id']}/revoke", headers=env.admin())
    assert (await env.http.get(f"{V1}/tokens", headers=env.admin())).json() == []
    everything = await env.http.get(f"{V1}/tokens?include_inactive=true", headers=env.admin())
    assert [t["id"] for t in everything.json()] == [listed["id"]]


async def test_revoke_token_by_value_refuses_its_next_call_and_never_echoes_it(
    env: BrokerEnv,
) -> None:
    token = await env.client_token()
    [listed] = (await env.http.get(f"{V1}/tokens", headers=env.admin())).json()
    response = await env.http.post(
        f"{V1}/tokens/revoke", headers=env.admin(), json={"token": token}
    )
    assert response.status_code == 200, response.text
    assert (response.json()["id"], response.json()["revoked_at"] is not None) == (
        listed["id"],
        True,
    )
    assert token not in response.text
    proxied = await env.http.get(COURSE, headers=bearer(token))
    assert proxied.json()["error"] == "token_revoked"
    [event, *_] = await admin_events(env)
    assert (event["action"], event["token_id"]) == ("token.revoke", listed["id"])


async def test_revoke_by_value_of_an_unknown_or_garbled_value_names_the_problem(
    env: BrokerEnv,
) -> None:
    unknown = generate_secret(SecretKind.PROXY_TOKEN)
    response = await env.http.post(
        f"{V1}/tokens/revoke", headers=env.admin(), json={"token": unknown}
    )
    assert_error(response, 404, "not_found")
    assert unknown not in response.text
    garbled = await env.http.post(
        f"{V1}/tokens/revoke",
        headers=env.admin(),
        json={"token": unknown[:-1] + ("1" if unknown.endswith("0") else "0")},
    )
    assert_error(garbled, 422, "invalid_field")
    assert garbled.json()["message"].startswith("token: not a proxy token value")
    assert unknown[:-1] not in garbled.text


async def test_revoke_unknown_token_is_404(env: BrokerEnv) -> None:
    response = await env.http.post(f"{V1}/tokens/tok_nope/revoke", headers=env.admin())
    assert_error(response, 404, "not_found")


async def test_revoke_tokens_of_a_client_refuses_all_of_them(env: BrokerEnv) -> None:
    client_id, secret = await env.client("job")
    first = await env.token(client_id, secret)
    second = await env.token(client_id, secret)
    response = await env.http.post(f"{V1}/clients/job/revoke-tokens", headers=env.admin())
    assert response.json() == {"revoked": 2}
    for token in (first, second):
        assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 401


async def test_revoke_tokens_of_a_client_spares_other_clients(env: BrokerEnv) -> None:
    await env.client_token("job")
    other = await env.client_token("other")
    await env.http.post(f"{V1}/clients/job/revoke-tokens", headers=env.admin())
    assert (await env.http.get(COURSE, headers=bearer(other))).status_code == 200


# Admin keys --------------------------------------------------------------------------------


async def create_key(env: BrokerEnv, role: str = "admin") -> dict[str, Any]:
    """POST an admin key as admin."""
    response = await env.http.post(
        f"{V1}/admin-keys", headers=env.admin(), json={"name": "ops", "role": role}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_admin_key_create_returns_a_working_key(env: BrokerEnv) -> None:
    created = await create_key(env)
    assert ADMIN_KEY.fullmatch(created["key"])
    assert created["role"] == "admin"
    response = await create_upstream(env, "beta", "https://beta.example.edu")
    assert response.status_code == 201
    headers = {"Authorization": f"Bearer {created['key']}"}
    other = await env.http.post(
        f"{V1}/upstreams", headers=headers, json={"name": "gamma", "base_url": "https://g.example"}
    )
    assert other.status_code == 201


async def test_admin_key_created_as_auditor_cannot_mutate(env: BrokerEnv) -> None:
    created = await create_key(env, role="auditor")
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert (await env.http.get(f"{V1}/clients", headers=headers)).status_code == 200
    response = await env.http.post(
        f"{V1}/upstreams", headers=headers, json={"name": "gamma", "base_url": "https://g.example"}
    )
    assert_error(response, 403, "read_only_key")


async def test_admin_key_with_unknown_role_is_422(env: BrokerEnv) -> None:
    response = await env.http.post(
        f"{V1}/admin-keys", headers=env.admin(), json={"name": "ops", "role": "root"}
    )
    assert_error(response, 422)


async def test_admin_key_list_never_shows_values(env: BrokerEnv, responses: ResponseLog) -> None:
    created = await create_key(env)
    after = responses.mark()
    listed = (await env.http.get(f"{V1}/admin-keys", headers=env.auditor())).json()
    assert sorted(k["name"] for k in listed) == ["ops", "test-admin", "test-auditor"]
    assert all("key" not in k for k in listed)
    for value in (created["key"], env.admin_key, env.auditor_key):
        assert responses.leaks(value, since=after) == []


async def test_revoked_admin_key_is_401(env: BrokerEnv) -> None:
    created = await create_key(env)
    response = await env.http.post(f"{V1}/admin-keys/{created['id']}/revoke", headers=env.admin())
    assert response.status_code == 200
    assert response.json()["revoked_at"] is not None
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert_error(await env.http.get(f"{V1}/clients", headers=headers), 401, "invalid_admin_key")


async def test_revoke_unknown_admin_key_is_404(env: BrokerEnv) -> None:
    response = await env.http.post(f"{V1}/admin-keys/key_nope/revoke", headers=env.admin())
    assert_error(response, 404, "not_found")


# Schema and error shape --------------------------------------------------------------------


async def test_openapi_schema_lists_every_resource(env: BrokerEnv) -> None:
    response = await env.http.get(f"{V1}/openapi.json")
    assert response.status_code == 200
    paths = set(response.json()["paths"])
    for resource in ("upstreams", "credentials", "clients", "tokens", "admin-keys", "audit"):
        assert f"{V1}/{resource}" in paths
    assert f"{V1}/oauth/token" in paths


async def test_openapi_schema_declares_the_admin_key_on_every_management_and_audit_route(
    env: BrokerEnv,
) -> None:
    schema = (await env.http.get(f"{V1}/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["adminKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An admin key (`cba_…`): role `admin`, or `auditor` for reads.",
    }
    secured = {
        (path, method)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if operation.get("security") == [{"adminKey": []}]
    }
    management = {
        (path, method)
        for path, operations in schema["paths"].items()
        for method in operations
        if path.startswith(f"{V1}/") and not path.startswith(f"{V1}/oauth/")
    }
    assert management
    # Introspection is for admins too (RFC 7662 with an admin key); the rest of OAuth is not.
    assert secured == management | {(f"{V1}/oauth/introspect", "post")}


async def test_docs_page_loads_swagger_ui_from_the_broker_itself(env: BrokerEnv) -> None:
    page = await env.http.get(f"{V1}/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"{V1}/docs/assets/{asset}" in page.text
        served = await env.http.get(f"{V1}/docs/assets/{asset}")
        assert served.status_code == 200
        assert len(served.content) > 10_000


async def test_openapi_schema_marks_the_worker_token_write_only(env: BrokerEnv) -> None:
    schemas = (await env.http.get(f"{V1}/openapi.json")).json()["components"]["schemas"]
    assert "token" in schemas["CredentialCreate"]["properties"]
    assert "token" not in schemas["CredentialOut"]["properties"]
    assert "client_secret" not in schemas["ClientOut"]["properties"]


async def test_validation_error_is_json_with_error_message_and_request_id(
    env: BrokerEnv,
) -> None:
    response = await env.http.post(f"{V1}/upstreams", headers=env.admin(), json={"name": "x"})
    assert_error(response, 422, "invalid_request")
    assert "base_url" in response.json()["message"]


async def test_unknown_route_is_json_404(env: BrokerEnv) -> None:
    assert_error(await env.http.get(f"{V1}/nothing-here", headers=env.admin()), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("TRACE", "/upstreams", {"GET", "POST"}),
        ("DELETE", "/upstreams/sim", {"GET", "PATCH"}),
        ("PUT", "/clients/x/check", {"POST"}),
        ("GET", "/oauth/token", {"POST"}),
    ],
)
async def test_wrong_method_is_json_405_naming_the_allowed_methods(
    env: BrokerEnv, method: str, path: str, allowed: set[str]
) -> None:
    response = await env.http.request(method, f"{V1}{path}", headers=env.admin())
    assert_error(response, 405, "method_not_allowed")
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed
