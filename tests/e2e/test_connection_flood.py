"""A flood of silent connections under a 1,024 open-file limit: /readyz still answers.

Contract: docs/deployment.md#connections. ``broker serve`` runs with soft and hard
``RLIMIT_NOFILE`` at 1,024, as on many hosts, and the test holds 1,100 connections that never
send a byte.
"""

from __future__ import annotations

import resource
import socket
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.support.serve import free_port, init, serve, sqlite_env

if TYPE_CHECKING:
    from pathlib import Path

LIMIT = 1024
FLOOD = 1100


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


@pytest.fixture
def flood_room() -> None:
    """The test itself needs a descriptor per flooding connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FLOOD + 200:
        pytest.fail(f"the test needs {FLOOD + 200} open files; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < FLOOD + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FLOOD + 200, hard))


@pytest.mark.usefixtures("flood_room")
def test_readyz_answers_through_a_flood_of_silent_connections(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path)
    init(env)
    port = free_port()
    server = serve(env, port, tmp_path / "serve.log", preexec_fn=_limit_files)
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    flood: list[socket.socket] = []
    try:
        flood.extend(socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(FLOOD))
        time.sleep(0.5)  # let the server accept what it will
        answers = [httpx.get(f"{url}/readyz", timeout=5) for _ in range(5)]
        assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
    finally:
        for sock in flood:
            sock.close()
        server.terminate()
        server.wait(timeout=30)
    text = log.read_text()
    assert "Too many open files" not in text
    evicted = next(
        line
        for line in metrics.splitlines()
        if line.startswith("broker_client_connections_evicted")
    )
    assert float(evicted.split()[-1]) >= FLOOD - LIMIT
