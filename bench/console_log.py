"""Security console on a large log: how fast do its views answer on a million events?

Run by hand (not in CI); see README.md, "Security console on a large log":

    .venv/bin/python bench/console_log.py                         # SQLite, 1,000,000 events
    .venv/bin/python bench/console_log.py --events 100000         # a quick look
    .venv/bin/python bench/console_log.py --database postgresql://postgres@127.0.0.1/postgres

It chains audit events straight into a fresh database (through the broker's own chain code,
so they verify): calls of 50 clients spread over 30 days, each a pending event and its
completion, with refusals of several reasons, token mints and a few admin actions. Then it
signs in to the console in-process (the ASGI app, as a browser would: cookie and all) and
times each view, the page rendered included, reporting the median of ``--repeat`` runs.
On PostgreSQL a fresh database ``broker_bench_<hex>`` is created on the server and dropped
after the run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import re
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BATCH = 20_000
CLIENTS = 50
DAYS = 30
REASONS = ("scope_not_granted", "constraint_violation", "token_expired", "rate_limited")


def say(text: str) -> None:
    """Progress on standard error."""
    print(text, file=sys.stderr, flush=True)


def events_for(n: int, seq: int, at: datetime) -> list[dict[str, Any]]:
    """The events of call ``n`` (a refusal every 10th, a mint every 50th, an admin every 5000th)."""
    client = f"cli_bench{n % CLIENTS:03d}"
    common = {
        "time": at,
        "request_id": f"req{n:012d}",
        "client_id": client,
        "token_id": f"tok_bench{n % 500:04d}",
        "credential_id": "cred_bench",
        "upstream": "production",
        "source_ip": "10.20.0.7",
        "user_agent": "python-requests/2.32.3",
        "kind": "proxy",
        "method": "GET",
        "path": f"/api/v1/courses/{1000 + n % 900}/assignments",
        "query": "per_page=100",
        "scope": "url:GET|/api/v1/courses/:course_id/assignments",
    }
    if n % 5000 == 0:
        return [
            {
                **common,
                "kind": "admin",
                "action": "client.update",
                "state": "complete",
                "decision": "allow",
                "actor_key_id": "key_bench",
                "completed_at": at,
                "details": {"target": client, "changes": {}},
            }
        ]
    if n % 50 == 0:
        return [
            {
                **common,
                "kind": "token",
                "action": "token.mint",
                "state": "complete",
                "decision": "allow",
                "status": 200,
                "completed_at": at,
            }
        ]
    if n % 10 == 0:
        return [
            {
                **common,
                "action": "proxy",
                "state": "complete",
                "decision": "deny",
                "reason": REASONS[n // 10 % len(REASONS)],
                "status": 403,
                "completed_at": at,
            }
        ]
    return [
        {**common, "action": "proxy", "state": "pending", "decision": "allow"},
        {
            **common,
            "action": "proxy.complete",
            "state": "complete",
            "decision": "allow",
            "completes": seq,
            "completed_at": at,
            "status": 200,
            "upstream_status": 200,
            "response_bytes": 2185,
            "duration_ms": 7.25,
            "canvas_context_id": secrets.token_hex(16),
            "details": {"canvas_request_cost": 0.5},
        },
    ]


def provision(engine: Any, end: datetime) -> None:  # noqa: ANN401
    """The upstream, credential and clients the events name (the filters look them up)."""
    from broker.storage import models  # noqa: PLC0415

    with engine.begin() as connection:
        connection.execute(
            models.Upstream.__table__.insert(),
            [
                {
                    "id": "ups_bench",
                    "name": "production",
                    "base_url": "https://canvas.invalid",
                    "enabled": True,
                    "created_at": end,
                    "updated_at": end,
                }
            ],
        )
        connection.execute(
            models.WorkerCredential.__table__.insert(),
            [
                {
                    "id": "cred_bench",
                    "name": "worker",
                    "upstream_id": "ups_bench",
                    "token_ciphertext": b"-",
                    "token_key_id": "k1",
                    "token_last4": "0000",
                    "enabled": True,
                    "created_at": end,
                    "updated_at": end,
                    "kind": "manual",
                }
            ],
        )
        connection.execute(
            models.Client.__table__.insert(),
            [
                {
                    "id": f"cli_bench{n:03d}",
                    "name": f"job-{n:03d}",
                    "credential_id": "cred_bench",
                    "auth_method": "client_secret_basic",
                    "scopes": [],
                    "constraints": {},
                    "token_ttl": 900,
                    "max_token_ttl": 3600,
                    "allow_masquerade": False,
                    "allow_includes": False,
                    "allowed_cidrs": [],
                    "canvas_weight": 1.0,
                    "enabled": True,
                    "grant_version": 1,
                    "created_at": end,
                    "updated_at": end,
                }
                for n in range(CLIENTS)
            ],
        )


def fill(database_url: str, keyring: Any, total: int, end: datetime) -> float:  # noqa: ANN401
    """Chain about ``total`` events ending at ``end``; seconds it took."""
    from broker.services.audit import chain_key  # noqa: PLC0415
    from broker.storage.audit_chain import append, lock_head  # noqa: PLC0415
    from broker.storage.database import create_sync_engine  # noqa: PLC0415

    started = time.perf_counter()
    engine = create_sync_engine(database_url, write=True)
    provision(engine, end)
    key = chain_key(keyring)
    calls = int(total / 1.8)  # about 1.8 events a call (pending + completion, refusals one)
    step = timedelta(days=DAYS) / calls
    first = end - timedelta(days=DAYS)
    n = 0
    stored = 0
    try:
        while stored < total:
            with engine.begin() as connection:
                seq = lock_head(connection).last_seq
                batch: list[dict[str, Any]] = []
                while len(batch) < BATCH and stored + len(batch) < total:
                    batch += events_for(n, seq + len(batch) + 1, first + step * n)
                    n += 1
                append(connection, key, batch)
                stored += len(batch)
            say(f"  {stored:,} events")
    finally:
        engine.dispose()
    return time.perf_counter() - started


async def measure(
    database_url: str, keys: str, repeat: int, end: datetime, total: int
) -> list[dict[str, Any]]:
    """Sign in to the console in-process and time each view; the medians."""
    import httpx  # noqa: PLC0415

    from broker import bootstrap  # noqa: PLC0415
    from broker.app import create_app  # noqa: PLC0415
    from broker.config import Settings  # noqa: PLC0415
    from broker.context import ProcessContext  # noqa: PLC0415
    from broker.keyring import parse_keys_setting  # noqa: PLC0415

    settings = Settings(database_url=database_url, keys=keys, access_log=False)
    admin = await asyncio.to_thread(
        bootstrap.create_admin_key, settings, parse_keys_setting(keys), name="b", role="auditor"
    )
    context = ProcessContext.from_settings(settings)
    app = create_app(context=context)
    views: list[tuple[str, str]] = []
    window = (end - timedelta(days=14)).strftime("%Y-%m-%dT%H:%M:%SZ")
    window_end = (end - timedelta(days=13)).strftime("%Y-%m-%dT%H:%M:%SZ")
    middle = f"req{int(total / 1.8) // 2 + 1:012d}"
    views = [
        ("newest page", "/broker/ui/audit"),
        ("one client", "/broker/ui/audit?client=cli_bench010"),
        (
            "one client, one day two weeks ago",
            f"/broker/ui/audit?client=cli_bench010&since={window}&until={window_end}",
        ),
        ("one day two weeks ago", f"/broker/ui/audit?since={window}&until={window_end}"),
        ("refusals", "/broker/ui/audit?decision=deny"),
        ("one reason", "/broker/ui/audit?reason=token_expired"),
        ("one client's refusals", "/broker/ui/audit?client=cli_bench010&decision=deny"),
        ("one request id", f"/broker/ui/audit?request_id={middle}"),
        ("one token", "/broker/ui/audit?token=tok_bench0042"),
        ("admin actions", "/broker/ui/audit?kind=admin"),
        ("token mints", "/broker/ui/audit?action=token.mint"),
        ("pending calls", "/broker/ui/audit?state=pending"),
        ("one event", f"/broker/ui/audit/events/{total // 2}"),
        ("activity, 24 h", "/broker/ui/activity.json?hours=24"),
        ("activity, 7 days", "/broker/ui/activity.json?hours=168"),
    ]
    results = []
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench"
        ) as client:
            form = await client.get("/broker/ui/sign-in")
            token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
            assert token is not None
            signed = await client.post(
                "/broker/ui/sign-in", data={"key": admin, "csrf_token": token.group(1)}
            )
            assert signed.status_code == 303, signed.text
            for name, path in views:
                timings = []
                rows = 0
                failed = None
                for _ in range(repeat):
                    started = time.perf_counter()
                    try:
                        response = await client.get(path)
                    except Exception as exc:  # noqa: BLE001 - reported, not hidden
                        failed = f"failed: {type(exc).__name__} (BROKER_AUDIT_TIMEOUT is 2 s)"
                        break
                    timings.append(time.perf_counter() - started)
                    assert response.status_code == 200, (path, response.status_code)
                    rows = response.text.count('<tr class="decision-')
                if failed is not None:
                    results.append({"view": name, "path": path, "median_ms": None, "rows": failed})
                    say(f"  {name:38} {failed}")
                    continue
                median = statistics.median(timings)
                results.append(
                    {"view": name, "path": path, "median_ms": median * 1000, "rows": rows}
                )
                say(f"  {name:38} {median * 1000:8.1f} ms  ({rows} rows)")
    finally:
        await context.aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    """Fill, measure, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--database", default="sqlite", help="sqlite, or a PostgreSQL server URL")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    from sqlalchemy import create_engine, make_url, text  # noqa: PLC0415

    from broker.keyring import parse_keys_setting  # noqa: PLC0415
    from broker.storage.database import upgrade_schema  # noqa: PLC0415

    keys = "k1:" + base64.b64encode(secrets.token_bytes(32)).decode()
    end = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="console-bench-") as workdir:
        admin_url = None
        if args.database == "sqlite":
            database_url = f"sqlite+aiosqlite:///{Path(workdir) / 'bench.sqlite3'}"
        else:
            server = make_url(args.database.replace("postgresql://", "postgresql+psycopg://", 1))
            name = f"broker_bench_{secrets.token_hex(4)}"
            admin_url = server
            database_url = server.set(
                drivername="postgresql+asyncpg", database=name
            ).render_as_string(hide_password=False)
            engine = create_engine(server, isolation_level="AUTOCOMMIT")
            with engine.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            engine.dispose()
        try:
            upgrade_schema(database_url)
            say(f"filling {args.events:,} events")
            seconds = fill(database_url, parse_keys_setting(keys), args.events, end)
            if admin_url is not None:
                # As autovacuum would soon after such a load: the planner needs the statistics.
                engine = create_engine(
                    make_url(database_url).set(drivername="postgresql+psycopg"),
                    isolation_level="AUTOCOMMIT",
                )
                with engine.connect() as connection:
                    connection.execute(text("ANALYZE"))
                engine.dispose()
            say(f"filled in {seconds:.0f} s; timing the views (median of {args.repeat})")
            results = asyncio.run(measure(database_url, keys, args.repeat, end, args.events))
        finally:
            if admin_url is not None:
                engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
                with engine.connect() as connection:
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                engine.dispose()
    print(f"| view ({args.events:,} events, {args.database.split(':')[0]}) | median | rows |")
    print("|---|---|---|")
    for result in results:
        median = result["median_ms"]
        shown = "—" if median is None else f"{median:.0f} ms"
        print(f"| {result['view']} | {shown} | {result['rows']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
