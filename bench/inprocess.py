"""The broker's own work per proxied call, in one process, without sockets.

::

    .venv/bin/python bench/inprocess.py                       # 20,000 calls at c=32, then c=1
    .venv/bin/python bench/inprocess.py --calls 3000 --concurrency 32 --profile
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/inprocess.py --calls 2000 --concurrency 32 --legs broker

It drives the broker's ASGI app (``broker.app.create_app``, on a fresh SQLite database with
its durable audit log) and the floor's (``bench/floor.py``'s ``FloorApp``) directly with the
benchmark's request, and answers every upstream call with the benchmark's Canvas page
(``bench/upstream.py``) without a socket. What is left out is what both legs of ``./dev bench``
share: the HTTP server, the sockets, the upstream client and the load generator. What is
measured is the CPU of this process (all its threads, the audit writer's included) per call,
for each leg, and the broker's minus the floor's: the broker's own work (token, rules, audit,
rewriting, metrics). Under callgrind the counts are instructions, the same from run to run
whatever else the machine is doing (bench/README.md, "Where the time goes").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import uvloop
from floor import FloorApp
from upstream import PAGE_SIZE, canvas_page, link_header

from broker.app import create_app
from broker.config import Settings
from broker.context import ProcessContext
from broker.keyring import Keyring
from broker.services.management import Actor, ManagementService
from broker.storage.database import upgrade_schema

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

PATH = "/api/v1/courses/1201/assignments"
SCOPE = "url:GET|/api/v1/courses/:course_id/assignments"
ORIGIN = "http://canvas.bench"
WORKER_TOKEN = "bench-worker-token-inprocess-0001"
LOCAL = Actor(key_id=None, role="admin")


class CannedResponse:
    """A response whose head and body are already here (the upstream client's protocol)."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self._body = body

    async def body(self) -> AsyncIterator[bytes]:
        """The body in one chunk."""
        yield self._body

    async def read(self) -> bytes:
        """The whole body."""
        return self._body

    def release(self) -> None:
        """Nothing to return to a pool."""


class CannedCanvas:
    """A forwarder answering as ``bench/upstream.py`` does, after one turn of the loop."""

    def __init__(self) -> None:
        page = canvas_page(1201, PAGE_SIZE)
        self._page = (
            [
                (b"content-type", b"application/json; charset=utf-8"),
                (b"content-length", str(len(page)).encode()),
                (b"link", link_header(ORIGIN, PATH, PAGE_SIZE)),
                (b"cache-control", b"private, max-age=0, must-revalidate"),
                (b"x-request-cost", b"0.0123"),
                (b"x-rate-limit-remaining", b"700.0"),
            ],
            page,
        )
        self._self = json.dumps({"id": 1, "name": "Bench Worker", "login_id": "bench"}).encode()
        self.calls = 0

    async def send(
        self, method: str, url: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> CannedResponse:
        """Canvas's answer: the page, or who the token is (when a credential is stored)."""
        del method, headers, body
        self.calls += 1
        await asyncio.sleep(0)  # a real round trip lets the other calls run meanwhile
        if url.split("?", 1)[0].endswith("/users/self"):
            return CannedResponse(200, [(b"content-type", b"application/json")], self._self)
        page_headers, page = self._page
        return CannedResponse(200, list(page_headers), page)

    async def aclose(self) -> None:
        """Nothing to close."""


def scope_for(token: str) -> dict[str, Any]:
    """The benchmark's request as uvicorn hands it to the app."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"inprocess-bench"),
            (b"accept", b"*/*"),
            (b"authorization", f"Bearer {token}".encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


async def call(app: Callable[..., Awaitable[None]], token: str) -> tuple[int, bytes]:
    """One request through ``app``; its status and body."""
    status = 0
    body = b""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
        elif status != 200:
            body += message.get("body", b"")

    await app(scope_for(token), receive, send)
    return status, body


async def drive(
    app: Callable[..., Awaitable[None]], token: str, calls: int, concurrency: int
) -> tuple[float, float]:
    """``calls`` requests from ``concurrency`` loops; CPU and wall seconds per call."""
    remaining = calls

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            status, body = await call(app, token)
            if status != 200:
                raise RuntimeError(f"the call was answered {status}: {body.decode()}")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return (time.process_time() - cpu) / calls, (time.perf_counter() - wall) / calls


async def provisioned(url: str) -> tuple[ProcessContext, Any, str]:
    """A broker on the migrated database ``url`` with one client granted the benchmark's path."""
    # A generous store bound: under callgrind every call is about fifty times slower.
    settings = Settings(database_url=url, keys=None, public_url=None, audit_timeout=120)
    context = ProcessContext.from_settings(
        settings, keyring=Keyring.generate(), forwarder=CannedCanvas()
    )
    management = ManagementService(context.sessions, context.keyring, settings)
    _key, admin = await management.create_admin_key(LOCAL, name="bench", role="admin")
    await management.create_upstream(LOCAL, name="canvas", base_url=ORIGIN)
    # Not asked of Canvas: there is none here (the forwarder below answers every call).
    await management.create_credential(
        LOCAL, upstream="canvas", name="worker", token=WORKER_TOKEN, verify=False
    )
    app = create_app(context=context)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
        created = await http.post(
            "/broker/v1/clients",
            headers={"Authorization": f"Bearer {admin}"},
            json={"name": "bench", "credential": "worker", "scopes": [SCOPE]},
        )
        created.raise_for_status()
        body = created.json()
        minted = await http.post(
            "/broker/v1/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=(body["client_id"], body["client_secret"]),
        )
        minted.raise_for_status()
    return context, app, minted.json()["access_token"]


async def run(args: argparse.Namespace) -> None:
    """Each leg at each concurrency: warm up, then measure."""
    with (
        tempfile.TemporaryDirectory(prefix="inprocess-bench-") as tmp,
        (Path(tmp) / "access.log").open("w") as access_log,
        contextlib.redirect_stderr(access_log),  # the access lines go to a file, as in serve
    ):
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'broker.db'}"
        await asyncio.to_thread(upgrade_schema, url)  # Alembic runs its own event loop
        context, broker, token = await provisioned(url)
        floor = FloorApp(ORIGIN, WORKER_TOKEN, CannedCanvas())
        legs = {"floor": floor, "broker": broker}
        try:
            for concurrency in args.concurrency:
                measured: dict[str, float] = {}
                for name in args.legs:
                    app = legs[name]
                    await drive(app, token, min(args.calls, 2000), concurrency)  # warm-up
                    await context.audit_writer.flush()
                    profile = (
                        cProfile.Profile(time.thread_time)  # CPU, not waits for the GIL or disk
                        if args.profile and name == "broker"
                        else None
                    )
                    if profile is not None:
                        profile.enable()
                    cpu, wall = await drive(app, token, args.calls, concurrency)
                    await context.audit_writer.flush()
                    if profile is not None:
                        profile.disable()
                        pstats.Stats(profile).sort_stats("tottime").print_stats(30)
                    measured[name] = cpu
                    print(
                        f"{name:6} c={concurrency:<4} {cpu * 1e6:7.1f} us CPU per call "
                        f"({1 / wall:,.0f} calls/s)"
                    )
                if {"floor", "broker"} <= measured.keys():
                    broker_cpu, floor_cpu = measured["broker"], measured["floor"]
                    print(
                        f"broker/floor c={concurrency}: {broker_cpu / floor_cpu:.2f}x; "
                        f"the broker's own work {(broker_cpu - floor_cpu) * 1e6:.1f} us per call"
                    )
        finally:
            await context.aclose()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per point (20000)")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[32, 1],
        help="concurrent callers per point, a list such as 32,1 (the default)",
    )
    parser.add_argument(
        "--legs",
        type=lambda text: text.split(","),
        default=["floor", "broker"],
        help="floor,broker (the default) or one of them",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print cProfile's top functions of the broker leg"
    )
    args = parser.parse_args(argv)
    # On uvloop, as ``broker serve`` runs.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(args))


if __name__ == "__main__":
    main()
