"""The proxy benchmark: direct upstream vs nginx vs a minimal Python proxy vs the broker.

All on loopback; see README.md.

./dev bench                                   # SQLite, 10 s per point, c = 1, 8, 32, 128
./dev bench --duration 3 --concurrency 1,32   # a quick look
./dev bench --database postgresql://postgres@127.0.0.1/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from procs import BenchError, Child, Children, cpu_seconds, free_port, wait_http
from report import markdown, summarise

if TYPE_CHECKING:
    from types import FrameType

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CANVAS_PATH = "/api/v1/courses/1201/assignments"
SCOPE = "url:GET|/api/v1/courses/:course_id/assignments"
TARGETS = ("direct", "nginx", "floor", "broker")
PACKAGES = (
    "canvas-token-broker",
    "uvicorn",
    "uvloop",
    "httptools",
    "aiohttp",
    "fastapi",
    "starlette",
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
)
START_TIMEOUT_S = 30.0
QUIESCE_TIMEOUT_S = 10.0

WRK_SCRIPT = """
-- Prints the run's summary as one JSON line (latencies in microseconds).
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"non_2xx_3xx":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"timeout":%d,"p50":%.1f,"p90":%.1f,"p99":%.1f,"max":%.1f,"mean":%.1f}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class Options:
    """The command line, checked."""

    duration: int
    warmup: int
    concurrency: tuple[int, ...]
    targets: tuple[str, ...]
    database: str | None
    workers: tuple[int, ...]
    loadgen: str
    results_dir: Path | None
    keep_workdir: bool


@dataclass
class Target:
    """Where load goes, with which header, and whose CPU is charged for it."""

    name: str
    url: str
    authorization: str
    process: Child


@dataclass
class Run:
    """Everything started for one benchmark run."""

    options: Options
    workdir: Path
    children: Children
    worker_token: str = field(default_factory=lambda: "bench-worker-" + secrets.token_urlsafe(24))
    upstream: Child | None = None
    upstream_url: str = ""
    database_label: str = "sqlite"
    database_url: str = ""
    drop_database: tuple[str, str] | None = None  # (maintenance URL, database name)
    broker_keys: str = ""  # BROKER_KEYS of the broker under test, to verify its audit chain
    broker_client: tuple[str, str] | None = None  # (client id, secret) provisioned for it
    notes: list[str] = field(default_factory=list)


def say(text: str) -> None:
    """Progress on standard error (standard output gets the final table)."""
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> Options:
    """Read and check the command line."""
    parser = argparse.ArgumentParser(
        prog="./dev bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per point (10)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per target (2)")
    parser.add_argument("--concurrency", default="1,8,32,128", help="connections per point")
    parser.add_argument("--targets", default=",".join(TARGETS), help="direct,nginx,floor,broker")
    parser.add_argument(
        "--database",
        default=None,
        help="sqlite (default: a file in a temp dir) or a PostgreSQL server URL such as\n"
        "postgresql://postgres@127.0.0.1/postgres: a fresh database is created there\n"
        "for the run and dropped after it",
    )
    parser.add_argument(
        "--workers",
        default="1",
        help="broker worker processes (1); a list such as 1,2 runs one broker leg per\n"
        "count, their points interleaved, so the scaling ratio comes from one run",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "builtin"),
        default="auto",
        help="wrk if installed (auto), or the built-in aiohttp client",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=BENCH_DIR / "results",
        help="where <date>-<db>.json/.md go (bench/results)",
    )
    parser.add_argument("--no-save", action="store_true", help="print only, write no files")
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the temp dir (logs, database)"
    )
    args = parser.parse_args(argv)
    try:
        concurrency = tuple(int(item) for item in args.concurrency.split(",") if item.strip())
    except ValueError:
        parser.error("--concurrency takes numbers such as 1,8,32,128")
    targets = tuple(item.strip() for item in args.targets.split(",") if item.strip())
    unknown = [name for name in targets if name not in TARGETS]
    if unknown or not targets:
        parser.error(f"--targets takes a list of {', '.join(TARGETS)}")
    if not concurrency or min(concurrency) < 1:
        parser.error("--concurrency needs at least one number >= 1")
    try:
        workers = tuple(sorted({int(item) for item in args.workers.split(",") if item.strip()}))
    except ValueError:
        parser.error("--workers takes a number or a list such as 1,2")
    if args.duration < 1 or args.warmup < 0 or not workers or min(workers) < 1:
        parser.error("--duration and --workers must be >= 1, --warmup >= 0")
    database = args.database
    if database in {None, "sqlite"}:
        database = None
    elif not database.startswith(("postgresql://", "postgres://")):
        parser.error("--database takes 'sqlite' or a postgresql:// URL")
    return Options(
        duration=args.duration,
        warmup=args.warmup,
        concurrency=concurrency,
        targets=tuple(name for name in TARGETS if name in targets),
        database=database,
        workers=workers,
        loadgen=args.loadgen,
        results_dir=None if args.no_save else args.results_dir,
        keep_workdir=args.keep_workdir,
    )


# Environment ----------------------------------------------------------------------------------


def _command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def environment(run: Run, loadgen: str) -> dict[str, Any]:
    """The facts a reader needs to compare this run with another."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    nginx = shutil.which("nginx")
    wrk = shutil.which("wrk")
    commit = _command_output(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    dirty = _command_output(
        ["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain", "--", "broker"]
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "nginx": _command_output([nginx, "-v"]).removeprefix("nginx version: ") if nginx else None,
        "wrk": _command_output([wrk, "-v"]).splitlines()[0] if wrk else None,
        "load_generator": loadgen,
        "database": run.database_label,
        "database_version": database_version(run),
        "broker_workers": run.options.workers,
        "fdatasync_us": fdatasync_latency(run.workdir),
        "python_speed_ms": python_speed(),
        "git_commit": commit or None,
        "broker_tree_modified": bool(dirty),
    }


def python_speed(rounds: int = 5) -> float:
    """Milliseconds this host takes for a fixed piece of pure-Python work (best of ``rounds``).

    The broker's cost per call is mostly interpreter time, and on a shared virtual machine the
    interpreter's speed moves with the host (seen here: 3x between two sessions a few days
    apart). Recorded so a run can be set against another: a broker leg's CPU per request
    divided by this number moves far less between runs than either alone.
    """
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        total = 0
        for number in range(1_000_000):
            total += number & 7
        text = json.dumps({"numbers": list(range(2000)), "total": total}, sort_keys=True)
        for _ in range(200):
            hmac.new(b"k" * 32, text.encode(), "sha256").hexdigest()
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def fdatasync_latency(directory: Path, rounds: int = 200) -> dict[str, float]:
    """p50/p90 of ``fdatasync`` after an 8 KiB overwrite in ``directory``, in microseconds.

    SQLite's durable audit commits one such sync per group of calls, so on this kind of
    machine the disk's sync latency, which varies with the host, moves the broker's numbers
    (seen here: 103 us one hour, 160 us the next). Recorded so runs can be compared.
    """
    path = directory / "fdatasync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"\0" * 8192 * 64)
        os.fsync(fd)
        times = []
        for n in range(rounds):
            os.pwrite(fd, b"x" * 8192, (n % 64) * 8192)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - started) * 1e6)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return {"p50": round(times[rounds // 2], 1), "p90": round(times[rounds * 9 // 10], 1)}


# Database -------------------------------------------------------------------------------------


async def _pg_admin(url: str, statement: str) -> None:
    import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415 - PostgreSQL runs only

    connection = await asyncpg.connect(url, timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def prepare_database(run: Run) -> None:
    """A fresh, empty database: a SQLite file in the workdir, or a new PostgreSQL database."""
    server = run.options.database
    if server is None:
        run.database_label = "sqlite"
        run.database_url = f"sqlite:///{run.workdir / 'broker.sqlite3'}"
        return
    parts = urllib.parse.urlsplit(server)
    name = f"broker_bench_{secrets.token_hex(4)}"
    say(f"creating database {name} on {parts.hostname}:{parts.port or 5432}")
    asyncio.run(_pg_admin(server, f'CREATE DATABASE "{name}"'))
    run.drop_database = (server, name)
    run.database_label = "postgresql"
    run.database_url = urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def drop_database(run: Run) -> None:
    """Drop the database created for the run (the broker is stopped by now)."""
    if run.drop_database is None:
        return
    server, name = run.drop_database
    try:
        asyncio.run(_pg_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        say(f"dropped database {name}")
    except Exception as exc:  # noqa: BLE001 - report, never mask the run's own outcome
        say(f"could not drop database {name}: {exc}")


def database_version(run: Run) -> str:
    """The database engine's version string."""
    if run.database_label == "sqlite":
        import sqlite3  # noqa: PLC0415

        return f"SQLite {sqlite3.sqlite_version}"
    from sqlalchemy import text  # noqa: PLC0415

    from broker.config import normalise_database_url  # noqa: PLC0415
    from broker.storage.database import create_engine  # noqa: PLC0415

    async def query() -> str:
        engine = create_engine(normalise_database_url(run.database_url), pool=False)
        try:
            async with engine.connect() as connection:
                return str(await connection.scalar(text("SHOW server_version")))
        finally:
            await engine.dispose()

    return f"PostgreSQL {asyncio.run(query())}"


def audit_counts(database_url: str) -> dict[str, int]:
    """Proxied calls by ``state/decision[/reason]``, read straight from the audit table.

    A forwarded call is a pending event plus a completion event naming it; a call counts as
    ``complete`` once its completion is written.
    """
    from sqlalchemy import case, func, select  # noqa: PLC0415

    from broker.config import normalise_database_url  # noqa: PLC0415
    from broker.storage.audit_events import Completion  # noqa: PLC0415
    from broker.storage.database import create_engine  # noqa: PLC0415
    from broker.storage.models import AuditEventRow  # noqa: PLC0415

    state = case((Completion.seq.is_not(None), "complete"), else_=AuditEventRow.state)
    reason = func.coalesce(Completion.reason, AuditEventRow.reason)

    async def query() -> dict[str, int]:
        engine = create_engine(normalise_database_url(database_url), pool=False)
        try:
            async with engine.connect() as connection:
                rows = await connection.execute(
                    select(state, AuditEventRow.decision, reason, func.count())
                    .outerjoin(Completion, Completion.completes == AuditEventRow.seq)
                    .where(AuditEventRow.kind == "proxy", AuditEventRow.completes.is_(None))
                    .group_by(state, AuditEventRow.decision, reason)
                )
                return {
                    "/".join(x for x in (state, decision, reason) if x): int(n)
                    for state, decision, reason, n in rows
                }
        finally:
            await engine.dispose()

    return asyncio.run(query())


# Processes ------------------------------------------------------------------------------------


def start_upstream(run: Run) -> None:
    """The fast Canvas stand-in, in its own process."""
    port = free_port()
    run.upstream_url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, str(BENCH_DIR / "upstream.py"), "--port", str(port)]
    run.upstream = run.children.start("upstream", [*argv, "--token", run.worker_token])
    wait_http(f"{run.upstream_url}/__bench/stats", run.upstream, START_TIMEOUT_S)
    say(f"upstream ready at {run.upstream_url}")


def upstream_stats(run: Run) -> dict[str, int]:
    """The upstream's counters (ok, unauthorized, not_found, bad_request)."""
    with urllib.request.urlopen(f"{run.upstream_url}/__bench/stats", timeout=5) as response:
        stats: dict[str, int] = json.load(response)
        return stats


def start_nginx(run: Run) -> Target | None:
    """nginx as a keep-alive ``proxy_pass`` in front of the upstream, or None if not installed."""
    nginx = shutil.which("nginx")
    if nginx is None:
        message = "nginx is not installed: skipping the nginx leg (apt-get install -y nginx)"
        say(message)
        run.notes.append(message)
        return None
    prefix = run.workdir / "nginx"
    for sub in ("", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    upstream_port = urllib.parse.urlsplit(run.upstream_url).port
    user = ""
    if os.geteuid() == 0:  # as root, nginx would drop its workers to 'nobody'
        import grp  # noqa: PLC0415
        import pwd  # noqa: PLC0415

        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    config = f"""
{user}
daemon off;
master_process on;
worker_processes {max(run.options.workers)};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream canvas {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://canvas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    conf = prefix / "nginx.conf"
    conf.write_text(config)
    argv = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    child = run.children.start("nginx", argv)
    url = f"http://127.0.0.1:{port}{CANVAS_PATH}"
    auth = f"Bearer {run.worker_token}"
    wait_authorized(url, auth, child)
    say(f"nginx ready at http://127.0.0.1:{port} ({max(run.options.workers)} worker(s))")
    return Target("nginx", url, auth, child)


def start_floor(run: Run) -> Target:
    """The minimal Python proxy (``bench/floor.py``) in front of the upstream, checked.

    Load carries a token of the floor's client, not the worker token: the upstream answers
    200 only if the floor really put the worker token in its place.
    """
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "floor.py"), "--port", str(port)]
    child = run.children.start(
        "floor", [*argv, "--upstream", run.upstream_url, "--token", run.worker_token]
    )
    url = f"http://127.0.0.1:{port}{CANVAS_PATH}"
    auth = f"Bearer bench-client-{secrets.token_urlsafe(24)}"
    wait_authorized(url, auth, child)
    request = urllib.request.Request(url, headers={"Authorization": auth})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    if body != upstream_page(run):
        raise BenchError(f"the floor's body differs from the upstream's: {body[:200]!r}")
    say(f"floor ready at http://127.0.0.1:{port} (1 process)")
    return Target("floor", url, auth, child)


def wait_authorized(url: str, authorization: str, child: Child) -> None:
    """Poll ``url`` with the header until it answers 200 (bounded)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited early:\n{child.log_tail()}")
        request = urllib.request.Request(url, headers={"Authorization": authorization})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                body = response.read()
                if response.status == 200 and body.startswith(b"["):
                    return
                last = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{child.name}: {url} did not answer 200 ({last})\n{child.log_tail()}")


async def _provision(run: Run, settings: Any) -> tuple[str, str]:  # noqa: ANN401 - Settings
    from broker import bootstrap  # noqa: PLC0415
    from broker.keyring import load_keyring  # noqa: PLC0415
    from broker.services.management import ManagementService  # noqa: PLC0415
    from broker.storage.database import create_engine, session_factory  # noqa: PLC0415

    engine = create_engine(settings.async_database_url, pool=False)
    try:
        service = ManagementService(session_factory(engine), load_keyring(settings), settings)
        actor = bootstrap.LOCAL
        await service.create_upstream(actor, name="bench-canvas", base_url=run.upstream_url)
        await service.create_credential(
            actor,
            upstream="bench-canvas",
            name="bench-worker",
            token=run.worker_token,
            # The benchmark's fast upstream answers one endpoint only.
            verify=False,
        )
        client, secret = await service.create_client(
            actor,
            name="bench-client",
            credential="bench-worker",
            scopes=[SCOPE],
            token_ttl=3600,
            max_token_ttl=12 * 3600,
        )
    finally:
        await engine.dispose()
    return client.id, secret


def start_broker(run: Run, workers: int) -> Target:
    """``broker serve --workers N`` in its own process(es), on the run's database.

    The first call migrates and provisions the database (keys, upstream, credential, client);
    every broker leg of the run serves that one database and extends its one audit chain.
    """
    from broker import bootstrap  # noqa: PLC0415 - keep `--help` fast
    from broker.config import Settings  # noqa: PLC0415
    from broker.keyring import load_keyring  # noqa: PLC0415

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if not run.broker_keys:
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        run.broker_keys = f"k1:{key}"
    env = {
        "BROKER_DATABASE_URL": run.database_url,
        "BROKER_KEYS": run.broker_keys,
        "BROKER_HOST": "127.0.0.1",
        "BROKER_PORT": str(port),
        "BROKER_PUBLIC_URL": base,
    }
    settings = Settings(
        database_url=env["BROKER_DATABASE_URL"],
        keys=env["BROKER_KEYS"],
        port=port,
        public_url=base,
    ).validated()
    if run.broker_client is None:
        bootstrap.migrate(settings, load_keyring(settings))
        run.broker_client = asyncio.run(_provision(run, settings))
    client_id, secret = run.broker_client
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    argv = [sys.executable, "-m", "broker", "serve", "--workers", str(workers)]
    name = "broker" if len(run.options.workers) == 1 else f"broker-w{workers}"
    child = run.children.start(name, argv, env={**clean_env, **env})
    wait_http(f"{base}/readyz", child, START_TIMEOUT_S)
    token = mint_token(base, client_id, secret, run.options)
    url = f"{base}{CANVAS_PATH}"
    auth = f"Bearer {token}"
    wait_authorized(url, auth, child)
    check_link_rewritten(url, auth, base)
    say(f"broker ready at {base} ({workers} worker(s), {run.database_label})")
    return Target(name, url, auth, child)


def mint_token(base: str, client_id: str, secret: str, options: Options) -> str:
    """One proxy token for the whole run (client credentials grant, basic auth)."""
    points = len(options.concurrency) * (options.duration + 5) + options.warmup + 120
    form = urllib.parse.urlencode(
        {"grant_type": "client_credentials", "expires_in": str(min(points, 12 * 3600))}
    ).encode()
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    request = urllib.request.Request(
        f"{base}/broker/v1/oauth/token",
        data=form,
        headers={"Authorization": f"Basic {basic}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            token: str = json.load(response)["access_token"]
    except urllib.error.HTTPError as exc:
        raise BenchError(f"token endpoint answered {exc.code}: {exc.read()[:300]!r}") from exc
    return token


def check_link_rewritten(url: str, authorization: str, base: str) -> None:
    """The broker rewrote the upstream's Link URLs to its own (a real proxied page)."""
    request = urllib.request.Request(url, headers={"Authorization": authorization})
    with urllib.request.urlopen(request, timeout=10) as response:
        link = response.headers.get("Link", "")
    if not link.startswith(f"<{base}/"):
        raise BenchError(f"broker response has an unexpected Link header: {link[:200]!r}")


# Load -----------------------------------------------------------------------------------------


def choose_loadgen(requested: str) -> str:
    """``wrk`` when installed (unless the built-in client was asked for)."""
    if requested == "builtin":
        return "builtin"
    if shutil.which("wrk"):
        return "wrk"
    if requested == "wrk":
        raise BenchError("wrk is not installed (apt-get install -y wrk); try --loadgen builtin")
    say("wrk is not installed: using the built-in aiohttp load client (apt-get install -y wrk)")
    return "builtin"


def drive(run: Run, loadgen: str, target: Target, concurrency: int, seconds: int) -> dict[str, Any]:
    """One closed-loop load run; a uniform summary whichever tool drove it."""
    budget = seconds + 60.0
    if loadgen == "wrk":
        script = run.workdir / "summary.lua"
        if not script.exists():
            script.write_text(WRK_SCRIPT)
        threads = min(concurrency, os.cpu_count() or 1)
        argv = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s"]
        argv += ["--latency", "-s", str(script), "-H", f"Authorization: {target.authorization}"]
        code, out = run.children.run("wrk", [*argv, target.url], budget)
        line = next((x for x in out.splitlines() if x.startswith("BENCH_JSON ")), None)
        if code != 0 or line is None:
            raise BenchError(f"wrk failed (exit {code}):\n{out[-2000:]}")
        raw = json.loads(line.removeprefix("BENCH_JSON "))
        socket_errors = sum(raw[k] for k in ("connect", "read", "write", "timeout"))
        return {
            "requests": raw["requests"],
            "elapsed_s": raw["duration_us"] / 1e6,
            "non_200": raw["non_2xx_3xx"],
            "socket_errors": socket_errors,
            "error_kinds": {k: raw[k] for k in ("connect", "read", "write", "timeout") if raw[k]},
            "latency_us": {k: raw[k] for k in ("p50", "p90", "p99", "max", "mean")},
        }
    argv = [sys.executable, str(BENCH_DIR / "loadgen.py"), "--url", target.url]
    argv += ["--header", f"Authorization: {target.authorization}"]
    argv += ["--concurrency", str(concurrency), "--duration", str(seconds)]
    code, out = run.children.run("loadgen", argv, budget)
    if code != 0:
        raise BenchError(f"built-in load client failed (exit {code}); see {run.workdir}")
    result: dict[str, Any] = json.loads(out)
    return result


def measure(run: Run, loadgen: str, target: Target, concurrency: int) -> dict[str, Any]:
    """One point: load for ``duration`` seconds, with CPU and upstream counters around it."""
    assert run.upstream is not None
    before_user, before_sys = cpu_seconds(target.process.pid)
    before_upstream = sum(cpu_seconds(run.upstream.pid))
    result = drive(run, loadgen, target, concurrency, run.options.duration)
    after_user, after_sys = cpu_seconds(target.process.pid)
    upstream_cpu = sum(cpu_seconds(run.upstream.pid)) - before_upstream
    user, system = after_user - before_user, after_sys - before_sys
    requests = max(result["requests"], 1)
    point = {
        "target": target.name,
        "concurrency": concurrency,
        "requests": result["requests"],
        "rps": result["requests"] / result["elapsed_s"],
        "p50_ms": result["latency_us"]["p50"] / 1000,
        "p90_ms": result["latency_us"]["p90"] / 1000,
        "p99_ms": result["latency_us"]["p99"] / 1000,
        "max_ms": result["latency_us"]["max"] / 1000,
        "non_200": result["non_200"],
        "socket_errors": result["socket_errors"],
        "error_kinds": result.get("error_kinds", {}),
        # For 'direct' the process under test is the upstream itself.
        "cpu_us_per_request": (user + system) / requests * 1e6,
        "cpu_user_us_per_request": user / requests * 1e6,
        "cpu_sys_us_per_request": system / requests * 1e6,
        "upstream_cpu_us_per_request": upstream_cpu / requests * 1e6,
    }
    errors = point["non_200"] + point["socket_errors"]
    say(
        f"  {target.name:<6} c={concurrency:<4} {point['rps']:>9.0f} req/s  "
        f"p50 {point['p50_ms']:.3f} ms  p99 {point['p99_ms']:.3f} ms  errors {errors}  "
        f"cpu {point['cpu_us_per_request']:.0f} us/req"
    )
    return point


def quiesce(run: Run) -> dict[str, int]:
    """Wait (bounded) until the upstream has stopped receiving requests; its counters."""
    deadline = time.monotonic() + QUIESCE_TIMEOUT_S
    stats = upstream_stats(run)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = upstream_stats(run)
        if again == stats:
            return again
        stats = again
    return stats


def bench_targets(
    run: Run, loadgen: str, targets: list[Target]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Warm each up, then every concurrency, the targets' points of one concurrency in turn.

    Interleaving keeps the points compared with each other (the floor and one broker leg per
    worker count) close in time on a host whose speed drifts. Returns the points and, per
    target, the requests the upstream received while it was driven (warm-up included): the
    upstream's counter is read before each run of load and again once it has settled after
    it, so each leg's count is its own even when legs interleave.
    """
    received = dict.fromkeys((target.name for target in targets), 0)

    def load(target: Target, concurrency: int, *, warmup: bool = False) -> dict[str, Any]:
        before = upstream_stats(run)["ok"]
        if warmup:
            result = drive(run, loadgen, target, concurrency, run.options.warmup)
        else:
            result = measure(run, loadgen, target, concurrency)
        received[target.name] += quiesce(run)["ok"] - before
        return result

    if run.options.warmup:
        for target in targets:
            load(target, min(8, max(run.options.concurrency)), warmup=True)
    points = [load(target, c) for c in run.options.concurrency for target in targets]
    return points, received


# Main -----------------------------------------------------------------------------------------


def unused_stem(directory: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... : the first with neither a .json nor a .md file.

    A second run on the same day keeps the first run's results rather than replacing them.
    """
    candidate, number = stem, 1
    while (directory / f"{candidate}.json").exists() or (directory / f"{candidate}.md").exists():
        number += 1
        candidate = f"{stem}-{number}"
    return candidate


def save(run: Run, results: dict[str, Any], table: str) -> None:
    """``<results-dir>/<date>-<db>[-w<N>[-<M>]][-<n>].json`` and ``.md``."""
    directory = run.options.results_dir
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now(UTC):%Y-%m-%d}-{run.database_label}"
    if run.options.workers != (1,):
        stem += "-w" + "-".join(str(count) for count in run.options.workers)
    stem = unused_stem(directory, stem)
    (directory / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (directory / f"{stem}.md").write_text(table)
    say(f"results written to {directory / stem}.json and .md")


def execute(run: Run) -> dict[str, Any]:
    """Start everything, run every point, check the audit trail; the results."""
    loadgen = choose_loadgen(run.options.loadgen)
    prepare_database(run)
    start_upstream(run)
    assert run.upstream is not None
    targets: list[Target] = []
    floor: list[Target] = []
    brokers: list[Target] = []
    for name in run.options.targets:
        if name == "direct":
            url = f"{run.upstream_url}{CANVAS_PATH}"
            targets.append(Target("direct", url, f"Bearer {run.worker_token}", run.upstream))
        elif name == "nginx":
            nginx = start_nginx(run)
            if nginx is not None:
                targets.append(nginx)
        elif name == "floor":
            floor = [start_floor(run)]
        else:
            brokers = [start_broker(run, workers) for workers in run.options.workers]
    env = environment(run, loadgen)
    cpus = env["cpu_count"]
    say(
        f"{len(run.options.concurrency)} point(s) x {run.options.duration} s per target, "
        f"load from {loadgen}; {cpus} CPU(s) shared by load generator, upstream and proxy"
    )
    points: list[dict[str, Any]] = []
    audit: dict[str, Any] | None = None
    for target in targets:
        say(f"{target.name}: {target.url}")
        target_points, _ = bench_targets(run, loadgen, [target])
        points.extend(target_points)
    # The floor's points interleave with the broker legs', so broker/floor compares points
    # measured moments apart.
    interleaved = floor + brokers
    if interleaved:
        say(", ".join(f"{target.name}: {target.url}" for target in interleaved))
        events_before = audit_counts(run.database_url) if brokers else {}
        group_points, received = bench_targets(run, loadgen, interleaved)
        points.extend(group_points)
        targets.extend(interleaved)
        if brokers:
            names = {broker.name for broker in brokers}
            audit = audit_summary(
                events_before,
                audit_counts(run.database_url),
                sum(received[name] for name in names),
                [point for point in group_points if point["target"] in names],
            )
            audit["chain"] = verify_chain(run)
            audit["summary"] += f"; audit chain: {audit['chain']['summary']}"
            say(audit["summary"])
    upstream = upstream_stats(run)
    if upstream["unauthorized"] or upstream["not_found"] or upstream["bad_request"]:
        run.notes.append(f"the upstream refused some requests: {upstream}")
    return {
        "environment": env,
        "options": {
            "duration_s": run.options.duration,
            "warmup_s": run.options.warmup,
            "concurrency": list(run.options.concurrency),
            "targets": [t.name for t in targets],
            "workers": list(run.options.workers),
            "path": CANVAS_PATH,
            "response_bytes": len(upstream_page(run)),
        },
        "points": points,
        "summary": summarise(points),
        "audit": audit,
        "upstream_counters": upstream,
        "notes": run.notes,
    }


def upstream_page(run: Run) -> bytes:
    """The upstream's JSON page, asked for directly."""
    request = urllib.request.Request(
        f"{run.upstream_url}{CANVAS_PATH}", headers={"Authorization": f"Bearer {run.worker_token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        page: bytes = response.read()
        return page


def verify_chain(run: Run) -> dict[str, Any]:
    """Verify the broker's audit chain after the load, as ``broker audit verify`` would."""
    from broker.config import normalise_database_url  # noqa: PLC0415
    from broker.keyring import parse_keys_setting  # noqa: PLC0415
    from broker.services.audit import verify_log  # noqa: PLC0415
    from broker.storage.database import create_sync_engine  # noqa: PLC0415

    engine = create_sync_engine(normalise_database_url(run.database_url))
    try:
        with engine.connect() as connection:
            report = verify_log(connection, parse_keys_setting(run.broker_keys))
    finally:
        engine.dispose()
    problem = report.problem
    summary = (
        f"verified {report.checked} events, {report.incomplete} incomplete"
        if report.ok
        else f"BROKEN at seq {problem['seq']}: {problem['kind']}"  # type: ignore[index]
    )
    return {**report.as_dict(), "summary": summary}


def audit_summary(
    before: dict[str, int], after: dict[str, int], forwarded: int, points: list[dict[str, Any]]
) -> dict[str, Any]:
    """Audit events written during the broker leg against the requests it forwarded."""
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    events = sum(delta.values())
    allowed = sum(n for key, n in delta.items() if key.split("/")[1] == "allow")
    measured = sum(p["requests"] for p in points)
    ok = allowed == forwarded
    return {
        "proxy_events_written": events,
        "by_state_decision": delta,
        "requests_forwarded_upstream": forwarded,
        "requests_completed_in_measured_points": measured,
        "events_match_forwarded": ok,
        "summary": (
            f"audit: {events} proxied calls recorded during the broker leg(s) "
            f"({allowed} allowed) for {forwarded} requests the upstream received from the broker "
            f"({measured} completed inside measured points; the rest are warm-up, checks and "
            f"requests in flight when a point ended): {'MATCH' if ok else 'MISMATCH'}; "
            f"events by state/decision: {delta}"
        ),
    }


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 on failure, 130 on Ctrl-C."""
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    workdir = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    run = Run(options=options, workdir=workdir, children=Children(workdir))
    code = 1
    try:
        results = execute(run)
        table = markdown(results)
        print(table)
        save(run, results, table)
        audit = results["audit"]
        code = (
            0 if audit is None or (audit["events_match_forwarded"] and audit["chain"]["ok"]) else 1
        )
    except BenchError as exc:
        say(f"benchmark failed: {exc}\n(logs in {workdir})")
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        code = 130
    finally:
        run.children.stop_all()
        drop_database(run)
        if options.keep_workdir or code == 1:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
