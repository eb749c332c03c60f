"""A flood of silent connections under a 1,024 open-file limit: /readyz still answers.

Contract: docs/deployment.md#connections. ``broker serve`` runs with soft and hard
``RLIMIT_NOFILE`` at 1,024, as on many hosts, and the test holds 1,100 connections that never
send a byte.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from pathlib import Path

BROKER = [sys.executable, "-m", "broker"]
LIMIT = 1024
FLOOD = 1100


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    env["BROKER_KEY_FILE"] = str(tmp_path / "broker.key")
    init = subprocess.run(
        [*BROKER, "init"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert init.returncode == 0, init.stderr
    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [*BROKER, "serve", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=output,
            preexec_fn=_limit_files,  # noqa: PLW1509 - only setrlimit, before exec
        )
    url = f"http://127.0.0.1:{port}"
    flood: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while "Application startup complete" not in log.read_text():
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
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
