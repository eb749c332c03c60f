"""Serving the simulator over real HTTP: in a background thread for tests, or in the foreground."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Self

import uvicorn

from broker.sim.app import create_sim_app
from broker.sim.state import SimState

if TYPE_CHECKING:
    from types import TracebackType


def _config(state: SimState, host: str, port: int) -> uvicorn.Config:
    # No websockets: the simulator has none, and it keeps the websockets library out entirely.
    return uvicorn.Config(
        create_sim_app(state),
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        ws="none",
        access_log=False,
    )


class SimServer:
    """The simulator under uvicorn in a background thread, on an ephemeral local port.

    An instance serves once: start it, stop it, and make a new one to serve again.
    Use as a context manager::

        with SimServer(SimState(tokens={"t"})) as sim:
            httpx.get(f"{sim.base_url}/api/v1/users/self", headers=...)
    """

    def __init__(
        self,
        state: SimState,
        host: str = "127.0.0.1",
        startup_timeout: float = 10.0,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.state = state
        self.host = host
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self._server = uvicorn.Server(_config(state, host, 0))
        self._thread = threading.Thread(target=self._server.run, name="canvas-sim", daemon=True)
        self._port: int | None = None

    @property
    def port(self) -> int:
        """Return the bound port; only valid while the server runs."""
        if self._port is None:
            raise RuntimeError("the simulator is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """Return `http://127.0.0.1:<port>`, the simulator's root URL."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Start serving and wait, at most `startup_timeout` seconds, until it listens."""
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the simulator stopped while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the simulator did not start within {self.startup_timeout}s")
            # Joining with a short timeout is the wait step: it returns early if the thread dies.
            self._thread.join(0.01)
        self._port = int(self._server.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Ask the server to exit and wait, at most `shutdown_timeout` seconds, for it."""
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


def run_sim(host: str, port: int, tokens: set[str]) -> None:
    """Serve a fresh simulator in the foreground until interrupted, accepting `tokens`."""
    uvicorn.Server(_config(SimState(tokens=set(tokens)), host, port)).run()
