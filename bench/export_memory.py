"""Audit export memory: does ``GET /broker/v1/audit/export`` stay flat for a million events?

Run by hand (not in CI); see README.md, "Audit export memory":

    .venv/bin/python bench/export_memory.py                          # 100,000 then 1,000,000
    .venv/bin/python bench/export_memory.py --events 20000 --no-save # a quick look

It chains audit events straight into a fresh SQLite database (in large batches, through the
broker's own chain code, so they verify), starts a real ``broker serve``, and streams the
export with an auditor key, once per format, reading the server's memory from
``/proc/<pid>/status``: VmRSS after start-up, and VmHWM (the peak resident set since the
process started) after each export. The server is restarted for each size, so each peak is
that size's own.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import secrets
import sqlite3
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from procs import BenchError, Children, free_port, wait_http

BENCH_DIR = Path(__file__).resolve().parent
START_TIMEOUT_S = 60.0
EXPORT_TIMEOUT_S = 3600.0
BATCH = 10_000
EVENTS_PER_CALL = 4  # pending + completion, a refusal, a token mint
SHOWN_PER_CALL = 3  # the completion merges into its pending event


@dataclass
class Options:
    """Command-line options."""

    sizes: list[int]
    formats: list[str]
    results_dir: Path | None
    keep_workdir: bool


def say(text: str) -> None:
    """Progress on standard error."""
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> Options:
    """The options, checked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events",
        default="100000,1000000",
        help="comma-separated log sizes, ascending (events stored; default 100000,1000000)",
    )
    parser.add_argument("--formats", default="ndjson,csv", help="ndjson, csv or both")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the database and logs")
    args = parser.parse_args(argv)
    sizes = [int(item) for item in args.events.split(",") if item.strip()]
    if not sizes or sizes != sorted(sizes) or sizes[0] < EVENTS_PER_CALL:
        parser.error("--events must be ascending sizes of at least 4")
    formats = [item.strip() for item in args.formats.split(",") if item.strip()]
    if not formats or set(formats) - {"ndjson", "csv"}:
        parser.error("--formats takes ndjson and/or csv")
    return Options(sizes, formats, None if args.no_save else args.results_dir, args.keep_workdir)


def fill(database_url: str, keyring: Any, calls_from: int, calls_to: int) -> float:  # noqa: ANN401
    """Chain the events of calls ``[calls_from, calls_to)``; seconds it took."""
    from broker.services.audit import chain_key  # noqa: PLC0415
    from broker.storage.audit_chain import append, lock_head  # noqa: PLC0415
    from broker.storage.database import create_sync_engine  # noqa: PLC0415
    from broker.storage.models import utcnow  # noqa: PLC0415

    started = time.perf_counter()
    engine = create_sync_engine(database_url, write=True)
    key = chain_key(keyring)
    per_batch = BATCH // EVENTS_PER_CALL
    try:
        for start in range(calls_from, calls_to, per_batch):
            with engine.begin() as connection:
                seq = lock_head(connection).last_seq
                events: list[dict[str, Any]] = []
                for n in range(start, min(start + per_batch, calls_to)):
                    events += _call_events(n, seq + len(events) + 1, utcnow())
                append(connection, key, events)
    finally:
        engine.dispose()
    return time.perf_counter() - started


def _call_events(n: int, pending_seq: int, now: datetime) -> list[dict[str, Any]]:
    common = {
        "time": now,
        "request_id": secrets.token_hex(16),
        "client_id": f"cli_bench{n % 50:03d}",
        "token_id": f"tok_bench{n % 500:04d}",
        "credential_id": "cred_bench",
        "upstream": "production",
        "source_ip": "10.20.0.7",
        "user_agent": "python-requests/2.32.3",
    }
    call = {
        **common,
        "kind": "proxy",
        "method": "GET",
        "path": f"/api/v1/courses/{1000 + n % 900}/assignments",
        "query": "per_page=100&page=2&include[]=submission",
        "scope": "url:GET|/api/v1/courses/:course_id/assignments",
    }
    return [
        {**call, "action": "proxy", "state": "pending", "decision": "allow"},
        {
            **common,
            "kind": "proxy",
            "action": "proxy.complete",
            "state": "complete",
            "decision": "allow",
            "completes": pending_seq,
            "completed_at": now,
            "status": 200,
            "upstream_status": 200,
            "response_bytes": 2185,
            "duration_ms": 7.25,
            "canvas_context_id": secrets.token_hex(16),
        },
        {
            **call,
            "action": "proxy",
            "method": "DELETE",
            "state": "complete",
            "decision": "deny",
            "reason": "scope_not_granted",
            "status": 403,
            "completed_at": now,
            "duration_ms": 0.4,
        },
        {
            **common,
            "kind": "token",
            "action": "token.mint",
            "method": "POST",
            "path": "/broker/v1/oauth/token",
            "state": "complete",
            "decision": "allow",
            "status": 200,
            "completed_at": now,
            "details": {"expires_in": 900, "scopes": [call["scope"]]},
        },
    ]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB, from /proc/<pid>/status."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in {"VmRSS", "VmHWM"}:
            values[name] = int(rest.split()[0])
    return values


def stream(url: str, key: str) -> tuple[int, int, float]:
    """GET ``url`` with the auditor key, reading the body in 64 KiB pieces: bytes, lines, s."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    started = time.perf_counter()
    size = lines = 0
    with urllib.request.urlopen(request, timeout=EXPORT_TIMEOUT_S) as response:
        if response.status != 200:  # pragma: no cover - urlopen raises on errors
            raise BenchError(f"export answered {response.status}")
        while chunk := response.read(1 << 16):
            size += len(chunk)
            lines += chunk.count(b"\n")
    return size, lines, time.perf_counter() - started


def measure_size(
    children: Children, env: dict[str, str], auditor: str, stored: int, formats: list[str]
) -> dict[str, Any]:
    """Start ``broker serve``, export once per format, stop it; what was measured."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    child = children.start(
        f"broker-{stored}",
        [sys.executable, "-m", "broker", "serve", "--port", str(port)],
        env={**env, "BROKER_PORT": str(port)},
    )
    try:
        wait_http(f"{base}/readyz", child, START_TIMEOUT_S)
        started = memory_kib(child.pid)
        stream(f"{base}/broker/v1/audit?limit=100", auditor)  # warm-up: one review page
        warmed = memory_kib(child.pid)
        exports = []
        for export_format in formats:
            size, lines, seconds = stream(
                f"{base}/broker/v1/audit/export?format={export_format}", auditor
            )
            after = memory_kib(child.pid)
            rows = lines - (1 if export_format == "csv" else 0)
            exports.append(
                {
                    "format": export_format,
                    "events": rows,
                    "bytes": size,
                    "seconds": round(seconds, 2),
                    "events_per_s": round(rows / seconds),
                    "mib_per_s": round(size / seconds / 2**20, 1),
                    "peak_rss_kib": after["VmHWM"],
                    "rss_after_kib": after["VmRSS"],
                }
            )
            say(
                f"  {export_format}: {rows:,} events, {size / 2**20:,.0f} MiB in {seconds:.1f} s "
                f"({rows / seconds:,.0f} events/s); server peak RSS {after['VmHWM'] / 1024:.1f} "
                f"MiB (after start-up {started['VmRSS'] / 1024:.1f} MiB)"
            )
    finally:
        children.stop(child)
    return {
        "stored_events": stored,
        "rss_after_startup_kib": started["VmRSS"],
        "rss_after_warmup_kib": warmed["VmRSS"],
        "peak_rss_after_warmup_kib": warmed["VmHWM"],
        "exports": exports,
    }


def run(options: Options, workdir: Path) -> dict[str, Any]:
    """Fill, serve and export for every size; the results."""
    from broker import bootstrap  # noqa: PLC0415
    from broker.config import Settings  # noqa: PLC0415
    from broker.keyring import parse_keys_setting  # noqa: PLC0415

    keys = "k1:" + base64.b64encode(secrets.token_bytes(32)).decode()
    database = workdir / "export.sqlite3"
    settings = Settings(database_url=f"sqlite:///{database}", keys=keys).validated()
    keyring = parse_keys_setting(keys)
    bootstrap.migrate(settings, keyring)
    auditor = bootstrap.create_admin_key(settings, keyring, name="bench-auditor", role="auditor")
    assert auditor is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_DATABASE_URL=settings.database_url, BROKER_KEYS=keys)
    children = Children(workdir)
    points = []
    calls = 0
    try:
        for size in options.sizes:
            target = size // EVENTS_PER_CALL
            seconds = fill(settings.async_database_url, keyring, calls, target)
            say(f"chained {(target - calls) * EVENTS_PER_CALL:,} events in {seconds:.0f} s")
            calls = target
            stored = _count(database)
            say(f"{stored:,} events stored ({database.stat().st_size / 2**20:,.0f} MiB database)")
            point = measure_size(children, env, auditor, stored, options.formats)
            point["database_mib"] = round(database.stat().st_size / 2**20)
            points.append(point)
    finally:
        children.stop_all()
    return {
        "environment": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "sqlite": sqlite3.sqlite_version,
            "database": "SQLite (WAL, synchronous=FULL)",
        },
        "points": points,
    }


def _count(database: Path) -> int:
    with sqlite3.connect(database) as connection:
        (count,) = connection.execute("SELECT count(*) FROM audit_events").fetchone()
    return int(count)


def markdown(results: dict[str, Any]) -> str:
    """The results as a table."""
    env = results["environment"]
    lines = [
        f"# Audit export memory, {env['date']}",
        "",
        (
            f"Python {env['python']}, {env['database']} {env['sqlite']}, {env['cpu_count']} "
            f"CPUs, {env['platform']}. One `broker serve` process per size, restarted between "
            "sizes."
        ),
        "",
        (
            "| events stored | format | events exported | MiB | s | events/s "
            "| RSS after start-up MiB | peak RSS (VmHWM) MiB |"
        ),
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines.extend(
        f"| {point['stored_events']:,} | {export['format']} | {export['events']:,} | "
        f"{export['bytes'] / 2**20:,.0f} | {export['seconds']:.1f} | "
        f"{export['events_per_s']:,} | {point['rss_after_startup_kib'] / 1024:.1f} | "
        f"{export['peak_rss_kib'] / 1024:.1f} |"
        for point in results["points"]
        for export in point["exports"]
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    options = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="broker-export-bench-"))
    try:
        results = run(options, workdir)
    except BenchError as exc:
        say(f"error: {exc}")
        return 1
    finally:
        if options.keep_workdir:
            say(f"kept {workdir}")
        else:
            for path in sorted(workdir.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            workdir.rmdir()
    table = markdown(results)
    print(table)
    if options.results_dir is not None:
        options.results_dir.mkdir(parents=True, exist_ok=True)
        stem = options.results_dir / f"{datetime.now(UTC):%Y-%m-%d}-export-memory"
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        stem.with_suffix(".md").write_text(table)
        say(f"results written to {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
