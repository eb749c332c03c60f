"""``broker keys rotate`` under load: two replicas of ``broker serve --workers 2``, no failed call.

The replicas share one database (SQLite, and PostgreSQL when BROKER_TEST_DATABASE_URL is set)
and one key file, as replicas behind a load balancer share a database and a mounted key file.
Contract: docs/storage-and-keys.md#key-rotation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import create_engine, make_url, text

from broker.config import Settings, normalise_database_url
from broker.keyring import load_key_file
from broker.services.audit import verify_log
from broker.storage.database import create_sync_engine, sync_database_url
from tests.conftest import POSTGRES_URL
from tests.support.env import WORKER_TOKEN, costless_throttle
from tests.support.serve import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from broker.sim.server import SimServer

BROKER = [sys.executable, "-m", "broker"]
COURSE = "/api/v1/courses/1201"
WORKER_ID_PREFIX = 20  # hex digits of a request id that name its process
CALLS_PER_THREAD = 400  # the bound of each load thread's loop
CALLS_AFTER_ROTATION = 120


def _serve(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("w") as output:
        server = subprocess.Popen(
            [*BROKER, "serve", "--port", str(port), "--workers", "2"],
            env=env,
            stdout=output,
            stderr=output,
        )
    return server, f"http://127.0.0.1:{port}"


def _wait_started(server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while log.read_text().count("Application startup complete") < 2:
        assert server.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def _mint(url: str, admin: dict[str, str], name: str) -> str:
    created = httpx.post(
        f"{url}/broker/v1/clients",
        headers=admin,
        json={"name": name, "credential": "w", "scopes": [f"url:GET|{COURSE}"]},
        timeout=30,
    ).json()
    minted = httpx.post(
        f"{url}/broker/v1/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(created["client_id"], created["client_secret"]),
        timeout=30,
    )
    assert minted.status_code == 200, minted.text
    token: str = minted.json()["access_token"]
    return token


def _call(url: str, token: str) -> tuple[int, str, str]:
    # A new connection per call, so the kernel spreads the calls over both workers.
    response = httpx.get(
        url + COURSE,
        headers={"Authorization": f"Bearer {token}", "Connection": "close"},
        timeout=30,
    )
    worker = response.headers.get("x-request-id", "")[:WORKER_ID_PREFIX]
    return response.status_code, worker, response.text[:200]


def _rotate(env: dict[str, str]) -> str:
    rotated = subprocess.run(
        [*BROKER, "keys", "rotate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert rotated.returncode == 0, rotated.stderr
    return rotated.stderr


@dataclass
class Replicas:
    """Two `broker serve --workers 2` on one database and key file, provisioned."""

    env: dict[str, str]
    urls: list[str]
    admin: dict[str, str]
    logs: list[Path]
    workdir: Path


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database for ``broker init``: a SQLite file, or a PostgreSQL database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.sqlite3'}"
        return
    if not POSTGRES_URL:
        pytest.skip("BROKER_TEST_DATABASE_URL is not set")
    given = make_url(normalise_database_url(POSTGRES_URL))
    name = f"{given.database}_rotation{os.getpid()}"
    admin = create_engine(
        sync_database_url(given.render_as_string(hide_password=False)),
        isolation_level="AUTOCOMMIT",
    )
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield given.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def replicas(tmp_path: Path, sim: SimServer, database_url: str) -> Iterator[Replicas]:
    """Start both replicas, register the simulator and a worker credential through one."""
    sim.state.throttle = costless_throttle()  # load is under test, not Canvas's rate limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_DATABASE_URL"] = database_url
    env["BROKER_KEY_FILE"] = str(tmp_path / "broker.key")
    init = subprocess.run(
        [*BROKER, "init"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert init.returncode == 0, init.stderr
    admin = {"Authorization": f"Bearer {init.stdout.strip()}"}
    logs = [tmp_path / "replica-a.log", tmp_path / "replica-b.log"]
    servers = [_serve(env, log) for log in logs]
    try:
        for (server, _url), log in zip(servers, logs, strict=True):
            _wait_started(server, log)
        urls = [url for _server, url in servers]
        for path, body in [
            ("/broker/v1/upstreams", {"name": "sim", "base_url": sim.base_url}),
            ("/broker/v1/credentials", {"upstream": "sim", "name": "w", "token": WORKER_TOKEN}),
        ]:
            assert httpx.post(urls[0] + path, json=body, headers=admin).status_code == 201
        yield Replicas(env, urls, admin, logs, tmp_path)
    finally:
        for server, _url in servers:
            server.terminate()
        for server, _url in servers:
            server.wait(timeout=30)


class Load:
    """Threads calling both replicas with a few tokens, each loop bounded, until stopped."""

    def __init__(self, urls: list[str], tokens: list[str]) -> None:
        self.urls, self.tokens = urls, tokens
        self.stop = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()

    def run(self, offset: int) -> list[tuple[int, str, str]]:
        """One thread's calls, in order."""
        results = []
        for n in range(CALLS_PER_THREAD):
            if self.stop.is_set():
                break
            i = offset + n
            results.append(_call(self.urls[i % 2], self.tokens[i % len(self.tokens)]))
            with self._lock:
                self.calls += 1
        return results

    def wait_for_more(self, more: int, running: list[Future[list[tuple[int, str, str]]]]) -> None:
        """Let the threads make ``more`` calls (bounded by time and their own bound), then stop."""
        target = self.calls + more
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.calls < target:
            if all(future.done() for future in running):
                break
            time.sleep(0.05)
        self.stop.set()


def test_keys_rotate_under_load_on_two_replicas_of_two_workers_fails_no_call(
    replicas: Replicas, sim: SimServer
) -> None:
    urls, admin, env = replicas.urls, replicas.admin, replicas.env
    load = Load(urls, [_mint(urls[0], admin, f"job-{n}") for n in range(3)])
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(load.run, offset) for offset in range(4)]
        messages = [_rotate(env), _rotate(env)]  # k2, then k3, while the calls go on
        # Tokens minted after the rotations were never cached anywhere: each replica and
        # worker resolves them from the database, under the new key.
        fresh = [_mint(urls[1], admin, f"fresh-{n}") for n in range(2)]
        after = [_call(url, token) for url in urls for token in fresh for _ in range(4)]
        load.wait_for_more(CALLS_AFTER_ROTATION, running)
        during = [result for future in running for result in future.result()]

    assert "primary key is now 'k2'" in messages[0]
    assert "primary key is now 'k3'" in messages[1]
    results = during + after
    failed = [result for result in results if result[0] != 200]
    assert failed == [], failed[:5]
    assert len({worker for _status, worker, _body in results}) == 4  # 2 replicas x 2 workers
    # Canvas saw every call, besides the credential's verification (and the lookup of its
    # record) when it was stored.
    proxied = [r for r in sim.state.received if not r.raw_path.startswith("/api/v1/users/self")]
    assert len(proxied) == len(results)
    assert {r.header("authorization") for r in sim.state.received} == {f"Bearer {WORKER_TOKEN}"}

    keyring = load_key_file(replicas.workdir / "broker.key")
    assert (keyring.primary_id, sorted(keyring.keys)) == ("k3", ["k1", "k2", "k3"])
    engine = create_sync_engine(
        Settings(database_url=env["BROKER_DATABASE_URL"]).async_database_url
    )
    try:
        with engine.connect() as connection:
            sealed_under = connection.scalar(text("SELECT token_key_id FROM credentials"))
            report = verify_log(connection, keyring)
    finally:
        engine.dispose()
    assert sealed_under == "k3"
    assert report.ok, report.problem
    for log in replicas.logs:
        assert "does not decrypt" not in log.read_text()
