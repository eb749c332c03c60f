"""Serving the simulator over real HTTP: in a background thread for tests, or in the foreground."""

from __future__ import annotations

import uvicorn

from broker.serving import BackgroundServer
from broker.sim.app import create_sim_app
from broker.sim.state import SimState


class SimServer(BackgroundServer):
    """The simulator under uvicorn in a background thread, on an ephemeral local port.

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
        super().__init__(
            create_sim_app(state),
            host=host,
            lifespan="off",
            startup_timeout=startup_timeout,
            shutdown_timeout=shutdown_timeout,
            name="simulator",
        )
        self.state = state


def run_sim(host: str, port: int, tokens: set[str]) -> None:
    """Serve a fresh simulator in the foreground until interrupted, accepting `tokens`."""
    config = uvicorn.Config(
        create_sim_app(SimState(tokens=set(tokens))),
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        ws="none",
    )
    uvicorn.Server(config).run()
