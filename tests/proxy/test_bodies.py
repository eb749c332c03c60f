"""Request bodies are JSON, form or multipart, well formed and size-limited.

Contract: docs/proxy-rules.md#bodies.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from tests.proxy.support import assert_refused, make_caller

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.proxy.conftest import EnvFactory
    from tests.support.env import BrokerEnv

ASSIGNMENTS = "/api/v1/courses/1201/assignments"
LIMIT = 1024


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("text/plain", id="text-plain"),
        pytest.param("application/xml", id="xml"),
        pytest.param("application/octet-stream", id="octet-stream"),
        pytest.param(None, id="no-content-type"),
        pytest.param("json", id="malformed-type"),
    ],
)
async def test_body_of_unsupported_type_is_refused_with_415(
    env: BrokerEnv, content_type: str | None
) -> None:
    caller = await make_caller(env)
    headers = (
        caller.headers if content_type is None else {**caller.headers, "Content-Type": content_type}
    )
    response = await env.http.post(
        ASSIGNMENTS, content=b'{"assignment":{"name":"x"}}', headers=headers
    )
    await assert_refused(env, response, 415, "unsupported_media_type", caller)


async def test_empty_body_of_any_type_is_forwarded(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    response = await env.http.get(
        ASSIGNMENTS, headers={**caller.headers, "Content-Type": "text/plain"}
    )
    assert response.status_code == 200, response.text
    assert env.received == [ASSIGNMENTS]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        pytest.param("application/json", b'{"assignment": {"name": ', id="json-truncated"),
        pytest.param("application/json", b'{"assignment": NaN}', id="json-nan"),
        pytest.param("application/json", b'{"name": "caf\xe9"}', id="json-not-utf8"),
        pytest.param("application/vnd.api+json", b"[1,", id="json-api-truncated"),
        pytest.param("application/x-www-form-urlencoded", b"assignment[name]=%zz", id="form"),
        pytest.param("multipart/form-data", b"--x\r\n\r\n--x--\r\n", id="multipart-no-boundary"),
        pytest.param(
            "multipart/form-data; boundary=x", b"not multipart at all", id="multipart-garbage"
        ),
    ],
)
async def test_malformed_body_is_refused_with_400(
    env: BrokerEnv, content_type: str, body: bytes
) -> None:
    caller = await make_caller(env)
    response = await env.http.post(
        ASSIGNMENTS, content=body, headers={**caller.headers, "Content-Type": content_type}
    )
    await assert_refused(env, response, 400, "malformed_body", caller)


def _json_of_size(size: int) -> bytes:
    skeleton = json.dumps({"assignment": {"name": "Sized", "description": ""}}).encode()
    padded = json.dumps(
        {"assignment": {"name": "Sized", "description": "x" * (size - len(skeleton))}}
    ).encode()
    assert len(padded) == size
    return padded


async def _chunks(body: bytes, size: int = 256) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_body_over_the_limit_is_refused_with_413(make_env: EnvFactory) -> None:
    env = await make_env(max_body_bytes=LIMIT)
    caller = await make_caller(env)
    response = await env.http.post(
        ASSIGNMENTS,
        content=_json_of_size(LIMIT + 1),
        headers={**caller.headers, "Content-Type": "application/json"},
    )
    await assert_refused(env, response, 413, "body_too_large", caller)


async def test_chunked_body_over_the_limit_without_length_is_refused_with_413(
    make_env: EnvFactory,
) -> None:
    env = await make_env(max_body_bytes=LIMIT)
    caller = await make_caller(env)
    request = env.http.build_request(
        "POST",
        ASSIGNMENTS,
        content=_chunks(_json_of_size(4 * LIMIT)),
        headers={**caller.headers, "Content-Type": "application/json"},
    )
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    response = await env.http.send(request)
    await assert_refused(env, response, 413, "body_too_large", caller)


@pytest.mark.parametrize("chunked", [False, True], ids=["with-length", "chunked"])
async def test_body_at_the_limit_is_forwarded_byte_for_byte(
    make_env: EnvFactory, chunked: bool
) -> None:
    env = await make_env(max_body_bytes=LIMIT)
    caller = await make_caller(env)
    body = _json_of_size(LIMIT)
    content: Any = _chunks(body) if chunked else body
    response = await env.http.post(
        ASSIGNMENTS, content=content, headers={**caller.headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 201, response.text
    [received] = env.sim.state.received
    assert received.body == body
    assert received.header("content-length") == str(LIMIT)
    assert received.header("transfer-encoding") is None


async def test_declared_length_over_the_limit_is_refused_before_the_body_is_read(
    make_env: EnvFactory,
) -> None:
    env = await make_env(max_body_bytes=LIMIT)
    caller = await make_caller(env)
    read: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            read.append(1)
            yield b"x" * LIMIT

    request = env.http.build_request(
        "POST",
        ASSIGNMENTS,
        content=body(),
        headers={
            **caller.headers,
            "Content-Type": "application/json",
            "Content-Length": str(64 * LIMIT),
        },
    )
    response = await env.http.send(request)
    await assert_refused(env, response, 413, "body_too_large", caller)
    assert len(read) <= 1


MULTIPART_AS_USER = (
    b'--x\r\nContent-Disposition: form-data; name="as_user_id"\r\n\r\n2\r\n--x--\r\n'
)


@pytest.mark.parametrize(
    ("content_type", "body", "status", "error"),
    [
        pytest.param(
            "application/x-www-form-urlencoded",
            b'{"as_user_id": 2}',
            400,
            "malformed_body",
            id="form-type-json-object",
        ),
        pytest.param(
            "application/x-www-form-urlencoded; charset=utf-8",
            b'[{"x": "&as_user_id=2"}]',
            400,
            "malformed_body",
            id="form-type-json-array",
        ),
        pytest.param(
            "application/x-www-form-urlencoded",
            MULTIPART_AS_USER,
            400,
            "malformed_body",
            id="form-type-multipart-body",
        ),
        pytest.param(
            "application/json", b"as_user_id=2", 400, "malformed_body", id="json-type-form-body"
        ),
        pytest.param(
            "application/json",
            MULTIPART_AS_USER,
            400,
            "malformed_body",
            id="json-type-multipart-body",
        ),
        pytest.param(
            "multipart/form-data; boundary=x",
            b'{"as_user_id": 2}',
            400,
            "malformed_body",
            id="multipart-type-json-body",
        ),
        pytest.param(
            "multipart/form-data; boundary=y",
            MULTIPART_AS_USER,
            400,
            "malformed_body",
            id="multipart-wrong-boundary",
        ),
        pytest.param(
            "text/plain", b'{"as_user_id": 2}', 415, "unsupported_media_type", id="text-type-json"
        ),
        pytest.param(
            "text/x-json",
            b'{"as_user_id": 2}',
            415,
            "unsupported_media_type",
            id="rails-json-alias-type",
        ),
        pytest.param(
            "multipart/mixed; boundary=x",
            MULTIPART_AS_USER,
            415,
            "unsupported_media_type",
            id="multipart-mixed",
        ),
        pytest.param(
            "application/xml",
            b"<hash><as_user_id>2</as_user_id></hash>",
            415,
            "unsupported_media_type",
            id="xml",
        ),
    ],
)
async def test_body_whose_type_disagrees_with_its_content_is_refused(
    env: BrokerEnv, content_type: str, body: bytes, status: int, error: str
) -> None:
    caller = await make_caller(env)
    response = await env.http.post(
        ASSIGNMENTS, content=body, headers={**caller.headers, "Content-Type": content_type}
    )
    await assert_refused(env, response, status, error, caller)


async def test_two_content_types_are_refused_with_400(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    response = await env.http.post(
        ASSIGNMENTS,
        content=b'{"x": "&as_user_id=2"}',
        headers=[
            *caller.headers.items(),
            ("Content-Type", "application/json"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
    )
    await assert_refused(env, response, 400, "malformed_request", caller)


async def test_chunked_json_body_is_inspected_like_any_other(make_env: EnvFactory) -> None:
    env = await make_env(max_body_bytes=LIMIT)
    caller = await make_caller(env)
    body = b'{"assignment": {"name": "x"}, "as_user_id": 2}'
    request = env.http.build_request(
        "POST",
        ASSIGNMENTS,
        content=_chunks(body, size=5),
        headers={**caller.headers, "Content-Type": "application/json"},
    )
    assert request.headers["transfer-encoding"] == "chunked"
    response = await env.http.send(request)
    await assert_refused(env, response, 403, "masquerade_denied", caller)
