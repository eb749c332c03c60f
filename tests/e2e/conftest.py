"""A broker running as a real HTTP server on a loopback port, for clients that need sockets
(canvasapi over requests, curl, raw HTTP bytes, the ``broker`` command line)."""

from __future__ import annotations

import base64
import secrets
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from broker import bootstrap
from broker.app import create_app
from broker.config import Settings
from broker.keyring import parse_keys_setting
from broker.serving import BackgroundServer
from tests.conftest import HEALTHY_BOUND
from tests.support.env import WORKER_TOKEN

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from broker.sim.server import SimServer


@dataclass(frozen=True)
class LiveCaller:
    """A client with one live proxy token, and the ids the audit log should name."""

    client_id: str
    secret: str
    token: str
    token_id: str


class LiveBroker:
    """A broker on a loopback port, provisioned over its own management API."""

    def __init__(self, settings: Settings, server: BackgroundServer, admin_key: str) -> None:
        self.settings = settings
        self.server = server
        self.admin_key = admin_key
        self.http = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=10
        )

    @property
    def url(self) -> str:
        return self.server.base_url

    def client(
        self, scopes: list[str], constraints: dict[str, list[str]], **options: Any
    ) -> tuple[str, str]:
        response = self.http.post(
            "/broker/v1/clients",
            json={
                "name": f"job-{secrets.token_hex(4)}",
                "credential": "worker",
                "scopes": scopes,
                "constraints": constraints,
                **options,
            },
        )
        assert response.status_code == 201, response.text
        return response.json()["client_id"], response.json()["client_secret"]

    def token(self, client_id: str, secret: str) -> str:
        response = httpx.post(
            f"{self.url}/broker/v1/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=(client_id, secret),
        )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    def caller(
        self, scopes: list[str], constraints: dict[str, list[str]], **options: Any
    ) -> LiveCaller:
        """Create a client, mint one token and look its id up."""
        client_id, secret = self.client(scopes, constraints, **options)
        token = self.token(client_id, secret)
        listed = self.http.get("/broker/v1/tokens", params={"client": client_id})
        assert listed.status_code == 200, listed.text
        [record] = listed.json()
        return LiveCaller(client_id=client_id, secret=secret, token=token, token_id=record["id"])

    def proxy_events(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest proxy audit events, newest first."""
        response = self.http.get("/broker/v1/audit", params={"kind": "proxy", "limit": limit})
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()["events"]
        return events

    def proxy_event(self, request_id: str) -> dict[str, Any]:
        """The proxy audit event of one request (among the newest)."""
        found = [event for event in self.proxy_events() if event["request_id"] == request_id]
        assert len(found) == 1, f"no single audit event for request {request_id}"
        return found[0]

    def newest_seq(self) -> int:
        """The sequence number of the newest proxy audit event (0 if there is none)."""
        events = self.proxy_events(limit=1)
        return int(events[0]["seq"]) if events else 0


@contextmanager
def serve_live_broker(database_url: str, sim: SimServer, **overrides: Any) -> Iterator[LiveBroker]:
    """Serve a broker on ``database_url`` with settings overridden, its upstream the simulator."""
    keys = "k1:" + base64.b64encode(secrets.token_bytes(32)).decode()
    # The healthy bound, as the in-process fixtures have it (tests.conftest.HEALTHY_BOUND): a
    # loaded CI host can stall a live broker's event loop for seconds; the tests of the bound
    # pass their own.
    settings = Settings(
        **{"database_url": database_url, "keys": keys, "audit_timeout": HEALTHY_BOUND, **overrides}
    )
    admin_key = bootstrap.create_admin_key(
        settings, parse_keys_setting(keys), name="e2e-admin", role="admin"
    )
    assert admin_key is not None
    with BackgroundServer(create_app(settings), name="broker") as server:
        broker = LiveBroker(settings, server, admin_key)
        assert broker.http.post(
            "/broker/v1/upstreams", json={"name": "sim", "base_url": sim.base_url}
        ).is_success
        assert broker.http.post(
            "/broker/v1/credentials",
            json={"upstream": "sim", "name": "worker", "token": WORKER_TOKEN},
        ).is_success
        # Storing the credential asked the simulator who the token is; tests start from zero.
        sim.state.received.clear()
        try:
            yield broker
        finally:
            broker.http.close()


@pytest.fixture
def live_broker(database_url: str, sim: SimServer) -> Iterator[LiveBroker]:
    with serve_live_broker(database_url, sim) as broker:
        yield broker


@pytest.fixture
def make_live_broker(database_url: str, sim: SimServer) -> Iterator[Callable[..., LiveBroker]]:
    """Start one live broker with settings overridden (use instead of ``live_broker``)."""
    with ExitStack() as stack:

        def make(**overrides: Any) -> LiveBroker:
            return stack.enter_context(serve_live_broker(database_url, sim, **overrides))

        yield make
