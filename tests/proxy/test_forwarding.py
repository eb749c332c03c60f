"""Allowed calls are forwarded exactly, with the worker token, and audited."""

from __future__ import annotations

import gzip
import json
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.proxy.support import (
    add_upstream_caller,
    fetch_raw,
    last_proxy_event,
    make_caller,
    serve_raw,
)
from tests.support.env import WORKER_TOKEN, bearer

if TYPE_CHECKING:
    from tests.support.env import BrokerEnv

ASSIGNMENTS = "/api/v1/courses/1201/assignments"


async def test_allowed_call_is_forwarded_with_worker_token(env: BrokerEnv) -> None:
    token = await env.client_token()
    response = await env.http.get("/api/v1/courses/1201/assignments", headers=bearer(token))
    assert response.status_code == 200
    assert isinstance(response.json(), list)
    [received] = env.sim.state.received
    assert received.raw_path == "/api/v1/courses/1201/assignments"
    assert received.header_values("authorization") == [f"Bearer {WORKER_TOKEN}"]
    assert response.headers["x-request-id"]


async def test_path_query_and_body_are_forwarded_exactly_as_sent(env: BrokerEnv) -> None:
    caller = await make_caller(env, allow_includes=True)
    query = "include[]=submission&search_term=Week%201+ex&order_by=due_at;per_page=5"
    response = await env.http.get(f"{ASSIGNMENTS}?{query}", headers=caller.headers)
    assert response.status_code == 200, response.text
    body = b'{ "assignment" : {"name": "Caf\\u00e9 \xe2\x98\x95", "points_possible": 1.50} }'
    created = await env.http.post(
        ASSIGNMENTS, content=body, headers={**caller.headers, "Content-Type": "application/json"}
    )
    assert created.status_code == 201, created.text
    listed, posted = env.sim.state.received
    assert (listed.method, listed.raw_path, listed.query_string) == ("GET", ASSIGNMENTS, query)
    assert (posted.method, posted.raw_path, posted.body) == ("POST", ASSIGNMENTS, body)
    assert posted.header("content-type") == "application/json"


async def test_head_is_checked_as_get_and_forwarded(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    response = await env.http.head(ASSIGNMENTS, headers=caller.headers)
    assert response.status_code == 200
    assert response.content == b""
    assert [(r.method, r.raw_path) for r in env.sim.state.received] == [("HEAD", ASSIGNMENTS)]


async def test_upstream_errors_are_passed_on_as_canvas_sent_them(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    response = await env.http.get("/api/v1/courses/999999", headers=caller.headers)
    assert response.status_code == 404
    assert response.json() == {"errors": [{"message": "The specified resource does not exist."}]}
    event = await last_proxy_event(env)
    assert (event["decision"], event["status"], event["upstream_status"]) == ("allow", 404, 404)


async def test_set_cookie_is_dropped_and_canvas_headers_pass_through(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    response = await env.http.get(ASSIGNMENTS, headers=caller.headers)
    assert response.status_code == 200, response.text
    assert "set-cookie" not in response.headers
    assert not env.http.cookies
    assert response.headers["x-request-cost"] == "1.0"
    assert float(response.headers["x-rate-limit-remaining"]) > 0
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers["cache-control"] == "max-age=0, private, must-revalidate"
    assert response.headers["link"].startswith(f"<http://broker.test{ASSIGNMENTS}?")
    context_id = response.headers["x-request-context-id"]
    event = await last_proxy_event(env)
    assert event["canvas_context_id"] == context_id
    assert response.headers.get_list("x-request-id") == [event["request_id"]]


async def test_allowed_calls_do_not_share_cookies_through_the_client_jar(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    for _ in range(2):
        response = await env.http.get(ASSIGNMENTS, headers=caller.headers)
        assert response.status_code == 200
    assert [r.header("cookie") for r in env.sim.state.received] == [None, None]


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        pytest.param(ASSIGNMENTS, True, 200, id="allowed"),
        pytest.param("/api/v1/courses/999999", True, 404, id="upstream-404"),
        pytest.param("/api/v1/accounts/1/courses", True, 403, id="refused"),
        pytest.param(ASSIGNMENTS, False, 401, id="no-token"),
        pytest.param("/api/v1//courses", True, 400, id="non-canonical"),
    ],
)
async def test_every_response_carries_a_request_id(
    env: BrokerEnv, path: str, headers: bool, status: int
) -> None:
    caller = await make_caller(env)
    response = await env.http.get(path, headers=caller.headers if headers else {})
    assert response.status_code == status
    [request_id] = response.headers.get_list("x-request-id")
    assert request_id
    assert (await last_proxy_event(env))["request_id"] == request_id


async def test_gzipped_body_reaches_the_client_byte_for_byte(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    headers = {"Accept-Encoding": "gzip"}
    response, body = await fetch_raw(env.http, ASSIGNMENTS, {**caller.headers, **headers})
    assert response.status_code == 200, body
    [received] = env.sim.state.received
    assert received.header_values("accept-encoding") == ["gzip"]
    async with httpx.AsyncClient(base_url=env.sim.base_url) as direct:
        upstream, upstream_body = await fetch_raw(
            direct, ASSIGNMENTS, {**headers, "Authorization": f"Bearer {WORKER_TOKEN}"}
        )
    assert upstream.headers["content-encoding"] == "gzip"
    assert response.headers["content-encoding"] == "gzip"
    assert body == upstream_body
    assert response.headers["content-length"] == str(len(body))
    assert json.loads(gzip.decompress(body))[0]["id"] == 5001


async def test_identity_request_gets_an_uncompressed_body(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    response, body = await fetch_raw(
        env.http, ASSIGNMENTS, {**caller.headers, "Accept-Encoding": "identity"}
    )
    assert "content-encoding" not in response.headers
    assert json.loads(body)[0]["id"] == 5001


async def test_allowed_call_leaves_a_complete_audit_event(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    response, body = await fetch_raw(
        env.http,
        f"{ASSIGNMENTS}?password=hunter2&per_page=5",
        {**caller.headers, "User-Agent": "nightly-sync/1.0"},
    )
    assert response.status_code == 200, body
    [received] = env.sim.state.received
    assert received.query_string == "password=hunter2&per_page=5"
    event = await last_proxy_event(env)
    assert event["state"] == "complete"
    assert event["decision"] == "allow"
    assert event["reason"] is None
    assert event["request_id"] == response.headers["x-request-id"]
    assert (event["client_id"], event["token_id"]) == (caller.client_id, caller.token_id)
    assert event["credential_id"]
    assert event["upstream"] == "sim"
    assert (event["method"], event["path"]) == ("GET", ASSIGNMENTS)
    assert event["scope"] == "url:GET|/api/v1/courses/:course_id/assignments"
    assert (event["status"], event["upstream_status"]) == (200, 200)
    assert event["response_bytes"] == len(body)
    assert event["duration_ms"] > 0
    assert event["canvas_context_id"] == response.headers["x-request-context-id"]
    assert event["source_ip"] == "127.0.0.1"
    assert event["user_agent"] == "nightly-sync/1.0"
    hashed = env.context.keyring.audit_hmac("hunter2")
    assert event["query"] == f"password={hashed}&per_page=5"
    exported = json.dumps(await env.audit())
    assert "hunter2" not in exported
    assert caller.token not in exported
    assert WORKER_TOKEN not in exported


async def test_response_carries_only_the_brokers_request_id(env: BrokerEnv) -> None:
    reply = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/json; charset=utf-8\r\n"
        b"X-Request-Id: canvas-request-1\r\n"
        b"X-Request-Context-Id: canvas-context-1\r\n"
        b"Content-Length: 2\r\n"
        b"\r\n"
        b"{}"
    )
    async with serve_raw(reply) as upstream:
        caller = await add_upstream_caller(env, "rails", upstream.base_url)
        response = await env.http.get("/api/v1/courses/1201", headers=caller.headers)
    assert response.status_code == 200, response.text
    event = await last_proxy_event(env)
    assert response.headers.get_list("x-request-id") == [event["request_id"]]
    assert response.headers["x-request-context-id"] == "canvas-context-1"
    assert event["canvas_context_id"] == "canvas-context-1"
