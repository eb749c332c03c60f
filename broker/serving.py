"""Running an ASGI app under uvicorn in a background thread (tests, the demo, the simulator)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Literal, Self

import uvicorn

if TYPE_CHECKING:
    from types import TracebackType

    from starlette.types import ASGIApp


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
                ws="none",
                access_log=False,
                server_header=False,
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
