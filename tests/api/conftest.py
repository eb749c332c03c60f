"""Fixtures for the API tests: a record of every response, and extra simulator tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx

    from tests.support.env import BrokerEnv


@dataclass
class ResponseLog:
    """Every response the test's HTTP client received, in order, bodies read."""

    responses: list[httpx.Response] = field(default_factory=list)

    async def record(self, response: httpx.Response) -> None:
        """httpx response hook."""
        await response.aread()
        self.responses.append(response)

    def mark(self) -> int:
        """A position: responses received from now on have index >= the returned value."""
        return len(self.responses)

    def leaks(self, secret: str, *, since: int = 0) -> list[str]:
        """``METHOD path`` of every response from ``since`` whose headers or body hold it."""
        found = []
        for response in self.responses[since:]:
            headers = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
            if secret in headers or secret in response.text:
                found.append(f"{response.request.method} {response.request.url.path}")
        return found


@pytest.fixture
def responses(env: BrokerEnv) -> ResponseLog:
    """Record every response ``env.http`` receives during the test."""
    log = ResponseLog()
    hooks = env.http.event_hooks
    env.http.event_hooks = {**hooks, "response": [*hooks.get("response", []), log.record]}
    return log


@dataclass
class SimTokens:
    """Canvas tokens the simulator accepts in addition to the standard worker token."""

    env: BrokerEnv
    added: set[str] = field(default_factory=set)

    def accept(self, token: str) -> str:
        """Make the simulator accept ``token`` for the rest of this test."""
        self.env.sim.state.tokens.add(token)
        self.added.add(token)
        return token


@pytest.fixture
def sim_tokens(env: BrokerEnv) -> Iterator[SimTokens]:
    """Extra simulator tokens, removed again after the test (the simulator is shared)."""
    tokens = SimTokens(env)
    yield tokens
    env.sim.state.tokens.difference_update(tokens.added)
