"""Helpers for the proxy tests: callers with known ids, raw request targets, refusal checks."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

import httpx

from tests.support.env import bearer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.types import ASGIApp, Receive, Scope, Send

    from tests.support.env import BrokerEnv

RAW_PATH = "raw_path"
"""Request extension carrying the exact path bytes for :class:`RawTargetTransport`."""
RAW_METHOD = "raw_method"
"""Request extension carrying a method exactly as sent (httpx upper-cases methods)."""


@dataclass(frozen=True)
class Caller:
    """A client with one live proxy token, and the ids the audit log should name."""

    token: str
    client_id: str
    token_id: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header for the token."""
        return bearer(self.token)


async def make_caller(env: BrokerEnv, name: str = "job", **options: Any) -> Caller:
    """Create a client through the API, mint one token and look its id up."""
    client_id, secret = await env.client(name, **options)
    token = await env.token(client_id, secret)
    response = await env.http.get(
        "/broker/v1/tokens", params={"client": client_id}, headers=env.admin()
    )
    assert response.status_code == 200, response.text
    [listed] = response.json()
    return Caller(token=token, client_id=client_id, token_id=listed["id"], secret=secret)


async def last_proxy_event(env: BrokerEnv) -> dict[str, Any]:
    """The newest proxy audit event."""
    events = await env.audit(kind="proxy")
    assert events, "no proxy audit event"
    return events[0]


async def assert_refused(
    env: BrokerEnv,
    response: httpx.Response,
    status: int,
    error: str,
    caller: Caller | None = None,
) -> dict[str, Any]:
    """Check a Canvas-shaped refusal that nothing reached Canvas and the audit log shows.

    ``caller`` is who the audit event must name (None: nobody, the token was not usable).
    Returns the audit event.
    """
    assert response.status_code == status, response.text
    request_id = response.headers["x-request-id"]
    body = response.json()
    assert body == {
        "errors": [{"message": body["errors"][0]["message"]}],
        "error": error,
        "request_id": request_id,
    }
    assert isinstance(body["errors"][0]["message"], str)
    assert body["errors"][0]["message"]
    assert env.sim.state.received == []
    event = await last_proxy_event(env)
    assert event["request_id"] == request_id
    assert (event["decision"], event["reason"], event["status"]) == ("deny", error, status)
    assert event["client_id"] == (caller.client_id if caller else None)
    assert event["token_id"] == (caller.token_id if caller else None)
    assert event["upstream_status"] is None
    return event


async def fetch_raw(
    http: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> tuple[httpx.Response, bytes]:
    """GET ``url`` and return the response with its body exactly as sent (not decoded)."""
    async with http.stream("GET", url, headers=headers) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    return response, raw


class RawTargetTransport(httpx.AsyncBaseTransport):
    """``ASGITransport`` that delivers a request path byte for byte, as a real server does.

    httpx removes ``.``/``..`` segments and percent-encodes non-ASCII characters when it parses
    a URL. A server such as uvicorn passes the request target on untouched as
    ``scope["raw_path"]``, so for a request carrying the :data:`RAW_PATH` extension (a path,
    optionally with ``?query``) this transport puts those bytes into the scope, the
    percent-decoded path into ``path`` and the query into ``query_string``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send the request to the app, with the raw path if one was given."""
        raw = request.extensions.get(RAW_PATH)
        method = request.extensions.get(RAW_METHOD)
        app = self._app
        if isinstance(raw, bytes):
            app = _with_raw_path(app, raw)
        if isinstance(method, str):
            app = _with_method(app, method)
        return await httpx.ASGITransport(app=app).handle_async_request(request)


def _with_raw_path(app: ASGIApp, raw: bytes) -> ASGIApp:
    raw_path, _, query = raw.partition(b"?")
    path = unquote_to_bytes(raw_path).decode("utf-8", "surrogateescape")

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        await app(
            {**scope, "raw_path": raw_path, "path": path, "query_string": query}, receive, send
        )

    return wrapped


def _with_method(app: ASGIApp, method: str) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, "method": method}, receive, send)

    return wrapped


async def send_raw(
    http: httpx.AsyncClient,
    method: str,
    raw_path: bytes,
    headers: dict[str, str],
    **kwargs: Any,
) -> httpx.Response:
    """Send ``method raw_path`` (which may include ``?query``) through a raw-target client.

    The method reaches the app exactly as given, lower case included.
    """
    return await http.request(
        method,
        "/api/v1/placeholder",
        headers=headers,
        extensions={RAW_PATH: raw_path, RAW_METHOD: method},
        **kwargs,
    )


@dataclass
class RawUpstream:
    """A loopback TCP server that reads requests and answers with fixed bytes (or never)."""

    reply: bytes | None
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    requests: int = 0

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        if self.reply is not None:
            writer.write(self.reply)
            await writer.drain()
            writer.close()
            return
        # Never answer; return when the broker gives up and closes the connection.
        while await reader.read(65536):
            pass
        writer.close()


@asynccontextmanager
async def serve_raw(reply: bytes | None) -> AsyncIterator[RawUpstream]:
    """Serve a :class:`RawUpstream` answering ``reply`` (None: never answer)."""
    upstream = RawUpstream(reply)
    upstream.server = await asyncio.start_server(upstream._handle, "127.0.0.1", 0)
    try:
        yield upstream
    finally:
        upstream.server.close()
        for writer in upstream.writers:
            writer.close()
        await upstream.server.wait_closed()


async def add_upstream_caller(env: BrokerEnv, name: str, base_url: str, **options: Any) -> Caller:
    """Register another upstream with its own worker credential and client; return the caller."""
    response = await env.http.post(
        "/broker/v1/upstreams", headers=env.admin(), json={"name": name, "base_url": base_url}
    )
    assert response.status_code == 201, response.text
    response = await env.http.post(
        "/broker/v1/credentials",
        headers=env.admin(),
        # Test upstreams answer only what a test needs, so the token is not checked with them.
        json={
            "upstream": name,
            "name": f"{name}-worker",
            "token": f"{name}-worker-token",
            "verify": False,
        },
    )
    assert response.status_code == 201, response.text
    return await make_caller(env, f"{name}-job", credential=f"{name}-worker", **options)
