"""A broker running as a real HTTP server on a loopback port, for clients that need sockets
(canvasapi over requests, the ``broker`` command line)."""

from __future__ import annotations

import base64
import secrets
from typing import TYPE_CHECKING

import httpx
import pytest

from broker import bootstrap
from broker.app import create_app
from broker.config import Settings
from broker.keyring import parse_keys_setting
from broker.serving import BackgroundServer
from tests.support.env import WORKER_TOKEN

if TYPE_CHECKING:
    from collections.abc import Iterator

    from broker.sim.server import SimServer


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

    def client(self, scopes: list[str], constraints: dict[str, list[str]]) -> tuple[str, str]:
        response = self.http.post(
            "/broker/v1/clients",
            json={
                "name": f"job-{secrets.token_hex(4)}",
                "credential": "worker",
                "scopes": scopes,
                "constraints": constraints,
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


@pytest.fixture
def live_broker(database_url: str, sim: SimServer) -> Iterator[LiveBroker]:
    keys = "k1:" + base64.b64encode(secrets.token_bytes(32)).decode()
    settings = Settings(database_url=database_url, keys=keys)
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
        yield broker
        broker.http.close()
