"""``broker serve --workers 2`` on one SQLite file: one audit chain, revocation seen at once.

Request ids start with a random prefix per process, which tells which worker answered.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx
import pytest

from broker.config import Settings
from broker.keyring import load_key_file
from broker.services.audit import verify_log
from broker.storage.database import create_sync_engine
from tests.support.env import WORKER_TOKEN, costless_throttle
from tests.support.serve import free_port, init, serve, sqlite_env

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from broker.sim.server import SimServer

BROKER = [sys.executable, "-m", "broker"]
COURSE = "/api/v1/courses/1201"
WORKER_ID_PREFIX = 20  # hex digits of a request id that name its process


@pytest.fixture
def two_workers(tmp_path: Path, sim: SimServer) -> Iterator[tuple[str, dict[str, str], Path]]:
    """A SQLite broker with two worker processes; yields its URL, admin headers and env file."""
    sim.state.throttle = costless_throttle()  # load is under test, not Canvas's rate limit
    env = sqlite_env(tmp_path)
    admin = init(env)
    port = free_port()
    server = serve(env, port, tmp_path / "serve.log", workers=2)
    url = f"http://127.0.0.1:{port}"
    try:
        for path, body in [
            ("/broker/v1/upstreams", {"name": "sim", "base_url": sim.base_url}),
            ("/broker/v1/credentials", {"upstream": "sim", "name": "w", "token": WORKER_TOKEN}),
        ]:
            assert httpx.post(url + path, json=body, headers=admin).status_code == 201
        # Storing the credential asked the simulator who the token is; count from here.
        sim.state.received.clear()
        yield url, admin, tmp_path
    finally:
        server.terminate()
        server.wait(timeout=30)


def _client_token(url: str, admin: dict[str, str]) -> tuple[str, str]:
    created = httpx.post(
        f"{url}/broker/v1/clients",
        headers=admin,
        json={"name": "job", "credential": "w", "scopes": [f"url:GET|{COURSE}"]},
    ).json()
    minted = httpx.post(
        f"{url}/broker/v1/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(created["client_id"], created["client_secret"]),
    ).json()
    return created["client_id"], minted["access_token"]


def _call(url: str, token: str) -> tuple[int, str]:
    # A new connection per call, so the kernel spreads the calls over both workers.
    response = httpx.get(
        url + COURSE, headers={"Authorization": f"Bearer {token}", "Connection": "close"}
    )
    return response.status_code, response.headers["x-request-id"][:WORKER_ID_PREFIX]


def test_two_workers_extend_one_audit_chain_that_verifies(
    two_workers: tuple[str, dict[str, str], Path], sim: SimServer
) -> None:
    url, admin, workdir = two_workers
    _client_id, token = _client_token(url, admin)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _call(url, token), range(120)))
    assert {status for status, _ in results} == {200}
    assert len({worker for _, worker in results}) == 2  # both workers served calls
    assert len(sim.state.received) == 120
    settings = Settings(database_url=f"sqlite:///{workdir / 'broker.sqlite3'}")
    engine = create_sync_engine(settings.async_database_url)
    keyring = load_key_file(workdir / "broker.key")
    try:
        # Both workers' events go through the one audit hub of `broker serve`; completions
        # nobody waits for follow within its completion delay (a bounded wait here).
        deadline = time.monotonic() + 20
        while True:
            with engine.connect() as connection:
                report = verify_log(connection, keyring)
            if report.incomplete == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        engine.dispose()
    assert report.ok, report.problem
    assert report.incomplete == 0
    # Two events per forwarded call (pending, then completion), plus the admin and token ones.
    assert report.checked >= 2 * 120 + 4
    assert "audit hub" not in (workdir / "serve.log").read_text()


def test_a_revocation_on_one_worker_applies_at_once_on_the_other(
    two_workers: tuple[str, dict[str, str], Path], sim: SimServer
) -> None:
    url, admin, _workdir = two_workers
    client_id, token = _client_token(url, admin)
    with ThreadPoolExecutor(8) as pool:
        warm = list(pool.map(lambda _: _call(url, token), range(40)))
    assert {status for status, _ in warm} == {200}
    assert len({worker for _, worker in warm}) == 2  # both workers hold the token in cache
    revoked = httpx.post(f"{url}/broker/v1/clients/{client_id}/revoke-tokens", headers=admin)
    assert revoked.status_code == 200
    forwarded = len(sim.state.received)
    with ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda _: _call(url, token), range(40)))
    assert {status for status, _ in after} == {401}
    assert len({worker for _, worker in after}) == 2  # ...and both refused it right away
    assert len(sim.state.received) == forwarded
