"""Fixtures for the proxy tests: raw request targets and brokers with non-default settings."""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from broker.app import create_app
from broker.config import Settings
from broker.context import ProcessContext
from broker.keyring import Keyring
from tests.proxy.support import RawTargetTransport
from tests.support.env import BrokerEnv

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from broker.sim.server import SimServer

    EnvFactory = Callable[..., Awaitable[BrokerEnv]]


@pytest.fixture
async def raw_http(env: BrokerEnv) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``env``'s broker that can send request paths byte for byte."""
    transport = RawTargetTransport(create_app(context=env.context))
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
        yield http


@pytest.fixture
async def make_env(database_url: str, sim: SimServer) -> AsyncIterator[EnvFactory]:
    """Build one provisioned broker with settings overridden (use instead of ``env``)."""
    async with AsyncExitStack() as stack:

        async def make(**overrides: Any) -> BrokerEnv:
            settings = Settings(
                **{"database_url": database_url, "keys": None, "public_url": None, **overrides}
            )
            context = ProcessContext.from_settings(settings, keyring=Keyring.generate())
            stack.push_async_callback(context.aclose)
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=create_app(context=context)),
                    base_url="http://broker.test",
                )
            )
            broker_env = BrokerEnv(context=context, http=http, sim=sim)
            await broker_env.provision()
            return broker_env

        yield make


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, noted, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
