"""An upstream that is down or silent gets a bounded 502/504.

Contract: docs/proxy-rules.md#timeouts-and-pooling, #worker-token-never-relayed.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import pytest

from broker.app import create_app
from tests.proxy.support import add_upstream_caller, last_proxy_event, serve_raw

if TYPE_CHECKING:
    import httpx
    from starlette.types import Message

    from tests.proxy.conftest import EnvFactory
    from tests.proxy.support import Caller
    from tests.support.env import BrokerEnv

COURSE = "/api/v1/courses/1201"
# Far above the configured timeouts: only reached if the broker does not give up by itself.
BOUND = 10


async def _assert_upstream_failure(
    env: BrokerEnv, response: httpx.Response, caller: Caller, status: int, error: str
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    request_id = response.headers["x-request-id"]
    assert response.json() == {
        "errors": [{"message": response.json()["errors"][0]["message"]}],
        "error": error,
        "request_id": request_id,
    }
    assert env.sim.state.received == []
    event = await last_proxy_event(env)
    assert event["request_id"] == request_id
    assert (event["state"], event["status"], event["reason"]) == ("complete", status, error)
    assert (event["client_id"], event["token_id"]) == (caller.client_id, caller.token_id)
    assert event["duration_ms"] is not None
    return event


async def test_unreachable_upstream_is_a_502(env: BrokerEnv, closed_port: int) -> None:
    caller = await add_upstream_caller(env, "dead", f"http://127.0.0.1:{closed_port}")
    async with asyncio.timeout(BOUND):
        response = await env.http.get(COURSE, headers=caller.headers)
    event = await _assert_upstream_failure(env, response, caller, 502, "upstream_unreachable")
    assert event["upstream"] == "dead"
    assert event["upstream_status"] is None


async def test_upstream_that_never_answers_is_a_504(make_env: EnvFactory) -> None:
    env = await make_env(upstream_timeout=0.2)
    async with serve_raw(None) as silent:
        caller = await add_upstream_caller(env, "silent", silent.base_url)
        async with asyncio.timeout(BOUND):
            response = await env.http.get(COURSE, headers=caller.headers)
        assert silent.requests == 1
    event = await _assert_upstream_failure(env, response, caller, 504, "upstream_timeout")
    assert event["upstream_status"] is None


TRUNCATED_JSON = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: 1000\r\n"
    b"\r\n"
    b'{"id": 1201, "na'
)


async def test_upstream_failing_before_a_json_body_is_complete_is_a_502(env: BrokerEnv) -> None:
    async with serve_raw(TRUNCATED_JSON) as upstream:
        caller = await add_upstream_caller(env, "flaky", upstream.base_url)
        async with asyncio.timeout(BOUND):
            response = await env.http.get(COURSE, headers=caller.headers)
    event = await _assert_upstream_failure(env, response, caller, 502, "upstream_unreachable")
    assert event["upstream_status"] == 200


TRUNCATED_FILE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/pdf\r\n"
    b"Content-Length: 1000\r\n"
    b"\r\n" + b"%PDF" * 4
)


async def test_upstream_failing_mid_stream_leaves_the_response_unfinished(
    env: BrokerEnv,
) -> None:
    # Once the head is sent, the only honest signal left is a response that never completes
    # (the server then drops the connection); httpx's ASGI transport cannot show that, so the
    # app is driven directly here.
    async with serve_raw(TRUNCATED_FILE) as upstream:
        caller = await add_upstream_caller(env, "flaky", upstream.base_url)
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": COURSE,
            "raw_path": COURSE.encode(),
            "query_string": b"",
            "headers": [
                (b"host", b"broker.test"),
                (b"authorization", caller.headers["Authorization"].encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("broker.test", 80),
            "root_path": "",
        }
        async with asyncio.timeout(BOUND):
            await create_app(context=env.context)(scope, receive, send)
    start, *bodies = sent
    assert (start["type"], start["status"]) == ("http.response.start", 200)
    assert b"".join(m.get("body", b"") for m in bodies) == b"%PDF" * 4
    assert all(m.get("more_body", False) for m in bodies)
    event = await last_proxy_event(env)
    assert (event["status"], event["upstream_status"]) == (200, 200)
    assert (event["reason"], event["response_bytes"]) == ("upstream_body_failed", 16)


@pytest.mark.parametrize(
    "header",
    [
        b"Location: https://files.example.invalid/x?access_token=leak-worker-token",
        b"Location: https://files.example.invalid/x?access_token=leak%2Dworker%2Dtoken",
        b"X-Debug: Bearer leak-worker-token",
        b'Link: <https://elsewhere.invalid/?t=leak-worker-token>; rel="next"',
    ],
)
async def test_response_header_carrying_the_worker_token_is_not_relayed(
    env: BrokerEnv, header: bytes
) -> None:
    reply = b"HTTP/1.1 302 Found\r\n" + header + b"\r\nContent-Length: 0\r\n\r\n"
    async with serve_raw(reply) as upstream:
        caller = await add_upstream_caller(env, "leak", upstream.base_url)
        async with asyncio.timeout(BOUND):
            response = await env.http.get(COURSE, headers=caller.headers)
        assert upstream.requests == 1
    event = await _assert_upstream_failure(
        env, response, caller, 502, "upstream_credential_exposed"
    )
    assert event["upstream_status"] == 302
    assert "leak-worker-token" not in response.text
    assert all("leak-worker-token" not in value for value in response.headers.values())
    assert "worker-token" not in json.dumps(event)


def _metric(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return 0.0


async def test_canvas_rejecting_the_worker_token_is_audited_and_counted_as_a_credential_failure(
    env: BrokerEnv,
) -> None:
    stale = "stale-worker-token-revoked-in-canvas"
    rotated = await env.http.post(
        "/broker/v1/credentials/worker/rotate",
        headers=env.admin(),
        json={"token": stale, "verify": False},
    )
    credential_id = rotated.json()["id"]
    token = await env.client_token()
    response = await env.http.get(COURSE, headers={"Authorization": f"Bearer {token}"})
    # Canvas's own answer is relayed: the script sees what Canvas said.
    assert response.status_code == 401
    [received] = env.sim.state.received
    assert received.header("authorization") == f"Bearer {stale}"
    event = await last_proxy_event(env)
    assert (event["decision"], event["reason"], event["upstream_status"]) == (
        "allow",
        "upstream_credential_rejected",
        401,
    )
    text = (await env.http.get("/metrics")).text
    labels = f'credential="{credential_id}"'
    assert _metric(text, "broker_upstream_credential_failures_total", labels) == 1
    assert stale not in text


async def test_canvas_401_without_an_invalid_token_challenge_is_not_a_credential_failure(
    env: BrokerEnv,
) -> None:
    token = await env.client_token(allow_masquerade=True)
    # The simulator, like Canvas, answers a bad as_user_id with a 401 and no challenge.
    response = await env.http.get(
        COURSE, params={"as_user_id": "999999"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 401
    assert env.sim.state.received_paths() == [COURSE]
    event = await last_proxy_event(env)
    assert (event["reason"], event["upstream_status"]) == (None, 401)
    text = (await env.http.get("/metrics")).text
    assert "broker_upstream_credential_failures_total{" not in text


HUGE_HEAD = (
    b"HTTP/1.1 200 OK\r\nX-Huge: " + b"a" * (1024 * 1024) + b"\r\nContent-Length: 2\r\n\r\n[]"
)
MANY_FIELDS = (
    b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-F%d: v\r\n" % n for n in range(500))
    + b"Content-Length: 2\r\n\r\n[]"
)


@pytest.mark.parametrize(
    ("reply", "problem"),
    [(HUGE_HEAD, "head is over"), (MANY_FIELDS, "header fields")],
    ids=["head-bytes", "header-count"],
)
async def test_an_oversized_response_head_is_a_502_and_nothing_of_it_is_relayed(
    env: BrokerEnv, reply: bytes, problem: str
) -> None:
    # docs/proxy-rules.md#upstream-limits
    async with serve_raw(reply) as upstream:
        caller = await add_upstream_caller(env, "bloated", upstream.base_url)
        async with asyncio.timeout(BOUND):
            response = await env.http.get(COURSE, headers=caller.headers)
        assert upstream.requests == 1
    event = await _assert_upstream_failure(env, response, caller, 502, "upstream_unreachable")
    assert problem in response.json()["errors"][0]["message"]
    assert "x-huge" not in response.headers
    assert "x-f1" not in response.headers
    assert event["upstream_status"] is None
