"""The upstream client: HTTP/1.1 over pooled keep-alive connections, one pool per process.

The proxy talks to Canvas through the small ``Forwarder`` interface. ``HttpForwarder`` is a
purpose-built client on asyncio protocols with the ``httptools`` parser (the one uvicorn
uses): on this class of machine it costs well under half the CPU per proxied call of a
general-purpose client such as aiohttp or httpx (see bench/README.md), because it does only
what the proxy needs:

- it sends exactly the target it is given (no re-encoding) with exactly the headers it is
  given, plus ``Host`` and, for a body, ``Content-Length``;
- it never follows redirects and never decompresses: the body arrives as Canvas sent it
  (chunked transfer framing, being hop-by-hop, is removed);
- timeouts: ``connect_timeout`` to open a connection, ``read_timeout`` for the response head
  and between body chunks;
- idle connections are kept per origin (at most ``pool_size``) for ``keepalive_timeout``
  seconds; a request whose reused connection turns out to have been closed by the server
  before any response byte is retried once on a new connection if its method is idempotent;
- bodies stream: the socket stops being read while the consumer lags behind;
- what Canvas sends is bounded: a response head beyond ``MAX_RESPONSE_HEAD_BYTES`` or
  ``MAX_RESPONSE_HEADERS`` fields, or a body ``read`` whole beyond ``MAX_READ_BODY_BYTES``,
  fails the response and closes its connection, so a faulty upstream cannot make the broker
  hold more than about that much per call (docs/proxy-rules.md#upstream-limits).

Exceptions: ``UpstreamError`` (``timeout`` True for timeouts) for anything that stops a
response from arriving or completing.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit

import httptools

from broker.errors import UpstreamError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
_ORIGIN: Final = re.compile(r"https?://[^/?#]*")
_ORIGIN_CACHE_SIZE: Final = 1024
_HIGH_WATER: Final = 256 * 1024
_LOW_WATER: Final = 64 * 1024
MAX_RESPONSE_HEAD_BYTES: Final = 64 * 1024
"""The largest response head taken from Canvas (its status line and every header, interim
1xx heads included); Canvas's own heads, pagination ``Link`` included, are a few KiB."""
MAX_RESPONSE_HEADERS: Final = 200
"""The most header fields taken from Canvas in one response."""
MAX_READ_BODY_BYTES: Final = 64 * 1024 * 1024
"""The largest body ``read`` collects whole (the JSON the proxy rewrites); others stream."""


class UpstreamResponse(Protocol):
    """A response whose body has not been read yet."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def body(self) -> AsyncIterator[bytes]:
        """Yield the body bytes exactly as received (still content-encoded)."""
        ...

    async def read(self) -> bytes:
        """Read the whole body."""
        ...

    def release(self) -> None:
        """Return the connection to the pool (or drop it if the body was not consumed)."""
        ...


class Forwarder(Protocol):
    """Sends one request upstream."""

    async def send(
        self, method: str, url: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> UpstreamResponse:
        """Send and return once the response head has arrived."""
        ...

    async def aclose(self) -> None:
        """Close the pool."""
        ...


@dataclass(frozen=True)
class Origin:
    """Where connections go: scheme, host, port, and the ``Host`` header naming them."""

    scheme: str
    host: str
    port: int
    host_header: bytes


def parse_target(url: str) -> tuple[Origin, bytes]:
    """Split an absolute ``http(s)`` URL into its origin and request target, as given."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise UpstreamError("the upstream URL is not an absolute http(s) URL", timeout=False)
    default = 443 if parts.scheme == "https" else 80
    try:
        port = parts.port or default
    except ValueError as exc:
        raise UpstreamError("the upstream URL has an invalid port", timeout=False) from exc
    netloc = parts.netloc.rpartition("@")[2]
    target = url[len(parts.scheme) + 3 + len(parts.netloc) :] or "/"
    return Origin(parts.scheme, parts.hostname, port, netloc.encode("ascii")), target.encode(
        "latin-1"
    )


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses the response it gets back."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._head: asyncio.Future[_Head] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._complete = False
        self._failure: UpstreamError | None = None
        self._received_any = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._no_body = False
        self._eof_body = False
        self._paused = False
        self._head_bytes = 0
        self._header_count = 0
        self._too_large: str | None = None

    # asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._head is None or self._complete:
            # Bytes nobody asked for (on an idle connection): it can no longer be trusted.
            self.close()
            return
        self._received_any = True
        waiting = not self._head.done()
        if waiting:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            problem = self._too_large or "the upstream sent a malformed response"
            self._fail(UpstreamError(problem, timeout=False))
            self.close()
            return
        # Checked after feeding: ``data`` may hold the head and the start of the body. What the
        # parser holds of an unfinished head is at most the limit and one read.
        if waiting and not self._head.done() and self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
            self._fail(
                UpstreamError(
                    f"the upstream's response head is over {MAX_RESPONSE_HEAD_BYTES} bytes",
                    timeout=False,
                )
            )
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._eof_body and not self._complete and exc is None:
            self.on_message_complete()  # the body was delimited by the end of the connection
            return
        if not self._complete:
            self._fail(UpstreamError("the upstream closed the connection", timeout=False))

    def pause_writing(self) -> None:
        """Write buffering is left to the transport: request bodies are bounded."""

    def resume_writing(self) -> None:
        """See ``pause_writing``."""

    # httptools callbacks ---------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_RESPONSE_HEADERS:
            self._too_large = f"the upstream sent over {MAX_RESPONSE_HEADERS} header fields"
            raise UpstreamError(self._too_large, timeout=False)  # ends the parse (see above)
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200 and status != 101:  # noqa: PLR2004 - interim 1xx: wait for the final
            self._headers = []
            return
        framed = any(name in {b"content-length", b"transfer-encoding"} for name, _ in self._headers)
        self._eof_body = not framed and status not in {204, 304} and not self._no_body
        head = _Head(status, self._headers, self._parser.should_keep_alive())
        if self._head is not None and not self._head.done():
            self._head.set_result(head)
        if self._no_body:
            # A response to HEAD: its Content-Length describes a body that never comes, which
            # the parser cannot be told; the connection is finished after the head.
            self._complete = True
            self.close()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self._head is not None and not self._head.done():
            return  # an interim 1xx response ended; the final one follows
        self._complete = True
        self._wake()

    # Request side -----------------------------------------------------------------------

    def start(self, request: bytes, *, head_only: bool) -> asyncio.Future[_Head]:
        """Write a request; the future resolves with the response head."""
        self._head = self._loop.create_future()
        self._chunks.clear()
        self._buffered = 0
        self._complete = False
        self._failure = None
        self._received_any = False
        self._headers = []
        self._no_body = head_only
        self._eof_body = False
        self._head_bytes = 0
        self._header_count = 0
        self._too_large = None
        if self.transport is None or self.closed:
            self._fail(UpstreamError("the upstream closed the connection", timeout=False))
        else:
            self.transport.write(request)
        return self._head

    @property
    def received_any(self) -> bool:
        """Whether any byte of the current response arrived."""
        return self._received_any

    async def chunks(self, read_timeout: float) -> AsyncIterator[bytes]:
        """Yield body chunks until the response is complete."""
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _LOW_WATER and self.transport is not None:
                    self.transport.resume_reading()
                    self._paused = False
                yield chunk
            if self._failure is not None:
                raise self._failure
            if self._complete:
                return
            self._wakeup = self._loop.create_future()
            timer = self._loop.call_later(read_timeout, self.time_out)
            try:
                await self._wakeup
            finally:
                timer.cancel()
                self._wakeup = None

    def time_out(self) -> None:
        """The upstream took longer than the read timeout: give up on this response."""
        self._fail(UpstreamError("upstream timed out", timeout=True))
        self.close()

    def take_complete_body(self) -> bytes | None:
        """The whole body if it has all arrived (the usual case for a page), else None."""
        if not self._complete or self._failure is not None:
            return None
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    @property
    def complete(self) -> bool:
        """Whether the whole current response has been received."""
        return self._complete

    def close(self) -> None:
        """Close the connection."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._failure is None:  # the first cause stands (a timeout, then the close it causes)
            self._failure = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()


@dataclass(frozen=True)
class _Head:
    status: int
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool


class _Response:
    """A response of ``HttpForwarder``: head available, body read on demand."""

    def __init__(
        self,
        forwarder: HttpForwarder,
        origin: Origin,
        connection: _Connection,
        head: _Head,
    ) -> None:
        self.status = head.status
        self.headers = head.headers
        self._forwarder = forwarder
        self._origin = origin
        self._connection = connection
        self._keep_alive = head.keep_alive
        self._released = False

    async def body(self) -> AsyncIterator[bytes]:
        async for chunk in self._connection.chunks(self._forwarder.read_timeout):
            yield chunk

    async def read(self) -> bytes:
        body = self._connection.take_complete_body()
        if body is not None:
            return body
        chunks, size = [], 0
        async for chunk in self.body():
            size += len(chunk)
            if size > MAX_READ_BODY_BYTES:
                self._connection.close()
                raise UpstreamError(
                    f"the upstream's response body is over {MAX_READ_BODY_BYTES} bytes",
                    timeout=False,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        connection = self._connection
        if self._keep_alive and connection.complete and not connection.closed:
            self._forwarder.check_in(self._origin, connection)
        else:
            connection.close()


class HttpForwarder:
    """``Forwarder`` over pooled HTTP/1.1 connections (see the module docstring)."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        pool_size: int,
        keepalive_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._pool_size = pool_size
        self._keepalive = keepalive_timeout
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._origins: dict[str, Origin] = {}
        self._closed = False

    async def send(
        self, method: str, url: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> UpstreamResponse:
        """Send one request; raise ``UpstreamError`` if Canvas cannot be reached in time."""
        origin, target = self._split(url)
        request = _encode(method, target, origin, headers, body)
        head_only = method == "HEAD"
        connection = await self._checkout(origin)
        try:
            head = await self._exchange(connection, request, head_only=head_only)
        except UpstreamError:
            retry = connection.reused and not connection.received_any and method in IDEMPOTENT
            if not retry:
                raise
            # A pooled connection the server had already closed: try once on a fresh one.
            connection = await self._connect(origin)
            head = await self._exchange(connection, request, head_only=head_only)
        return _Response(self, origin, connection, head)

    def _split(self, url: str) -> tuple[Origin, bytes]:
        """The URL's origin (parsed once per origin) and its request target, as given."""
        found = _ORIGIN.match(url)
        origin = self._origins.get(found.group(0)) if found else None
        if origin is None or found is None:
            origin, target = parse_target(url)
            if found is not None and len(self._origins) < _ORIGIN_CACHE_SIZE:
                self._origins[found.group(0)] = origin
            return origin, target
        return origin, (url[found.end() :] or "/").encode("latin-1")

    async def _exchange(self, connection: _Connection, request: bytes, *, head_only: bool) -> _Head:
        head = connection.start(request, head_only=head_only)
        timer = asyncio.get_running_loop().call_later(self.read_timeout, connection.time_out)
        try:
            return await head
        except UpstreamError:
            connection.close()
            raise
        finally:
            timer.cancel()

    async def _checkout(self, origin: Origin) -> _Connection:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive:
                connection.reused = True
                return connection
            connection.close()
        return await self._connect(origin)

    async def _connect(self, origin: Origin) -> _Connection:
        if self._closed:
            raise UpstreamError("the upstream client is closed", timeout=False)
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if origin.scheme == "https":
            tls = self._ssl or _default_tls()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _transport, connection = await loop.create_connection(
                    lambda: _Connection(loop),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError as exc:
            raise UpstreamError("upstream timed out", timeout=True) from exc
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(
                f"upstream unreachable: {type(exc).__name__}", timeout=False
            ) from exc
        return connection

    def check_in(self, origin: Origin, connection: _Connection) -> None:
        """Keep a finished connection for the next request to ``origin``."""
        idle = self._idle.setdefault(origin, [])
        if self._closed or len(idle) >= self._pool_size:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when released."""
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing


@cache
def _default_tls() -> ssl.SSLContext:
    """The system's trust store with hostname checks, created once."""
    return ssl.create_default_context()


def _encode(
    method: str,
    target: bytes,
    origin: Origin,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
) -> bytes:
    """The request head and body as bytes; the caller vetted every header already."""
    lines = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nhost: ", origin.host_header]
    for name, value in headers:
        lines += (b"\r\n", name, b": ", value)
    if body or method in {"POST", "PUT", "PATCH"}:
        lines += (b"\r\ncontent-length: ", str(len(body)).encode())
    lines += (b"\r\n\r\n", body)
    return b"".join(lines)
