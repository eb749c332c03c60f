"""Serving with uvicorn: the broker's HTTP protocol, and a server in a background thread.

:class:`BackgroundServer` runs tests, the demo and the simulator.

Every way the broker is served (``broker serve``, the demo, :class:`BackgroundServer`) uses
:class:`RequestTargetProtocol` and turns uvicorn's proxy-header handling off: the broker reads
``X-Forwarded-For`` itself, and only from ``BROKER_TRUSTED_PROXIES``.
"""

from __future__ import annotations

import json
import logging
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Self

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    import asyncio
    from types import TracebackType

    from starlette.types import ASGIApp

    from broker.config import Settings

logger = logging.getLogger(__name__)

RESERVED_DESCRIPTORS: Final = 64
"""Open files a process keeps besides client and pool connections: its database files, logs,
the audit hub's socket, the epoch file, a health check's connection, Python's own."""

DATABASE_POOL_CONNECTIONS: Final = 15
"""SQLAlchemy's default pool (5, and 10 overflow) of the async engine."""

MAX_OPEN_FILES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How long and how many client connections a process holds (docs/deployment.md#connections).

    Set once per process from the settings (:func:`configure_connections`, by the broker's
    lifespan); until then, and for other apps (the simulator), these defaults hold.
    """

    header_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    max_connections: int = 4096


@dataclass(slots=True)
class ConnectionStats:
    """What the connection limits did in this process (``/metrics`` reads them)."""

    open: int = 0
    refused: int = 0
    evicted: int = 0
    head_timeouts: int = 0
    _last_warning: float = field(default=0.0, repr=False)

    def warn(self, message: str, *args: Any) -> None:  # noqa: ANN401 - logging arguments
        """Log at most once a second: a flood must not flood the log too."""
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            logger.warning(message, *args)


_limits = ConnectionLimits()
stats = ConnectionStats()


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; return the soft limit.

    Children inherit it, so ``broker serve`` raises it once for its workers; each worker's
    lifespan does it again for a broker served some other way.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            logger.warning("could not raise the open-file limit from %d to %d", soft, target)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_OPEN_FILES if soft == resource.RLIM_INFINITY else soft


def connection_capacity(settings: Settings, open_files: int) -> int:
    """Client connections a process may hold: below the open-file limit, with room kept."""
    reserve = RESERVED_DESCRIPTORS + DATABASE_POOL_CONNECTIONS + settings.upstream_pool_size
    available = max(1, open_files - reserve)
    wanted = settings.max_connections
    if wanted > available:
        logger.warning(
            "BROKER_MAX_CONNECTIONS=%d does not fit under the open-file limit (%d, less %d "
            "kept for the database, the upstream pool and the process): using %d",
            wanted,
            open_files,
            reserve,
            available,
        )
    return min(wanted, available) if wanted else available


def configure_connections(settings: Settings) -> ConnectionLimits:
    """Set this process's connection limits from ``settings``."""
    global _limits  # noqa: PLW0603 - one set of limits per process, like the open-file limit
    _limits = ConnectionLimits(
        header_timeout=settings.header_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        max_connections=connection_capacity(settings, raise_open_file_limit()),
    )
    return _limits


def connection_limits() -> ConnectionLimits:
    """The connection limits of this process."""
    return _limits


def _close_response(status: bytes, error: str, message: str, *extra: bytes) -> bytes:
    body = json.dumps({"errors": [{"message": message}], "error": error}).encode()
    return b"".join(
        [
            b"HTTP/1.1 ",
            status,
            b"\r\ncontent-type: application/json\r\nconnection: close\r\n",
            *extra,
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\n\r\n",
            body,
        ]
    )


TOO_MANY_CONNECTIONS: Final = _close_response(
    b"503 Service Unavailable",
    "too_many_connections",
    "the broker holds as many connections as it may and none is idle; retry shortly",
    b"retry-after: 1\r\n",
)
HEAD_TIMEOUT: Final = _close_response(
    b"408 Request Timeout",
    "request_timeout",
    "the request head did not arrive in time (BROKER_HEADER_TIMEOUT)",
)


class RequestTargetProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, but the app gets the request target and head as sent.

    httptools parses the request target, so an absolute-form target
    (``GET http://other-host/api/v1/... HTTP/1.1``) would reach the app as ``/api/v1/...`` and
    a ``#fragment`` would vanish. uvicorn's h11 protocol hands the target over untouched, split
    at the first ``?`` into ``raw_path`` and ``query_string``; this does the same, so the
    proxy's rules see, and refuse, what the client really sent.

    The parser reports a chunked body's trailer fields through the same callback as header
    fields, and uvicorn appends them to the very list its scope holds: a trailer arriving
    with the body would join the request's headers before the app reads them. The scope gets
    its own copy of the head instead, so trailers are never read, checked or forwarded.

    Connections are bounded too (docs/deployment.md#connections): a client has
    ``header_timeout`` to send a whole request head, from connecting or from its first byte
    (then ``408``, or a silent close if it sent nothing); an idle keep-alive connection is
    closed after ``keepalive_timeout``; and a process holds at most ``max_connections``. A
    connection beyond that makes room by closing the connection that has been idle longest
    (nothing in progress on it); if none is idle it is answered ``503 too_many_connections``
    and closed. So a flood of silent connections cannot take every descriptor, and a health
    check still gets in.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - uvicorn's arguments
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = _limits.keepalive_timeout  # type: ignore[assignment]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_begun = False

    def _idle(self) -> dict[RequestTargetProtocol, None]:
        """The idle connections of this server, longest idle first."""
        state = self.server_state
        idle: dict[RequestTargetProtocol, None] | None = getattr(state, "broker_idle", None)
        if idle is None:
            idle = {}
            state.broker_idle = idle  # type: ignore[attr-defined]
        return idle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Admit the connection within the cap, or make room, or refuse it."""
        super().connection_made(transport)
        idle = self._idle()
        if len(self.connections) > _limits.max_connections:
            if idle:
                oldest = next(iter(idle))
                del idle[oldest]
                stats.evicted += 1
                oldest.transport.close()
            else:
                stats.refused += 1
                stats.warn(
                    "refusing connections: %d open, none idle (BROKER_MAX_CONNECTIONS)",
                    len(self.connections),
                )
                transport.write(TOO_MANY_CONNECTIONS)
                transport.close()
                return
        stats.open = len(self.connections)
        idle[self] = None
        self._head_timer = self.loop.call_later(_limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection."""
        self._idle().pop(self, None)
        self._cancel_head_timer()
        super().connection_lost(exc)
        stats.open = len(self.connections)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        stats.head_timeouts += 1
        if self._head_begun:
            self.transport.write(HEAD_TIMEOUT)
        self.transport.close()

    def on_message_begin(self) -> None:
        """A request's first byte: the connection is busy, its head due within the timeout."""
        super().on_message_begin()
        self._idle().pop(self, None)
        self._head_begun = True
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(_limits.header_timeout, self._head_timed_out)

    def on_response_complete(self) -> None:
        """Answered: idle again once nothing more is in progress on the connection."""
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None and not self.transport.is_closing():
            self._idle()[self] = None

    def on_headers_complete(self) -> None:
        """Build the scope as uvicorn does, then put the target's and head's own bytes in it."""
        self._cancel_head_timer()
        self._head_begun = False
        target = bytes(self.url)
        super().on_headers_complete()
        # The app runs in a task scheduled above, not yet started: the scope can still change.
        self.scope["headers"] = list(self.headers)
        if "raw_path" in self.scope:
            raw_path, _, query = target.partition(b"?")
            self.scope["raw_path"] = self.root_path.encode("ascii") + raw_path
            self.scope["query_string"] = query


class BackgroundServer:
    """An app served on a loopback port by uvicorn in a daemon thread.

    ``port=0`` binds an ephemeral port, read back once listening. Start-up and shut-down
    waits are bounded.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        lifespan: Literal["on", "off"] = "on",
        startup_timeout: float = 15.0,
        shutdown_timeout: float = 10.0,
        name: str = "server",
    ) -> None:
        self.host = host
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self.name = name
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="warning",
                lifespan=lifespan,
                http=RequestTargetProtocol,
                ws="none",
                access_log=False,
                server_header=False,
                proxy_headers=False,
            )
        )
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port; only valid while the server runs."""
        if self._port is None:
            raise RuntimeError(f"the {self.name} is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Start serving and wait, at most ``startup_timeout`` seconds, until it listens."""
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the {self.name} stopped while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the {self.name} did not start within {self.startup_timeout}s")
            # Joining with a short timeout is the wait step: it returns early if the thread dies.
            self._thread.join(0.01)
        self._port = int(self._server.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Ask the server to exit and wait, at most ``shutdown_timeout`` seconds, for it."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(self.shutdown_timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(self.shutdown_timeout)
        self._port = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
