"""Soak and faults: a healthy client's latency while the broker is abused, and what it keeps.

Run by hand (not in CI); see README.md, "Soak and faults":

    .venv/bin/python bench/soak.py                       # about three minutes, SQLite
    .venv/bin/python bench/soak.py --phase-seconds 5 --no-save   # a quick look
    .venv/bin/python bench/soak.py --postgres postgresql://postgres@127.0.0.1:5432/postgres

Everything runs on loopback and every loop is bounded by the phase length. It starts the
simulator and one ``broker serve`` under a 1,024 open-file limit (soft and hard, as on many
hosts), provisions a healthy client, and then, phase by phase, runs one abuse pattern while
the healthy client calls the proxy in a loop: nothing (the baseline); 1,100 connections that
never send a byte; 500 connections trickling a request head at a byte a second; a token storm
(threads minting as fast as they can, with right and wrong secrets); an upstream that answers
with an endless response head, one with 500 header fields, and one that never answers. For
each phase it reports the healthy client's calls, failures, p50 and p99, and the broker's
resident memory and open descriptors at the end; for the whole run the RSS and descriptors at
start and end and the peak RSS (VmHWM). With ``--postgres`` it also starts a second broker on
that database through a loopback relay, blackholes the relay and measures the time to the
first ``503``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from procs import BenchError, Child, Children, free_port, wait_http

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

from tests.support.relay import Relay  # noqa: E402 - after the path is set

WORKER_TOKEN = "soak-worker-token"
COURSE = "/api/v1/courses/1201"
OPEN_FILES = 1024
SILENT = 1100
TRICKLING = 500
STORM_THREADS = 8
START_TIMEOUT_S = 60.0
HEALTHY_INTERVAL_S = 0.2


@dataclass
class Options:
    """Command-line options."""

    phase_seconds: float
    postgres: str | None
    results_dir: Path | None


@dataclass
class Phase:
    """What the healthy client saw during one abuse pattern, and the broker after it."""

    name: str
    calls: int = 0
    failures: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    rss_mib: float = 0.0
    open_fds: int = 0
    note: str = ""

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures."""
        ordered = sorted(self.latencies_ms)

        def pick(fraction: float) -> float | None:
            if not ordered:
                return None
            return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 1)

        return {
            "phase": self.name,
            "healthy_calls": self.calls,
            "healthy_failures": self.failures,
            "p50_ms": pick(0.5),
            "p99_ms": pick(0.99),
            "rss_mib": self.rss_mib,
            "open_fds": self.open_fds,
            "note": self.note,
        }


def say(text: str) -> None:
    """Progress on standard error."""
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> Options:
    """The options, checked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-seconds", type=float, default=20.0)
    parser.add_argument("--postgres", help="a PostgreSQL URL for the blackhole measurement")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if not 1 <= args.phase_seconds <= 600:
        parser.error("--phase-seconds must be 1 to 600")
    return Options(args.phase_seconds, args.postgres, None if args.no_save else args.results_dir)


def memory(pid: int) -> tuple[float, float, int]:
    """VmRSS and VmHWM in MiB, and open descriptors, of ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    values = {
        line.split(":")[0]: int(line.split()[1]) / 1024
        for line in status.splitlines()
        if line.startswith(("VmRSS", "VmHWM"))
    }
    fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    return round(values["VmRSS"], 1), round(values["VmHWM"], 1), fds


class Broker:
    """One ``broker serve`` and the admin key, clients and tokens the soak needs."""

    def __init__(
        self, children: Children, workdir: Path, env: dict[str, str], name: str, workers: int = 1
    ) -> None:
        self.children, self.workdir, self.env, self.name = children, workdir, env, name
        code, out = children.run(
            f"{name}-init", [sys.executable, "-m", "broker", "init"], timeout=120, env=env
        )
        if code != 0:
            raise BenchError(f"broker init failed: {out}")
        self.admin = {"Authorization": f"Bearer {out.strip()}"}
        self.workers = workers
        self.url, self.child = self.serve(name)

    def serve(self, name: str) -> tuple[str, Child]:
        """Start a ``broker serve`` on the same database (another replica); its URL, its child.

        Returns once every worker has started.
        """
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve = f"ulimit -n {OPEN_FILES} && exec {sys.executable} -m broker serve --port {port}"
        if self.workers > 1:
            serve += f" --workers {self.workers}"
        child = self.children.start(name, ["bash", "-c", serve], env=self.env)
        wait_http(f"{url}/healthz", child, START_TIMEOUT_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        while child.log.read_text(errors="replace").count("startup complete") < self.workers:
            if time.monotonic() > deadline or not child.alive():
                raise BenchError(f"{name}: not every worker started:\n{child.log_tail()}")
            time.sleep(0.2)
        return url, child

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """An admin API call that must succeed."""
        response = httpx.post(self.url + path, json=body, headers=self.admin, timeout=30)
        if response.status_code >= 300:
            raise BenchError(f"{path}: {response.status_code} {response.text}")
        answer: dict[str, Any] = response.json()
        return answer

    def caller(self, upstream: str, base_url: str) -> tuple[str, str]:
        """An upstream, its worker credential and a client; the client's id and secret."""
        self.post("/broker/v1/upstreams", {"name": upstream, "base_url": base_url})
        self.post(
            "/broker/v1/credentials",
            {"upstream": upstream, "name": upstream, "token": WORKER_TOKEN, "verify": False},
        )
        client = self.post(
            "/broker/v1/clients",
            {"name": f"{upstream}-job", "credential": upstream, "scopes": [f"url:GET|{COURSE}"]},
        )
        return client["client_id"], client["client_secret"]

    def token(self, client: tuple[str, str]) -> str:
        """A proxy token for ``client``."""
        response = httpx.post(
            f"{self.url}/broker/v1/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=client,
            timeout=30,
        )
        if response.status_code != 200:
            raise BenchError(f"mint: {response.status_code} {response.text}")
        token: str = response.json()["access_token"]
        return token


class BadUpstream:
    """Loopback upstreams that misbehave, on a thread of their own."""

    HUGE = b"HTTP/1.1 200 OK\r\nX-Huge: "
    MANY = (
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-F%d: v\r\n" % n for n in range(500))
        + b"Content-Length: 2\r\n\r\n[]"
    )

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise BenchError("the misbehaving upstreams did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        for name, handler in (
            ("endless-head", self._endless),
            ("many-headers", self._many),
            ("silent", self._silent),
        ):
            server = await asyncio.start_server(handler, "127.0.0.1", 0)
            self.ports[name] = server.sockets[0].getsockname()[1]

    async def _endless(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.HUGE)
            for _ in range(1024):  # at most 64 MiB per connection
                writer.write(b"a" * 65536)
                await writer.drain()
        writer.close()

    async def _many(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(self.MANY)
                await writer.drain()
        writer.close()

    async def _silent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read()  # until the broker gives up and closes
        writer.close()

    def stop(self) -> None:
        """Stop the loop (its servers go with the process)."""
        self._loop.call_soon_threadsafe(self._loop.stop)


def healthy_loop(url: str, token: str, phase: Phase, stop: threading.Event) -> None:
    """Sequential calls on one keep-alive connection until ``stop``."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = client.get(url + COURSE, headers=headers)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            phase.latencies_ms.append((time.perf_counter() - started) * 1000)
            phase.calls += 1
            phase.failures += 0 if ok else 1
            # Five calls a second: a steady job, well within Canvas's rate limit (the
            # simulator's bucket leaks 10 a second), so what it sees is the broker's doing.
            stop.wait(HEALTHY_INTERVAL_S)


def silent_connections(port: int, stop: threading.Event, count: int) -> str:
    """Hold ``count`` connections that never send a byte; how many stayed open."""
    held = []
    for _ in range(count):
        if stop.is_set():
            break
        with contextlib.suppress(OSError):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
    stop.wait()
    still = 0
    for sock in held:
        sock.settimeout(0.0)
        try:
            still += 1 if sock.recv(1) else 0
        except BlockingIOError:
            still += 1
        except OSError:
            pass
        sock.close()
    return f"{len(held)} opened, {still} still open at the end"


def trickling_connections(port: int, stop: threading.Event, count: int) -> str:
    """``count`` connections sending a request head at one byte a second."""
    head = b"GET /api/v1/courses/1201 HTTP/1.1\r\nHost: broker\r\nX-Slow: " + b"x" * 200
    socks = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
    sent = 0
    closed = 0
    while not stop.wait(1.0) and sent < len(head):
        for sock in list(socks):
            try:
                sock.send(head[sent : sent + 1])
            except OSError:
                socks.remove(sock)
                sock.close()
                closed += 1
        sent += 1
    for sock in socks:
        sock.close()
    return f"{count} trickling, {closed} closed by the broker before the phase ended"


def token_storm(url: str, client: tuple[str, str], stop: threading.Event) -> str:
    """Threads minting as fast as they can, half with a wrong secret; the answers by status."""
    counts: dict[int, int] = {}
    lock = threading.Lock()

    def mint(*, wrong: bool) -> None:
        auth = (client[0], "wrong-secret") if wrong else client
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                try:
                    status = http.post(
                        f"{url}/broker/v1/oauth/token",
                        data={"grant_type": "client_credentials"},
                        auth=auth,
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                with lock:
                    counts[status] = counts.get(status, 0) + 1

    threads = [
        threading.Thread(target=mint, kwargs={"wrong": n % 2 == 1}) for n in range(STORM_THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return "mints by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def bad_calls(url: str, token: str, stop: threading.Event) -> str:
    """Calls through a misbehaving upstream as fast as they come back; answers by status."""
    counts: dict[int, int] = {}
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            try:
                status = client.get(url + COURSE, headers={"Authorization": f"Bearer {token}"})
                counts[status.status_code] = counts.get(status.status_code, 0) + 1
            except httpx.HTTPError:
                counts[0] = counts.get(0, 0) + 1
    return "calls by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def run_phase(
    name: str,
    broker: Broker,
    token: str,
    seconds: float,
    abuse: Any | None,  # noqa: ANN401
) -> Phase:
    """The healthy client's loop for ``seconds`` while ``abuse(stop)`` runs."""
    phase = Phase(name)
    stop = threading.Event()
    notes: list[str] = []
    healthy = threading.Thread(target=healthy_loop, args=(broker.url, token, phase, stop))
    abuser = (
        threading.Thread(target=lambda: notes.append(abuse(stop))) if abuse is not None else None
    )
    if abuser is not None:
        abuser.start()
        time.sleep(min(2.0, seconds / 4))  # let the abuse build up first
    healthy.start()
    time.sleep(seconds)
    stop.set()
    healthy.join(30)
    if abuser is not None:
        abuser.join(60)
    phase.rss_mib, _peak, phase.open_fds = memory(broker_pid(broker))
    phase.note = "; ".join(notes)
    summary = phase.summary()
    say(
        f"  {name}: {summary['healthy_calls']} calls, {summary['healthy_failures']} failed, "
        f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, RSS {phase.rss_mib} MiB, "
        f"{phase.open_fds} fds; {phase.note}"
    )
    return phase


def broker_pid(broker: Broker) -> int:
    """The serving process (``bash -c 'ulimit …; exec …'`` became it)."""
    return broker.child.pid


def blackhole_time(children: Children, workdir: Path, postgres: str) -> dict[str, Any]:
    """Seconds from blackholing the database to a broker's first 503, and what it answered."""
    from sqlalchemy import create_engine, make_url, text  # noqa: PLC0415

    given = make_url(postgres)
    name = f"broker_soak_{os.getpid()}"
    admin = create_engine(given, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        return _blackhole_time(children, workdir, given.set(database=name))
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _blackhole_time(children: Children, workdir: Path, database: Any) -> dict[str, Any]:  # noqa: ANN401 - a SQLAlchemy URL
    with Relay(database.host or "127.0.0.1", database.port or 5432) as relay:
        relayed = database.set(host="127.0.0.1", port=relay.port)
        env = {
            **base_env(workdir / "pg"),
            "BROKER_DATABASE_URL": relayed.render_as_string(hide_password=False),
        }
        (workdir / "pg").mkdir()
        broker = Broker(children, workdir / "pg", env, "broker-pg")
        client = broker.caller("sim", SIM_URL[0])
        token = broker.token(client)
        relay.blackhole()
        started = time.monotonic()
        response = httpx.get(
            broker.url + COURSE, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
        seconds = time.monotonic() - started
        ready = httpx.get(f"{broker.url}/readyz", timeout=60).status_code
        relay.restore()
        children.stop(broker.child)
    return {
        "seconds_to_answer": round(seconds, 2),
        "status": response.status_code,
        "error": response.json().get("error") if response.status_code != 200 else None,
        "readyz": ready,
    }


SIM_URL: list[str] = []


def start_sim(children: Children, token: str) -> str:
    """Start the simulator, knowing ``token``, on a free port; its URL once it answers."""
    port = free_port()
    argv = [sys.executable, "-m", "broker", "canvas-sim", "--port", str(port), "--token", token]
    sim = children.start("sim", argv)
    url = f"http://127.0.0.1:{port}"
    wait_answering(f"{url}/api/v1/users/self", sim)
    return url


def wait_answering(url: str, child: Any) -> None:  # noqa: ANN401 - procs.Child
    """Wait until ``url`` answers anything (bounded)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited early:\n{child.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=2)
            return
        time.sleep(0.1)
    raise BenchError(f"{child.name} did not answer at {url}")


def base_env(workdir: Path) -> dict[str, str]:
    """The broker's environment: nothing inherited from BROKER_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_HOME"] = str(workdir)
    env["BROKER_DATABASE_URL"] = f"sqlite:///{workdir / 'broker.sqlite3'}"
    env["BROKER_KEY_FILE"] = str(workdir / "broker.key")
    env["BROKER_ACCESS_LOG"] = "false"
    env["BROKER_UPSTREAM_TIMEOUT"] = "5"  # the silent upstream's calls end within a phase
    return env


def main(argv: list[str] | None = None) -> int:
    """Run the soak; print the report; save it unless --no-save."""
    options = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ctb-soak-"))
    children = Children(workdir)
    bad = BadUpstream()
    seconds = options.phase_seconds
    try:
        SIM_URL.append(start_sim(children, WORKER_TOKEN))
        broker = Broker(children, workdir, base_env(workdir), "broker")
        healthy = broker.token(broker.caller("sim", SIM_URL[0]))
        storm_client = broker.caller("storm", SIM_URL[0])
        bad_tokens = {
            name: broker.token(broker.caller(name, f"http://127.0.0.1:{port}"))
            for name, port in bad.ports.items()
        }
        start_rss, _hwm, start_fds = memory(broker_pid(broker))
        say(f"broker up: RSS {start_rss} MiB, {start_fds} fds; {seconds:g} s per phase")
        phases = [
            run_phase("baseline", broker, healthy, seconds, None),
            run_phase(
                f"{SILENT} silent connections",
                broker,
                healthy,
                seconds,
                lambda stop: silent_connections(broker.port, stop, SILENT),
            ),
            run_phase(
                f"{TRICKLING} trickling heads",
                broker,
                healthy,
                seconds,
                lambda stop: trickling_connections(broker.port, stop, TRICKLING),
            ),
            run_phase(
                "token storm",
                broker,
                healthy,
                seconds,
                lambda stop: token_storm(broker.url, storm_client, stop),
            ),
        ]
        for name, token in bad_tokens.items():
            phases.append(
                run_phase(
                    f"upstream: {name}",
                    broker,
                    healthy,
                    seconds,
                    lambda stop, token=token: bad_calls(broker.url, token, stop),
                )
            )
        phases.append(run_phase("after", broker, healthy, seconds, None))
        end_rss, peak_rss, end_fds = memory(broker_pid(broker))
        blackhole = (
            blackhole_time(children, workdir, options.postgres) if options.postgres else None
        )
    finally:
        children.stop_all()
        bad.stop()
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "phase_seconds": seconds,
        "open_file_limit": OPEN_FILES,
        "rss_mib": {"start": start_rss, "end": end_rss, "peak": peak_rss},
        "open_fds": {"start": start_fds, "end": end_fds},
        "phases": [phase.summary() for phase in phases],
        "postgres_blackhole": blackhole,
    }
    print(json.dumps(report, indent=2))
    if options.results_dir is not None:
        options.results_dir.mkdir(parents=True, exist_ok=True)
        path = options.results_dir / f"{datetime.now(UTC):%Y-%m-%d}-soak.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        say(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
