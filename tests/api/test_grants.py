"""Grants as the management API saves and checks them (docs/grants.md): inert scopes refused
at save, Canvas's catalogue as a typo check, allow_includes, and one decision for the policy
check API and the proxy."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from broker.app import create_app
from broker.core.catalogue import canvas_scopes
from tests.proxy.support import RawTargetTransport, send_raw
from tests.support.env import bearer

if TYPE_CHECKING:
    from tests.support.env import BrokerEnv

V1 = "/broker/v1"
PLACEHOLDER = re.compile(r"([:*])[A-Za-z_][A-Za-z0-9_]*")


def example_path(scope_path: str) -> str:
    """A request path the scope's route matches: parameters 1201, globs a/b, groups taken."""
    path = scope_path.replace("(", "").replace(")", "")
    return PLACEHOLDER.sub(lambda m: "1201" if m.group(1) == ":" else "a/b", path)


async def create(env: BrokerEnv, scopes: list[str], **options: Any) -> dict[str, Any]:
    response = await env.http.post(
        f"{V1}/clients",
        headers=env.admin(),
        json={"name": "job", "credential": "worker", "scopes": scopes, **options},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def check(env: BrokerEnv, method: str, path: str) -> dict[str, Any]:
    response = await env.http.post(
        f"{V1}/clients/job/check", headers=env.admin(), json={"method": method, "path": path}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize(
    ("scope", "named"),
    [
        ("url:HEAD|/api/v1/courses/:id", "HEAD"),
        ("url:GET|/api/v1/courses/a+b", "'+'"),
        ("url:GET|/api/v1/courses/:id(.:format)", "one parameter name"),
        ("url:GET|/login/:action", "literally"),
        ("url:POST|/api/graphql(.:format)", "literally"),
    ],
)
async def test_a_scope_that_could_never_match_is_refused_when_saved_naming_it(
    env: BrokerEnv, scope: str, named: str
) -> None:
    response = await env.http.post(
        f"{V1}/clients",
        headers=env.admin(),
        json={
            "name": "job",
            "credential": "worker",
            "scopes": ["url:GET|/api/v1/users/:id", scope],
        },
    )
    assert response.status_code == 422, response.text
    message = response.json()["message"]
    assert repr(scope) in message
    assert named in message
    await create(env, ["url:GET|/api/v1/users/:id"])
    patched = await env.http.patch(
        f"{V1}/clients/job", headers=env.admin(), json={"scopes": [scope]}
    )
    assert patched.status_code == 422, patched.text
    got = await env.http.get(f"{V1}/clients/job", headers=env.admin())
    assert got.json()["scopes"] == ["url:GET|/api/v1/users/:id"]


async def test_saving_a_scope_canvas_does_not_list_warns_naming_it(env: BrokerEnv) -> None:
    typo = "url:GET|/api/v1/course/:id"
    created = await create(env, [typo, "url:GET|/api/v1/courses/:id"])
    [warning] = created["warnings"]
    assert repr(typo) in warning
    assert created["scopes"] == [typo, "url:GET|/api/v1/courses/:id"]
    patched = await env.http.patch(
        f"{V1}/clients/job",
        headers=env.admin(),
        json={"scopes": ["url:GET|/api/v1/courses/:id"]},
    )
    assert patched.json()["warnings"] == []


async def test_the_whole_canvas_catalogue_is_one_grant_and_the_check_api_allows_every_route(
    env: BrokerEnv,
) -> None:
    created = await create(env, list(canvas_scopes()))
    assert created["warnings"] == []
    assert len(created["scopes"]) == 1092
    for text in canvas_scopes():
        method, _, path = text.removeprefix("url:").partition("|")
        decision = await check(env, method, example_path(path))
        assert decision["allowed"], (text, decision)


@pytest.mark.parametrize("flag", [True, False])
async def test_allow_includes_is_saved_shown_and_changed_through_the_api(
    env: BrokerEnv, flag: bool
) -> None:
    created = await create(env, ["url:GET|/api/v1/courses/:id"], allow_includes=flag)
    assert created["allow_includes"] is flag
    patched = await env.http.patch(
        f"{V1}/clients/job", headers=env.admin(), json={"allow_includes": not flag}
    )
    assert patched.json()["allow_includes"] is (not flag)
    [event] = await env.audit(action="client.update")
    assert event["details"]["changes"] == {"allow_includes": {"old": flag, "new": not flag}}


async def test_allow_includes_defaults_to_false_as_in_canvas(env: BrokerEnv) -> None:
    created = await create(env, ["url:GET|/api/v1/courses/:id"])
    assert created["allow_includes"] is False


GRANT = [
    "url:GET|/api/v1/courses/:course_id/assignments",
    "url:GET|/api/v1/*path",
    "url:POST|/api/graphql",
    "url:GET|/api/sis/courses/:course_id/assignments",
    "url:POST|/login/session_token",
    "url:PUT|/api/v1/users/:user_id/tokens/:id",
]
CALLS = [
    ("GET", "/api/v1/courses/1201/assignments"),
    ("GET", "/api/v1/courses/1202/assignments"),
    ("GET", "/api/v1/courses/1201/assignments.json"),
    ("GET", "/api/v1/courses/1201/assignments.xml"),
    ("HEAD", "/api/v1/courses/1201/assignments"),
    ("GET", "/api/v1/users/self"),
    ("GET", "/api/v1/login/session_token"),
    ("GET", "/api/v1/users/self/tokens"),
    ("PUT", "/api/v1/users/self/tokens/5"),
    ("GET", "/api/v1/inst_access_tokens"),
    ("POST", "/api/graphql"),
    ("GET", "/api/graphql"),
    ("POST", "/api/graphql.json"),
    ("GET", "/api/sis/courses/1201/assignments"),
    ("GET", "/api/sis/courses/1202/assignments"),
    ("GET", "/api/sis/accounts/1/assignments"),
    ("POST", "/login/session_token"),
    ("POST", "/login/oauth2/token"),
    ("GET", "/api/quiz/v1/courses/1/quizzes"),
    ("DELETE", "/api/v1/courses/1201"),
    ("OPTIONS", "/api/v1/courses/1201"),
    ("get", "/api/v1/courses/1201/assignments"),
    ("GET", "/api/v1/courses/%2E%2E/assignments"),
    ("GET", "/api/v1/courses/1201%3F"),
    ("GET", "/api/v2/courses"),
]


async def test_policy_check_and_proxy_reach_the_same_verdict_for_every_call(
    env: BrokerEnv,
) -> None:
    created = await create(env, GRANT, constraints={"course_id": ["1201"]})
    token = await env.token(created["client_id"], created["client_secret"])
    transport = RawTargetTransport(create_app(context=env.context))
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as raw:
        for method, path in CALLS:
            await assert_same_verdict(env, raw, token, method, path)


async def assert_same_verdict(
    env: BrokerEnv, raw: httpx.AsyncClient, token: str, method: str, path: str
) -> None:
    decision = await check(env, method, path)
    before = len(env.sim.state.received)
    response = await send_raw(raw, method, path.encode(), bearer(token))
    forwarded = len(env.sim.state.received) > before
    assert forwarded == decision["allowed"], (method, path, decision, response.text)
    if not forwarded:
        assert response.json()["error"] == decision["reason"], (method, path)
    else:
        event = (await env.audit(kind="proxy", limit=1))[0]
        assert event["scope"] == decision["scope"], (method, path)
