"""Masquerading, method override and client-supplied credentials.

Contract: docs/proxy-rules.md#masquerade, #method-override, #client-credentials, #includes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tests.proxy.support import assert_refused, last_proxy_event, make_caller
from tests.support.env import WORKER_TOKEN

if TYPE_CHECKING:
    from tests.support.env import BrokerEnv

ASSIGNMENTS = "/api/v1/courses/1201/assignments"
ASSIGNMENT = "/api/v1/courses/1201/assignments/5001"
GRANT = (
    "url:GET|/api/v1/users/:user_id",
    "url:GET|/api/v1/courses/:course_id/assignments",
    "url:POST|/api/v1/courses/:course_id/assignments",
    "url:GET|/api/v1/courses/:course_id/assignments/:assignment_id",
    "url:POST|/api/v1/courses/:course_id/assignments/:assignment_id",
)
NEW_ASSIGNMENT = {"assignment[name]": "Week 36 exercise"}
ATTACHMENT = {"attachment": ("notes.txt", b"hello", "text/plain")}


# Each variant: (method, path, keyword arguments for httpx).
MASQUERADE = [
    pytest.param("GET", "/api/v1/users/self", {"params": {"as_user_id": "2"}}, id="query"),
    pytest.param("GET", "/api/v1/users/self", {"params": {"as_user_id[]": "2"}}, id="query-array"),
    pytest.param(
        "GET", "/api/v1/users/self", {"params": {"[as_user_id]": "2"}}, id="query-rack2-bracket"
    ),
    pytest.param("POST", ASSIGNMENTS, {"data": {**NEW_ASSIGNMENT, "as_user_id": "2"}}, id="form"),
    pytest.param(
        "POST", ASSIGNMENTS, {"data": {**NEW_ASSIGNMENT, "as_user_id[]": "2"}}, id="form-array"
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"data": {**NEW_ASSIGNMENT, "as_user_id": "2"}, "files": ATTACHMENT},
        id="multipart",
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"json": {"assignment": {"name": "x"}, "as_user_id": 2}},
        id="json-top-level",
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"json": {"assignment": {"name": "x", "as_user_id": 2}}},
        id="json-nested",
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"json": [{"as_user_id": 2}]},
        id="json-in-array",
    ),
    pytest.param(
        "GET", "/api/v1/users/self", {"params": {"as_user_id": ["2", "3"]}}, id="query-repeated"
    ),
    pytest.param(
        "GET", "/api/v1/users/self", {"params": {"as_user_id[0]": "2"}}, id="query-indexed"
    ),
    pytest.param(
        "GET", "/api/v1/users/self", {"params": {"user[as_user_id]": "2"}}, id="query-nested"
    ),
    pytest.param(
        "GET", "/api/v1/users/self?user%5Bas_user_id%5D=2", {}, id="query-nested-encoded-brackets"
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"data": {**NEW_ASSIGNMENT, "assignment[as_user_id]": "2"}},
        id="form-nested",
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"data": {**NEW_ASSIGNMENT, "as_user_id": ["2", "3"]}},
        id="form-repeated",
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"data": {**NEW_ASSIGNMENT, "course[as_user_id]": "2"}, "files": ATTACHMENT},
        id="multipart-nested",
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"json": {"course": {"as_user_id": 1}, "assignment": {"name": "x"}}},
        id="json-nested-under-another-key",
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"json": {"assignment": {"name": "x"}, "assignment[as_user_id]": 2}},
        id="json-bracketed-key",
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"json": {"assignment": {"name": "x"}, "as_user_id[]": [2, 3]}},
        id="json-array-key",
    ),
]


@pytest.mark.parametrize(("method", "path", "request_args"), MASQUERADE)
async def test_masquerade_parameter_is_refused(
    env: BrokerEnv, method: str, path: str, request_args: dict[str, Any]
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    response = await env.http.request(method, path, headers=caller.headers, **request_args)
    await assert_refused(env, response, 403, "masquerade_denied", caller)


@pytest.mark.parametrize(("method", "path", "request_args"), MASQUERADE)
async def test_masquerade_parameter_is_forwarded_when_the_client_may_masquerade(
    env: BrokerEnv, method: str, path: str, request_args: dict[str, Any]
) -> None:
    caller = await make_caller(env, scopes=GRANT, allow_masquerade=True)
    response = await env.http.request(method, path, headers=caller.headers, **request_args)
    [received] = env.sim.state.received
    assert received.target == response.request.url.raw_path.decode()
    assert received.body == await response.request.aread()
    event = await last_proxy_event(env)
    assert (event["decision"], event["status"]) == ("allow", response.status_code)


async def test_masquerading_client_acts_as_the_user_it_names(env: BrokerEnv) -> None:
    caller = await make_caller(env, scopes=GRANT, allow_masquerade=True)
    response = await env.http.get(
        "/api/v1/users/self", params={"as_user_id": "2"}, headers=caller.headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["id"] == 2
    assert response.headers["x-sim-acting-user"] == "2"
    created = await env.http.post(
        ASSIGNMENTS,
        json={"assignment": {"name": "As Alan"}, "as_user_id": 2},
        headers=caller.headers,
    )
    assert created.status_code == 201, created.text
    assert created.json()["sim_created_by_user_id"] == 2


# Canvas's other masquerade keys (`load_user` in lib/authentication_methods.rb).
BECOME = [
    pytest.param("GET", "/api/v1/users/self", {"params": {"become_user_id": "2"}}, id="query"),
    pytest.param("GET", "/api/v1/users/self", {"params": {"become_teacher": "1"}}, id="teacher"),
    pytest.param("GET", "/api/v1/users/self", {"params": {"become_student": ""}}, id="student"),
    pytest.param("GET", "/api/v1/users/self?me", {}, id="me-bare"),
    pytest.param("GET", "/api/v1/users/self", {"params": {"me": "1"}}, id="me"),
    pytest.param(
        "POST", ASSIGNMENTS, {"data": {**NEW_ASSIGNMENT, "become_user_id": "2"}}, id="form"
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"data": {**NEW_ASSIGNMENT, "become_user_id": "2"}, "files": ATTACHMENT},
        id="multipart",
    ),
    pytest.param(
        "POST", ASSIGNMENTS, {"json": {"assignment": {"name": "x"}, "me": True}}, id="json"
    ),
]


@pytest.mark.parametrize(("method", "path", "request_args"), BECOME)
async def test_every_canvas_masquerade_parameter_is_refused(
    env: BrokerEnv, method: str, path: str, request_args: dict[str, Any]
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    response = await env.http.request(method, path, headers=caller.headers, **request_args)
    await assert_refused(env, response, 403, "masquerade_denied", caller)


@pytest.mark.parametrize(("method", "path", "request_args"), BECOME)
async def test_other_masquerade_parameters_are_forwarded_when_the_client_may_masquerade(
    env: BrokerEnv, method: str, path: str, request_args: dict[str, Any]
) -> None:
    caller = await make_caller(env, scopes=GRANT, allow_masquerade=True)
    response = await env.http.request(method, path, headers=caller.headers, **request_args)
    [received] = env.sim.state.received
    assert received.target == response.request.url.raw_path.decode()


INCLUDES = [
    pytest.param("GET", ASSIGNMENTS, {"params": {"include[]": "submission"}}, id="query"),
    pytest.param(
        "GET", ASSIGNMENTS, {"params": {"include[]": ["uuid", "rubric"]}}, id="query-mixed"
    ),
    pytest.param("GET", ASSIGNMENTS, {"params": {"includes[]": "user"}}, id="includes"),
    pytest.param("GET", ASSIGNMENTS, {"params": {"include": "submission"}}, id="scalar"),
    pytest.param("GET", ASSIGNMENTS, {"params": {"include[0]": "uuid"}}, id="indexed"),
    pytest.param(
        "POST", ASSIGNMENTS, {"data": {**NEW_ASSIGNMENT, "include[]": "rubric"}}, id="form"
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"data": {**NEW_ASSIGNMENT, "include[]": "rubric"}, "files": ATTACHMENT},
        id="multipart",
    ),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"json": {"assignment": {"name": "x"}, "include": ["rubric"]}},
        id="json",
    ),
    pytest.param(
        "POST", ASSIGNMENTS, {"json": {"assignment": {"name": "x"}, "include": "x"}}, id="json-str"
    ),
]


@pytest.mark.parametrize(("method", "path", "request_args"), INCLUDES)
async def test_include_other_than_uuid_is_refused_without_allow_includes(
    env: BrokerEnv, method: str, path: str, request_args: dict[str, Any]
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    response = await env.http.request(method, path, headers=caller.headers, **request_args)
    await assert_refused(env, response, 403, "include_not_allowed", caller)
    assert "allow_includes" in response.json()["errors"][0]["message"]


@pytest.mark.parametrize(("method", "path", "request_args"), INCLUDES)
async def test_include_is_forwarded_as_sent_when_the_client_allows_includes(
    env: BrokerEnv, method: str, path: str, request_args: dict[str, Any]
) -> None:
    caller = await make_caller(env, scopes=GRANT, allow_includes=True)
    response = await env.http.request(method, path, headers=caller.headers, **request_args)
    assert response.status_code < 400, response.text
    [received] = env.sim.state.received
    assert received.target == response.request.url.raw_path.decode()
    assert received.body == await response.request.aread()


@pytest.mark.parametrize(
    "request_args",
    [
        pytest.param({"params": {"include[]": "uuid"}}, id="query-uuid"),
        pytest.param({"params": {"include": "uuid"}}, id="query-scalar-uuid"),
        pytest.param({"json": {"assignment": {"name": "x"}, "include": ["uuid"]}}, id="json-uuid"),
        pytest.param({"params": {"assignment[include]": "x"}}, id="nested-key"),
    ],
)
async def test_uuid_include_and_nested_include_keys_need_no_flag(
    env: BrokerEnv, request_args: dict[str, Any]
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    method = "POST" if "json" in request_args else "GET"
    response = await env.http.request(method, ASSIGNMENTS, headers=caller.headers, **request_args)
    assert response.status_code < 400, response.text
    assert len(env.sim.state.received) == 1


OVERRIDE = [
    pytest.param({"params": {"_method": "DELETE"}}, id="query"),
    pytest.param({"data": {"_method": "DELETE"}}, id="form"),
    pytest.param({"data": {"_method": "DELETE"}, "files": ATTACHMENT}, id="multipart"),
    pytest.param({"headers": {"X-HTTP-Method-Override": "DELETE"}}, id="x-http-method-override"),
    pytest.param({"headers": {"X-HTTP-Method": "DELETE"}}, id="x-http-method"),
    pytest.param({"headers": {"X-Method-Override": "DELETE"}}, id="x-method-override"),
    pytest.param({"headers": {"x-http-method-override": "delete"}}, id="lower-case-header"),
    pytest.param({"params": {"_method": "delete"}}, id="query-lower-case-value"),
    pytest.param({"params": {"assignment[_method]": "DELETE"}}, id="query-nested"),
    pytest.param({"data": {"_method[]": "DELETE"}}, id="form-array"),
    pytest.param({"json": {"_method": "DELETE"}}, id="json"),
]


@pytest.mark.parametrize("request_args", OVERRIDE)
async def test_method_override_is_refused_and_a_granted_post_does_not_delete(
    env: BrokerEnv, request_args: dict[str, Any]
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    extra_headers = request_args.get("headers", {})
    body_args = {key: value for key, value in request_args.items() if key != "headers"}
    response = await env.http.post(
        ASSIGNMENT, headers={**caller.headers, **extra_headers}, **body_args
    )
    await assert_refused(env, response, 403, "method_override_denied", caller)
    still_there = await env.http.get(ASSIGNMENT, headers=caller.headers)
    assert still_there.status_code == 200
    assert env.sim.state.data.assignments[5001].deleted is False


CREDENTIALS = [
    pytest.param("GET", ASSIGNMENTS, {"params": {"access_token": "x"}}, id="query-access-token"),
    pytest.param("GET", ASSIGNMENTS, {"params": {"api_key": "x"}}, id="query-api-key"),
    pytest.param("POST", ASSIGNMENTS, {"data": {**NEW_ASSIGNMENT, "access_token": "x"}}, id="form"),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"data": {**NEW_ASSIGNMENT, "api_key": "x"}, "files": ATTACHMENT},
        id="multipart",
    ),
    pytest.param(
        "POST", ASSIGNMENTS, {"json": {"assignment": {"name": "x"}, "access_token": "x"}}, id="json"
    ),
    pytest.param("POST", ASSIGNMENTS, {"data": {**NEW_ASSIGNMENT, "api_key": "x"}}, id="form-key"),
    pytest.param(
        "POST",
        ASSIGNMENTS,
        {"data": {**NEW_ASSIGNMENT, "access_token": "x"}, "files": ATTACHMENT},
        id="multipart-access-token",
    ),
    pytest.param(
        "POST", ASSIGNMENTS, {"json": {"assignment": {"api_key": "x"}}}, id="json-nested-api-key"
    ),
    pytest.param(
        "GET", ASSIGNMENTS, {"params": {"user[access_token]": "x"}}, id="query-nested-access-token"
    ),
    pytest.param("GET", f"{ASSIGNMENTS}?access%5Ftoken=x", {}, id="query-encoded-name"),
]


@pytest.mark.parametrize(("method", "path", "request_args"), CREDENTIALS)
async def test_credential_parameter_is_refused(
    env: BrokerEnv, method: str, path: str, request_args: dict[str, Any]
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    response = await env.http.request(method, path, headers=caller.headers, **request_args)
    await assert_refused(env, response, 403, "credential_param_denied", caller)


async def test_client_authorization_and_cookies_are_never_forwarded(env: BrokerEnv) -> None:
    caller = await make_caller(env, scopes=GRANT)
    response = await env.http.get(
        ASSIGNMENTS,
        headers={
            **caller.headers,
            "Cookie": "_normandy_session=stolen; canvas_session=x",
            "Proxy-Authorization": "Basic c2VjcmV0",
        },
    )
    assert response.status_code == 200, response.text
    [received] = env.sim.state.received
    assert received.header_values("authorization") == [f"Bearer {WORKER_TOKEN}"]
    assert received.header("cookie") is None
    assert received.header("proxy-authorization") is None
    assert caller.token not in str(received.headers)
