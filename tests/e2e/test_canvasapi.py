"""The real ``canvasapi`` library, pointed at the broker, works unchanged.

Both the broker and the simulator run as real HTTP servers on loopback ports, because
canvasapi speaks ``requests`` (synchronous, real sockets).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from datetime import timedelta
from typing import TYPE_CHECKING

import httpx
import pytest
from canvasapi import Canvas
from canvasapi.exceptions import Forbidden, InvalidAccessToken
from sqlalchemy import update

from broker import bootstrap
from broker.app import create_app
from broker.config import Settings
from broker.keyring import parse_keys_setting
from broker.serving import BackgroundServer
from broker.storage.database import create_engine
from broker.storage.models import ProxyToken, utcnow
from tests.support.env import WORKER_TOKEN

if TYPE_CHECKING:
    from collections.abc import Iterator

    from broker.sim.server import SimServer

pytestmark = pytest.mark.filterwarnings(
    # canvasapi warns about plain-HTTP base URLs; loopback test servers are plain HTTP.
    "ignore:.*HTTP.*:UserWarning"
)


class LiveBroker:
    """A broker on a loopback port, provisioned over its own management API."""

    def __init__(self, settings: Settings, server: BackgroundServer, admin_key: str) -> None:
        self.settings = settings
        self.server = server
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


GRANT = [
    "url:GET|/api/v1/courses/:id",
    "url:GET|/api/v1/courses/:course_id/assignments",
]
ONLY_1201 = {"id": ["1201"], "course_id": ["1201"]}


def test_canvasapi_lists_every_page_through_the_broker(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    token = live_broker.token(*live_broker.client(GRANT, ONLY_1201))
    canvas = Canvas(live_broker.url, token)
    # canvasapi asks for per_page=100; a Canvas instance may cap pages lower, as here.
    sim.state.max_per_page = 10

    course = canvas.get_course(1201)
    assignments = list(course.get_assignments())

    pages = [r.target for r in sim.state.received if r.raw_path.endswith("/assignments")]
    expected = sorted(a.id for a in sim.state.data.assignments.values() if a.course_id == 1201)
    assert course.name
    assert sorted(a.id for a in assignments) == expected
    assert len(assignments) == 35
    # Page 1, then the rewritten `next` links to pages 2, 3 and 4, all through the broker.
    assert len(pages) == 4
    assert all("page=" in target for target in pages[1:])


def test_canvasapi_call_outside_the_grant_raises_forbidden(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    token = live_broker.token(*live_broker.client(GRANT, ONLY_1201))
    canvas = Canvas(live_broker.url, token)

    with pytest.raises(Forbidden):
        canvas.get_course(1202)
    with pytest.raises(Forbidden):
        canvas.get_user("self")
    assert sim.state.received == []


def test_canvasapi_revoked_token_raises_invalid_access_token(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    client_id, secret = live_broker.client(GRANT, ONLY_1201)
    canvas = Canvas(live_broker.url, live_broker.token(client_id, secret))
    assert canvas.get_course(1201).id == 1201

    revoked = live_broker.http.post(f"/broker/v1/clients/{client_id}/revoke-tokens")
    assert revoked.json() == {"revoked": 1}

    with pytest.raises(InvalidAccessToken):
        canvas.get_course(1201)
    assert len(sim.state.received) == 1


def test_canvasapi_expired_token_raises_invalid_access_token(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    client_id, secret = live_broker.client(GRANT, ONLY_1201)
    canvas = Canvas(live_broker.url, live_broker.token(client_id, secret))

    async def expire() -> None:
        engine = create_engine(live_broker.settings.async_database_url, pool=False)
        async with engine.begin() as connection:
            await connection.execute(
                update(ProxyToken)
                .where(ProxyToken.client_id == client_id)
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )
        await engine.dispose()

    asyncio.run(expire())
    with pytest.raises(InvalidAccessToken):
        canvas.get_course(1201)
    assert sim.state.received == []
