"""Fixtures for testing the Canvas simulator in-process."""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING

import httpx
import pytest

from broker.sim import SimState, create_sim_app

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

TOKEN = "sim-test-token"
OTHER_TOKEN = "sim-other-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def no_cookies() -> CookieJar:
    """A jar that refuses every cookie, so requests carry only what a test sends."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> SimState:
    return SimState(tokens={TOKEN, OTHER_TOKEN}, clock=clock)


@pytest.fixture
async def client(state: SimState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_sim_app(state))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://sim.test", cookies=no_cookies()
    ) as client:
        yield client
