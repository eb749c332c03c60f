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


def parse_developer_key(spec: str) -> tuple[str, str, list[str]]:
    """Read `CLIENT_ID:SECRET[:REDIRECT_URI]` (the redirect URI may itself contain colons)."""
    client_id, _, rest = spec.partition(":")
    secret, _, redirect_uri = rest.partition(":")
    if not client_id.isdigit() or not secret:
        raise ValueError("a developer key is CLIENT_ID:SECRET[:REDIRECT_URI], the id numeric")
    return client_id, secret, [redirect_uri] if redirect_uri else []


def run_sim(
    host: str, port: int, tokens: set[str], developer_keys: list[str] | None = None
) -> None:
    """Serve a fresh simulator in the foreground until interrupted, accepting `tokens`.

    Each of `developer_keys` (`CLIENT_ID:SECRET[:REDIRECT_URI]`) is registered with no scopes
    enforced.
    """
    state = SimState(tokens=set(tokens))
    for spec in developer_keys or []:
        client_id, secret, redirect_uris = parse_developer_key(spec)
        state.add_developer_key(client_id, secret, redirect_uris)
    config = uvicorn.Config(
        create_sim_app(state),
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        ws="none",
    )
    uvicorn.Server(config).run()
