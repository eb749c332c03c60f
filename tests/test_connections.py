"""Client connections are bounded: head and keep-alive timeouts, a cap per process.

Contract: docs/deployment.md#connections. A real uvicorn server on a loopback port with the
broker's protocol, and raw sockets as the clients; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import TYPE_CHECKING

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from broker import serving
from broker.config import Settings
from broker.serving import BackgroundServer, ConnectionLimits, connection_capacity

if TYPE_CHECKING:
    from collections.abc import Iterator

    from starlette.requests import Request

CAP = 4
TIMEOUT = 0.4


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, release: threading.Event) -> Iterator[BackgroundServer]:
    async def ok(_request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def held(_request: Request) -> PlainTextResponse:
        for _ in range(200):  # at most 10 s
            if release.is_set():
                break
            await asyncio.sleep(0.05)
        return PlainTextResponse("released")

    monkeypatch.setattr(
        serving,
        "_limits",
        ConnectionLimits(header_timeout=TIMEOUT, keepalive_timeout=TIMEOUT, max_connections=CAP),
    )
    monkeypatch.setattr(serving, "stats", serving.ConnectionStats())
    app = Starlette(routes=[Route("/ok", ok), Route("/held", held)])
    with BackgroundServer(app, lifespan="off", name="bounded server") as running:
        yield running


def _connect(server: BackgroundServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.settimeout(5)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (the socket's timeout bounds each read)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _get(sock: socket.socket, path: str, *, close: bool = True) -> None:
    connection = b"close" if close else b"keep-alive"
    head = b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: %s\r\n\r\n" % (path.encode(), connection)
    sock.sendall(head)


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(
    server: BackgroundServer,
) -> None:
    with _connect(server) as sock:
        started = time.monotonic()
        assert _read_all(sock) == b""  # closed, nothing said: there was no request
        assert TIMEOUT * 0.8 < time.monotonic() - started < 4
    assert serving.stats.head_timeouts == 1


def test_a_trickled_head_gets_408_after_the_head_timeout(server: BackgroundServer) -> None:
    with _connect(server) as sock:
        started = time.monotonic()
        for byte in b"GET /ok HTTP/1.1\r\nHo":  # one byte every 20 ms, for half the timeout
            sock.sendall(bytes([byte]))
            if time.monotonic() - started > TIMEOUT / 2:
                break
            time.sleep(0.02)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"error": "request_timeout"' in answer
    assert time.monotonic() - started < 4


def test_an_idle_keep_alive_connection_is_closed_after_its_timeout(
    server: BackgroundServer,
) -> None:
    with _connect(server) as sock:
        _get(sock, "/ok", close=False)
        started = time.monotonic()
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"ok")
    assert time.monotonic() - started < 4


def test_at_the_cap_a_new_connection_closes_the_longest_idle_one(
    server: BackgroundServer,
) -> None:
    silent = [_connect(server) for _ in range(CAP)]
    try:
        time.sleep(0.1)  # all accepted, all idle
        with _connect(server) as sock:
            _get(sock, "/ok")
            assert _read_all(sock).endswith(b"ok")
        assert silent[0].recv(1) == b""  # the oldest made room
        assert serving.stats.evicted >= 1
        assert serving.stats.refused == 0
    finally:
        for sock in silent:
            sock.close()


def test_at_the_cap_with_none_idle_a_new_connection_is_answered_503(
    server: BackgroundServer, release: threading.Event
) -> None:
    busy = [_connect(server) for _ in range(CAP)]
    try:
        for sock in busy:
            _get(sock, "/held")
        time.sleep(0.2)  # every request in progress
        with _connect(server) as sock:
            answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"retry-after: 1" in answer
        assert b'"error": "too_many_connections"' in answer
        assert serving.stats.refused == 1
        release.set()
        for sock in busy:
            assert _read_all(sock).endswith(b"released")  # the held calls were not disturbed
    finally:
        for sock in busy:
            sock.close()


def test_the_cap_keeps_room_under_the_open_file_limit() -> None:
    settings = Settings(upstream_pool_size=100)
    reserve = serving.RESERVED_DESCRIPTORS + serving.DATABASE_POOL_CONNECTIONS + 100
    assert connection_capacity(settings, 1024) == 1024 - reserve
    assert connection_capacity(settings.model_copy(update={"max_connections": 300}), 1024) == 300
    # Asking for more than fits is not granted: the descriptors would run out first.
    too_many = settings.model_copy(update={"max_connections": 5000})
    assert connection_capacity(too_many, 1024) == 1024 - reserve
