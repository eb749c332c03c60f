"""A broker killed with SIGKILL under load leaves no silent gap in the audit log.

A real ``broker serve`` process takes concurrent calls (allowed and refused) while one more
call hangs at an upstream that accepts the connection and never answers. Once that call has
reached the upstream (so its pending event was committed), the broker is killed. Afterwards
every response a client received has its audit event, the chain verifies, and the hanging
call is an incomplete (pending) event, visible as such.

Contract: docs/audit.md#fail-closed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from broker.app import create_app
from broker.bootstrap import LOCAL
from broker.config import Settings
from broker.context import ProcessContext
from broker.keyring import parse_keys_setting
from broker.services.management import ManagementService
from broker.storage.database import create_engine, session_factory
from tests.support.audit import Dba, local_env, run_broker
from tests.support.env import WORKER_TOKEN

if TYPE_CHECKING:
    from broker.sim.server import SimServer

SCOPE = "url:GET|/api/v1/courses/:id"
LOADERS = 4
CALLS_PER_LOADER = 150
RECEIVED_BEFORE_HANG = 40


@dataclass
class Provisioned:
    """What the broker serves: an auditor key, a client on the simulator, one on a dead end."""

    auditor_key: str
    loader: tuple[str, str]
    hanger: tuple[str, str]


async def provision(settings: Settings, sim_url: str, dead_end_url: str) -> Provisioned:
    engine = create_engine(settings.async_database_url, pool=False)
    try:
        service = ManagementService(
            session_factory(engine), parse_keys_setting(settings.keys or ""), settings
        )
        _key, auditor = await service.create_admin_key(LOCAL, name="siem", role="auditor")
        clients = []
        for name, base_url in (("sim", sim_url), ("dead-end", dead_end_url)):
            await service.create_upstream(LOCAL, name=name, base_url=base_url)
            await service.create_credential(
                LOCAL, upstream=name, name=f"{name}-worker", token=WORKER_TOKEN, verify=False
            )
            client, secret = await service.create_client(
                LOCAL, name=f"{name}-job", credential=f"{name}-worker", scopes=[SCOPE]
            )
            assert secret is not None
            clients.append((client.id, secret))
        return Provisioned(auditor, clients[0], clients[1])
    finally:
        await engine.dispose()


@dataclass
class Received:
    """Every response a client received: (request id, status)."""

    responses: list[tuple[str, int]] = field(default_factory=list)
    enough: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, response: httpx.Response) -> None:
        with self.lock:
            self.responses.append((response.headers["x-request-id"], response.status_code))
            if len(self.responses) >= RECEIVED_BEFORE_HANG:
                self.enough.set()


def load(url: str, token: str, received: Received) -> None:
    """Allowed and refused calls until the broker dies (or the bound is reached)."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        for n in range(CALLS_PER_LOADER):
            try:
                if n % 3 == 2:
                    response = http.delete("/api/v1/courses/1201", timeout=10)
                else:
                    response = http.get("/api/v1/courses/1201", timeout=10)
            except httpx.HTTPError:
                return
            received.add(response)


def mint(url: str, client: tuple[str, str]) -> str:
    response = httpx.post(
        f"{url}/broker/v1/oauth/token", data={"grant_type": "client_credentials"}, auth=client
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


class Served:
    """``broker serve`` in a child process; start-up is read from its log, not waited for."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if "Application startup complete" in line:
                self.started.set()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._reader.join(timeout=30)
        if self.process.stderr is not None:
            self.process.stderr.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def crash_under_load(
    cli_env: dict[str, str], provisioned: Provisioned, dead_end: socket.socket
) -> list[tuple[str, int]]:
    """Serve, load, hang one call at the dead end, SIGKILL; the responses clients received."""
    served = Served(cli_env, free_port())
    received = Received()
    try:
        assert served.started.wait(60), "".join(served.log)
        loader = mint(served.url, provisioned.loader)
        hanger = mint(served.url, provisioned.hanger)
        threads = [
            threading.Thread(target=load, args=(served.url, loader, received))
            for _ in range(LOADERS)
        ]
        for thread in threads:
            thread.start()
        assert received.enough.wait(60), "the load got no answers"
        threading.Thread(target=load_one, args=(served.url, hanger), daemon=True).start()
        # The broker forwards only after the pending event is committed.
        connection, _ = dead_end.accept()
        served.kill()
        connection.close()
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive()
    finally:
        served.kill()
    return list(received.responses)


def test_sigkill_under_load_leaves_every_answered_call_audited_and_no_gap(
    database_url: str, sim: SimServer
) -> None:
    keys = "k1:" + base64.b64encode(secrets.token_bytes(32)).decode()
    settings = Settings(database_url=database_url, keys=keys)
    cli_env = local_env(database_url, parse_keys_setting(keys))
    with socket.socket() as dead_end:
        dead_end.bind(("127.0.0.1", 0))
        dead_end.listen()
        dead_end.settimeout(60)
        dead_end_url = f"http://127.0.0.1:{dead_end.getsockname()[1]}"
        provisioned = asyncio.run(provision(settings, sim.base_url, dead_end_url))
        answered = crash_under_load(cli_env, provisioned, dead_end)

    assert len(answered) >= RECEIVED_BEFORE_HANG
    assert {status for _, status in answered} == {200, 403}
    dba = Dba.connect(settings.async_database_url)
    try:
        events = dba.events()
    finally:
        dba.close()
    calls = {row.request_id: row for row in events if row.completes is None}
    outcomes = {row.completes: row for row in events if row.completes is not None}
    for request_id, status in answered:
        assert request_id in calls, f"answered call {request_id} has no audit event"
        recorded = outcomes.get(calls[request_id].seq, calls[request_id]).status
        assert recorded in {status, None}, (request_id, status, recorded)
    [hung] = [e for e in events if e.client_id == provisioned.hanger[0] and e.kind == "proxy"]
    assert (hung.state, hung.seq in outcomes) == ("pending", False)

    verified = run_broker(["audit", "verify", "--json"], cli_env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["checked"] == len(events)
    pending = [e.seq for e in events if e.state == "pending" and e.seq not in outcomes]
    assert report["incomplete"]["count"] == len(pending) >= 1
    assert report["incomplete"]["oldest"] == pending[:10]
    assert asyncio.run(pending_through_the_api(settings, provisioned.auditor_key)) == pending


def load_one(url: str, token: str) -> None:
    """One call to the dead-end upstream; its answer never comes."""
    try:
        httpx.get(
            f"{url}/api/v1/courses/1201",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
    except httpx.HTTPError:
        return


async def pending_through_the_api(settings: Settings, auditor_key: str) -> list[int]:
    """Seqs of pending calls as the review API shows them after a restart, oldest first."""
    context = ProcessContext.from_settings(settings)
    try:
        transport = httpx.ASGITransport(app=create_app(context=context))
        async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
            response = await http.get(
                "/broker/v1/audit",
                params={"state": "pending", "limit": 1000},
                headers={"Authorization": f"Bearer {auditor_key}"},
            )
        assert response.status_code == 200, response.text
        return sorted(event["seq"] for event in response.json()["events"])
    finally:
        await context.aclose()
