"""Serving with uvicorn: the broker's HTTP protocol, and a server in a background thread.

:class:`BackgroundServer` runs tests, the demo and the simulator.

Every way the broker is served (``broker serve``, the demo, :class:`BackgroundServer`) uses
:class:`RequestTargetProtocol` and turns uvicorn's proxy-header handling off: the broker reads
``X-Forwarded-For`` itself, and only from ``BROKER_TRUSTED_PROXIES``.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Literal, Self

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    from types import TracebackType

    from starlette.types import ASGIApp


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
    """

    def on_headers_complete(self) -> None:
        """Build the scope as uvicorn does, then put the target's and head's own bytes in it."""
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
