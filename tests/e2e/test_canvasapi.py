"""The real ``canvasapi`` library, pointed at the broker, works unchanged.

Both the broker and the simulator run as real HTTP servers on loopback ports, because
canvasapi speaks ``requests`` (synchronous, real sockets).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
from canvasapi import Canvas
from canvasapi.exceptions import Forbidden, InvalidAccessToken
from sqlalchemy import update

from broker.storage.database import create_engine
from broker.storage.models import ProxyToken, utcnow

if TYPE_CHECKING:
    from broker.sim.server import SimServer
    from tests.e2e.conftest import LiveBroker

pytestmark = pytest.mark.filterwarnings(
    # canvasapi warns about plain-HTTP base URLs; loopback test servers are plain HTTP.
    "ignore:.*HTTP.*:UserWarning"
)


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
