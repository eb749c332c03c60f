"""Only canonical paths, and only Canvas API paths, are forwarded.

Contract: docs/proxy-rules.md#canonical-paths, #only-canvas-api-paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.proxy.support import assert_refused, last_proxy_event, make_caller, send_raw

if TYPE_CHECKING:
    import httpx

    from tests.support.env import BrokerEnv

GRANT = (
    "url:GET|/api/v1/courses/:id",
    "url:GET|/api/v1/users/:user_id",
    "url:GET|/api/v1/courses/:course_id/assignments",
)

NON_CANONICAL = [
    pytest.param(b"/api/v1/courses/../users/1", id="dot-dot"),
    pytest.param(b"/api/v1/courses/1201/..", id="trailing-dot-dot"),
    pytest.param(b"/api/v1/courses/./1201", id="dot"),
    pytest.param(b"/api/v1/courses/%2e%2e/users/1", id="encoded-dot-dot"),
    pytest.param(b"/api/v1/courses/%2E%2E/users/1", id="encoded-dot-dot-upper"),
    pytest.param(b"/api/v1/courses/%2e", id="encoded-dot"),
    pytest.param(b"/api/v1/courses/1201%2Fassignments", id="encoded-slash"),
    pytest.param(b"/api/v1/courses/1201%2fassignments", id="encoded-slash-lower"),
    pytest.param(b"/api/v1/courses/1201%5Cassignments", id="encoded-backslash"),
    pytest.param(b"/api/v1/courses/1201\\assignments", id="backslash"),
    pytest.param(b"/api/v1/courses//1201", id="empty-segment"),
    pytest.param(b"//api/v1/courses/1201", id="leading-double-slash"),
    pytest.param(b"/api/v1/courses/1201%00", id="encoded-nul"),
    pytest.param(b"/api/v1/courses/1201\x00", id="nul"),
    pytest.param(b"/api/v1/courses/12%0a01", id="encoded-newline"),
    pytest.param(b"/api/v1/courses/%252e%252e", id="double-encoded-dot-dot"),
    pytest.param("/api/v1/users/caf\u00e9".encode(), id="non-ascii-utf8"),
    pytest.param(b"/api/v1/users/caf\xe9", id="non-ascii-latin1"),
    pytest.param(b"/api/v1/courses/1201%", id="bad-percent"),
    pytest.param(b"/api/v1/courses/%2e%2E/users/1", id="encoded-dot-dot-mixed-case"),
    pytest.param(b"/api/v1/courses/.%2e/users/1", id="half-encoded-dot-dot"),
    pytest.param(b"/api/v1/courses/%2E./users/1", id="other-half-encoded-dot-dot"),
    pytest.param(b"/api/v1/courses/%252E%252E/users/1", id="double-encoded-dot-dot-upper"),
    pytest.param(b"/api/v1/courses/%25%32%65%25%32%65/users/1", id="double-encoded-fully"),
    pytest.param(b"/api/v1/courses/1201%252Fassignments", id="double-encoded-slash"),
    pytest.param(b"/api/v1/courses/1201%255cassignments", id="double-encoded-backslash"),
    pytest.param(b"/api/v1/courses/%C0%AE%C0%AE/users/1", id="overlong-utf8-dot-dot"),
    pytest.param(b"/api/v1/courses/1201%c0%afassignments", id="overlong-utf8-slash"),
    pytest.param(b"/api/v1/courses/%u002e%u002e/users/1", id="iis-unicode-escape"),
    pytest.param(b"/api/v1/courses/1201/assignments/", id="trailing-slash"),
    pytest.param(b"/api/v1/courses/1201;as_user_id=2/assignments", id="semicolon-parameter"),
    pytest.param(b"/api/v1/courses/1201/assignments;", id="trailing-semicolon"),
    pytest.param(b"/api/v1/courses/1201\x01/assignments", id="control-byte"),
    pytest.param(b"/api/v1/courses/1201/assignments#x", id="fragment"),
    pytest.param(b"/api/v1/courses/1201%3Fas_user_id=2", id="encoded-question-mark"),
    pytest.param(b"/api/v1/courses/1201%3fas_user_id=2", id="encoded-question-mark-lower"),
    pytest.param(b"/api/v1/courses/1201%23x/assignments", id="encoded-hash"),
    pytest.param(b"/api/v1/courses/1201%3Bas_user_id=2", id="encoded-semicolon"),
    pytest.param(b"/api/v1/courses/1201%3b_method=DELETE", id="encoded-semicolon-lower"),
]


def _escaped(raw: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)


@pytest.mark.parametrize("raw_path", NON_CANONICAL)
async def test_non_canonical_path_is_refused_with_400(
    env: BrokerEnv, raw_http: httpx.AsyncClient, raw_path: bytes
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    response = await send_raw(raw_http, "GET", raw_path, caller.headers)
    event = await assert_refused(env, response, 400, "non_canonical_path", caller)
    # The audit log shows the path the proxy received, odd bytes escaped.
    assert event["path"] == _escaped(raw_path)


async def test_path_over_the_length_limit_is_refused_with_414(
    env: BrokerEnv, raw_http: httpx.AsyncClient
) -> None:
    caller = await make_caller(env, scopes=("url:GET|/api/v1/files/*path",))
    raw_path = b"/api/v1/files/" + b"a/" * 1100
    response = await send_raw(raw_http, "GET", raw_path, caller.headers)
    event = await assert_refused(env, response, 414, "path_too_long", caller)
    assert event["path"] == raw_path.decode()[:2048]


@pytest.mark.parametrize("suffix", [b".xml", b".json.json", b".JSON", b".js", b".", b".json/"])
async def test_format_suffix_other_than_json_is_refused(
    env: BrokerEnv, raw_http: httpx.AsyncClient, suffix: bytes
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    raw_path = b"/api/v1/courses/1201/assignments" + suffix
    response = await send_raw(raw_http, "GET", raw_path, caller.headers)
    if suffix.endswith(b"/"):
        await assert_refused(env, response, 400, "non_canonical_path", caller)
    else:
        await assert_refused(env, response, 403, "scope_not_granted", caller)


@pytest.mark.parametrize(
    "path", ["/api/v1/courses/1201/assignments.json", "/api/v1/courses/1201.json"]
)
async def test_json_format_suffix_is_forwarded_as_sent(env: BrokerEnv, path: str) -> None:
    caller = await make_caller(
        env, scopes=GRANT, constraints={"course_id": ["1201"], "id": ["1201"]}
    )
    response = await env.http.get(path, headers=caller.headers)
    assert response.status_code == 200, response.text
    assert env.received == [path]


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/api/v1/courses/1202.json", "constraint_violation"),
        ("/api/v1/courses/1201.xml", "constraint_violation"),
        ("/api/v1/courses/1201.json.json", "constraint_violation"),
        ("/api/v1/courses/1201.json/assignments", "constraint_violation"),
        ("/api/v1/courses/1201/assignments.xml", "scope_not_granted"),
    ],
)
async def test_format_suffix_never_widens_a_constraint(
    env: BrokerEnv, path: str, error: str
) -> None:
    caller = await make_caller(
        env, scopes=GRANT, constraints={"course_id": ["1201"], "id": ["1201"]}
    )
    response = await env.http.get(path, headers=caller.headers)
    await assert_refused(env, response, 403, error, caller)


@pytest.mark.parametrize("method", ["get", "Get", "gET", "post"])
async def test_method_in_another_case_matches_no_scope(
    env: BrokerEnv, raw_http: httpx.AsyncClient, method: str
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    response = await send_raw(raw_http, method, b"/api/v1/courses/1201/assignments", caller.headers)
    event = await assert_refused(env, response, 403, "scope_not_granted", caller)
    assert event["method"] == method


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/Courses/1201/assignments",
        "/api/v1/courses/1201/Assignments",
        "/api/v1/COURSES/1201/ASSIGNMENTS",
    ],
)
async def test_path_in_another_case_matches_no_scope(env: BrokerEnv, path: str) -> None:
    caller = await make_caller(env, scopes=GRANT)
    response = await env.http.get(path, headers=caller.headers)
    await assert_refused(env, response, 403, "scope_not_granted", caller)


async def test_non_canonical_path_without_token_is_still_400(
    env: BrokerEnv, raw_http: httpx.AsyncClient
) -> None:
    response = await send_raw(raw_http, "GET", b"/api/v1/courses/../users/1", {})
    await assert_refused(env, response, 400, "non_canonical_path")


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(b"search_term=a\x00b", id="nul"),
        pytest.param(b"search_term=a b", id="space"),
        pytest.param(b"search_term=a\r\nX-Injected: 1", id="crlf"),
        pytest.param("search_term=caf\u00e9".encode(), id="non-ascii"),
    ],
)
async def test_query_with_raw_unprintable_bytes_is_refused_with_400(
    env: BrokerEnv, raw_http: httpx.AsyncClient, query: bytes
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    raw = b"/api/v1/courses/1201/assignments?" + query
    response = await send_raw(raw_http, "GET", raw, caller.headers)
    event = await assert_refused(env, response, 400, "malformed_request", caller)
    assert event["query"] == _escaped(query)


async def test_raw_transport_forwards_a_canonical_path_byte_for_byte(
    env: BrokerEnv, raw_http: httpx.AsyncClient
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    raw_path = b"/api/v1/courses/sis_course_id%3ASIS-1201"
    response = await send_raw(raw_http, "GET", raw_path, caller.headers)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == 1201
    [received] = env.sim.state.received
    assert received.raw_path == raw_path.decode()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/login/session_token"),
        ("GET", "/login/session_token"),
        ("GET", "/login/session_token?return_to=/courses/1202"),
        ("POST", "/login/oauth2/token"),
        ("POST", "/api/graphql"),
        ("GET", "/api/graphql"),
        ("POST", "/api/graphql.json"),
        ("POST", "/API/graphql"),
        ("GET", "/API/v1/courses/1201"),
        ("GET", "/api/V1/courses/1201"),
        ("GET", "/Api/v1/courses/1201"),
        ("GET", "/some/other/path"),
        ("GET", "/api/v2/courses/1201"),
        ("GET", "/api/v1"),
        ("GET", "/"),
    ],
)
async def test_path_outside_the_canvas_api_is_refused_when_no_scope_names_it(
    env: BrokerEnv, method: str, path: str
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    response = await env.http.request(method, path, headers=caller.headers)
    await assert_refused(env, response, 403, "path_not_proxied", caller)


@pytest.mark.parametrize(
    ("scope", "path", "body"),
    [
        ("url:POST|/login/session_token", "/login/session_token", "session_url"),
        ("url:POST|/api/graphql", "/api/graphql", "data"),
    ],
)
async def test_path_outside_the_canvas_api_is_forwarded_when_a_scope_names_it_exactly(
    env: BrokerEnv, scope: str, path: str, body: str
) -> None:
    caller = await make_caller(env, scopes=[scope])
    response = await env.http.post(path, headers=caller.headers, json={"query": "{}"})
    assert response.status_code == 200, response.text
    assert body in response.json()
    assert env.received == [path]
    event = await last_proxy_event(env)
    assert (event["decision"], event["scope"], event["status"]) == ("allow", scope, 200)


@pytest.mark.parametrize(
    "scope",
    [
        "url:POST|/login/:action",
        "url:POST|/login/*rest",
        "url:POST|/api/:endpoint",
        "url:POST|/api/graphql(.:format)",
    ],
)
async def test_pattern_scope_outside_the_canvas_api_is_refused_when_the_grant_is_saved(
    env: BrokerEnv, scope: str
) -> None:
    response = await env.http.post(
        "/broker/v1/clients",
        headers=env.admin(),
        json={"name": "job", "credential": "worker", "scopes": [GRANT[0], scope]},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_field"
    assert repr(scope) in response.json()["message"]
    listed = await env.http.get("/broker/v1/clients", headers=env.admin())
    assert listed.json() == []


@pytest.mark.parametrize(
    ("scope", "path"),
    [
        ("url:GET|/api/v1/*path", "/api/v1/login/session_token"),
        ("url:GET|/api/v1/:a/:b", "/api/v1/login/session_token"),
        ("url:GET|/api/v1/*path", "/api/v1/login/session_token.json"),
        ("url:POST|/api/v1/users/:user_id/*rest", "/api/v1/users/self/tokens"),
        ("url:POST|/api/v1/:endpoint", "/api/v1/inst_access_tokens"),
    ],
)
async def test_pattern_scope_never_reaches_an_exact_only_endpoint(
    env: BrokerEnv, scope: str, path: str
) -> None:
    caller = await make_caller(env, scopes=[scope])
    method = scope.split("|", maxsplit=1)[0].removeprefix("url:")
    response = await env.http.request(method, path, headers=caller.headers)
    event = await assert_refused(env, response, 403, "exact_scope_required", caller)
    assert event["scope"] == scope


async def test_exact_only_endpoint_is_forwarded_through_the_scope_naming_it(
    env: BrokerEnv,
) -> None:
    scope = "url:GET|/api/v1/login/session_token"
    caller = await make_caller(env, scopes=["url:GET|/api/v1/*path", scope])
    await env.http.get("/api/v1/login/session_token", headers=caller.headers)
    assert env.received == ["/api/v1/login/session_token"]
    event = await last_proxy_event(env)
    assert (event["decision"], event["scope"]) == ("allow", scope)


async def test_sis_api_scope_is_forwarded_like_any_canvas_api_scope(env: BrokerEnv) -> None:
    scope = "url:GET|/api/sis/courses/:course_id/assignments"
    caller = await make_caller(env, scopes=[scope], constraints={"course_id": ["1201"]})
    await env.http.get("/api/sis/courses/1201/assignments", headers=caller.headers)
    assert env.received == ["/api/sis/courses/1201/assignments"]
    event = await last_proxy_event(env)
    assert (event["decision"], event["scope"]) == ("allow", scope)
    refused = await env.http.get("/api/sis/courses/1202/assignments", headers=caller.headers)
    assert refused.status_code == 403
    assert env.received == ["/api/sis/courses/1201/assignments"]


async def test_canvas_api_path_outside_the_grant_is_refused_as_scope_not_granted(
    env: BrokerEnv,
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    response = await env.http.delete("/api/v1/courses/1201", headers=caller.headers)
    await assert_refused(env, response, 403, "scope_not_granted", caller)


async def test_constraint_violation_is_refused_and_names_the_matched_scope(
    env: BrokerEnv,
) -> None:
    caller = await make_caller(env, scopes=GRANT, constraints={"id": ["1202"]})
    response = await env.http.get("/api/v1/courses/1201", headers=caller.headers)
    event = await assert_refused(env, response, 403, "constraint_violation", caller)
    assert event["scope"] == "url:GET|/api/v1/courses/:id"


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(("X-Job", "a\r\nX-Injected: 1"), id="crlf-in-value"),
        pytest.param(("X-Job", "a\x00b"), id="nul-in-value"),
        pytest.param(("X Job", "a"), id="space-in-name"),
    ],
)
async def test_header_that_is_not_valid_http_is_refused_with_400(
    env: BrokerEnv, header: tuple[str, str]
) -> None:
    caller = await make_caller(env, scopes=GRANT)
    response = await env.http.get("/api/v1/courses/1201", headers=[*caller.headers.items(), header])
    await assert_refused(env, response, 400, "malformed_request", caller)
