"""Searching the audit log for a leaked secret, and exporting it.

A sensitive query value is stored only as a keyed HMAC; an investigator hashes the value they
hold and searches for the hash. Export streams the review API's selection as NDJSON or CSV
without loading it into memory.

Contract: docs/audit.md#hash-search, #export.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import secrets
import tracemalloc
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from broker.api.audit import CSV_COLUMNS
from broker.app import create_app
from broker.config import Settings
from broker.context import ProcessContext
from tests.support.audit import Dba, fill_audit_log
from tests.support.env import bearer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from starlette.types import ASGIApp, Message

    from broker.keyring import Keyring
    from tests.support.env import BrokerEnv

V1 = "/broker/v1"
HASH = f"{V1}/audit/hash"
EXPORT = f"{V1}/audit/export"
COURSE = "/api/v1/courses/1201"


@pytest.fixture
def dba(env: BrokerEnv) -> Iterator[Dba]:
    connection = Dba.connect(env.context.settings.async_database_url)
    yield connection
    connection.close()


async def hashes_of(env: BrokerEnv, value: str) -> dict[str, str]:
    response = await env.http.post(HASH, headers=env.auditor(), json={"value": value})
    assert response.status_code == 200, response.text
    assert value not in response.text
    hashes: dict[str, str] = response.json()["hashes"]
    return hashes


# Searching for a leaked secret -------------------------------------------------------------


async def test_leaked_token_sent_in_a_query_is_found_by_its_hash_and_stored_nowhere(
    env: BrokerEnv, dba: Dba
) -> None:
    token = await env.client_token()
    leaked = "leaked-canvas-token-" + secrets.token_hex(12)
    refused = await env.http.get(
        f"{COURSE}?per_page=10&access_token={leaked}", headers=bearer(token)
    )
    assert refused.status_code == 403
    assert refused.json()["error"] == "credential_param_denied"
    [event] = await env.audit(reason="credential_param_denied")
    assert leaked not in event["query"]

    hashes = await hashes_of(env, leaked)
    assert list(hashes) == ["k1"]
    assert hashes["k1"].startswith("hmac-sha256:")
    assert event["query"] == f"per_page=10&access_token={hashes['k1']}"
    found = await env.audit(query_contains=hashes["k1"])
    assert [e["request_id"] for e in found] == [refused.headers["x-request-id"]]
    assert await env.audit(query_contains=(await hashes_of(env, leaked + "x"))["k1"]) == []

    assert not [value for value in dba.dump() if leaked in value]


async def test_hash_request_is_audited_without_the_value_or_its_hash(
    env: BrokerEnv, dba: Dba
) -> None:
    value = "cbt_" + secrets.token_hex(16)
    hashes = await hashes_of(env, value)
    [event] = await env.audit(action="audit.hash")
    keys = (await env.http.get(f"{V1}/admin-keys", headers=env.admin())).json()
    [auditor] = [k["id"] for k in keys if k["name"] == "test-auditor"]
    assert (event["kind"], event["decision"], event["actor_key_id"]) == ("admin", "allow", auditor)
    assert (event["method"], event["path"]) == ("POST", HASH)
    assert event["details"] == {"keys": ["k1"]}
    stored = list(dba.dump())
    assert not [v for v in stored if value in v or hashes["k1"].split(":")[1] in v]


async def test_hash_response_is_not_cached(env: BrokerEnv) -> None:
    response = await env.http.post(HASH, headers=env.auditor(), json={"value": "x" * 20})
    assert response.headers["cache-control"] == "no-store"


async def test_hash_is_computed_under_every_key_of_the_keyring(env: BrokerEnv) -> None:
    rotated = env.context.keyring.with_new_primary()
    async with served(env, context_keyring=rotated) as http:
        response = await http.post(HASH, headers=env.auditor(), json={"value": "leaked"})
    assert response.status_code == 200
    hashes = response.json()["hashes"]
    assert hashes == rotated.audit_hmac_candidates("leaked")
    assert sorted(hashes) == ["k1", "k2"]
    assert hashes["k1"] == env.context.keyring.audit_hmac("leaked")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 422),
        ({"value": ""}, 422),
        ({"value": "s" * 8193}, 422),
        ({"value": "secret-value", "extra": 1}, 422),
    ],
)
async def test_bad_hash_request_is_refused_without_echoing_the_value(
    env: BrokerEnv, body: dict[str, Any], status: int
) -> None:
    response = await env.http.post(HASH, headers=env.auditor(), json=body)
    assert response.status_code == status
    value = body.get("value")
    if value:
        assert value not in response.text


async def test_hash_takes_the_value_only_in_the_body(env: BrokerEnv) -> None:
    response = await env.http.get(HASH, params={"value": "leaked"}, headers=env.auditor())
    assert response.status_code == 405
    assert (await env.http.post(HASH, json={"value": "leaked"})).status_code == 401


async def test_configured_sensitive_parameter_is_stored_only_as_its_hash(
    env: BrokerEnv, dba: Dba
) -> None:
    settings = Settings(
        database_url=env.context.settings.database_url, audit_sensitive_params="sis_password"
    )
    async with served(env, settings=settings) as http:
        token = await env.client_token()
        response = await http.get(f"{COURSE}?sis_password=hunter2-sis", headers=bearer(token))
        assert response.status_code == 200
    [event] = await env.audit(kind="proxy")
    hashed = env.context.keyring.audit_hmac("hunter2-sis")
    assert event["query"] == f"sis_password={hashed}"
    assert [e["seq"] for e in await env.audit(query_contains=hashed)] == [event["seq"]]
    assert not [value for value in dba.dump() if "hunter2-sis" in value]


@asynccontextmanager
async def served(
    env: BrokerEnv, *, settings: Settings | None = None, context_keyring: Keyring | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """Another broker process on the same database (other settings or keyring), over ASGI."""
    context = ProcessContext.from_settings(
        settings or env.context.settings, keyring=context_keyring or env.context.keyring
    )
    transport = httpx.ASGITransport(app=create_app(context=context))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
            yield http
    finally:
        await context.aclose()


# Export -------------------------------------------------------------------------------------


@pytest.fixture
async def calls(env: BrokerEnv) -> str:
    """Allowed, refused and unauthenticated calls of one client; returns its id."""
    client_id, secret = await env.client("exporter")
    token = await env.token(client_id, secret)
    odd_agent = {"User-Agent": '=HYPERLINK("http://evil.example","x")'}
    statuses = [
        (await env.http.get(COURSE, headers=bearer(token))).status_code,
        (await env.http.get(f"{COURSE}/assignments?per_page=2", headers=bearer(token))).status_code,
        (await env.http.delete(COURSE, headers={**bearer(token), **odd_agent})).status_code,
        (await env.http.get(COURSE)).status_code,
    ]
    assert statuses == [200, 200, 403, 401]
    return client_id


async def export(env: BrokerEnv, **params: Any) -> httpx.Response:
    response = await env.http.get(EXPORT, params=params, headers=env.auditor())
    assert response.status_code == 200, response.text
    return response


async def test_ndjson_export_is_the_review_selection_one_event_per_line(
    env: BrokerEnv, calls: str
) -> None:
    response = await export(env, client=calls, format="ndjson")
    assert response.headers["content-type"] == "application/x-ndjson"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="audit-')
    assert disposition.endswith('.ndjson"')
    lines = response.text.splitlines()
    assert [json.loads(line) for line in lines] == await env.audit(client=calls, limit=1000)
    assert [json.loads(line)["kind"] for line in lines] == [
        "proxy",
        "proxy",
        "proxy",
        "token",
        "admin",
    ]


async def test_export_without_filters_is_the_whole_log_newest_first(
    env: BrokerEnv, calls: str
) -> None:
    events = [json.loads(line) for line in (await export(env)).text.splitlines()]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs, reverse=True)
    assert events == await env.audit(limit=1000)
    assert events[0]["action"] == "audit.export"  # committed before the export starts


async def test_csv_export_has_a_fixed_header_and_details_as_json_text(
    env: BrokerEnv, calls: str
) -> None:
    response = await export(env, client=calls, format="csv")
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"].endswith('.csv"')
    reader = csv.reader(io.StringIO(response.text))
    header = next(reader)
    assert tuple(header) == CSV_COLUMNS
    rows = [dict(zip(header, row, strict=True)) for row in reader]
    events = await env.audit(client=calls, limit=1000)
    assert [int(row["seq"]) for row in rows] == [e["seq"] for e in events]
    [mint] = [row for row in rows if row["action"] == "token.mint"]
    [minted] = [e for e in events if e["action"] == "token.mint"]
    assert json.loads(mint["details"]) == minted["details"]
    allowed = next(row for row in rows if row["path"] == COURSE and row["decision"] == "allow")
    assert (allowed["status"], allowed["reason"], allowed["state"]) == ("200", "", "complete")


async def test_csv_export_defuses_cells_a_spreadsheet_would_run_as_formulas(
    env: BrokerEnv, calls: str
) -> None:
    rows = list(csv.DictReader(io.StringIO((await export(env, format="csv")).text)))
    [refused] = [row for row in rows if row["method"] == "DELETE"]
    assert refused["user_agent"] == '\'=HYPERLINK("http://evil.example","x")'
    ndjson = [json.loads(line) for line in (await export(env, method="DELETE")).text.splitlines()]
    assert ndjson[0]["user_agent"] == '=HYPERLINK("http://evil.example","x")'


async def test_export_takes_every_review_filter(env: BrokerEnv, calls: str) -> None:
    refused = await export(env, kind="proxy", decision="deny", reason="scope_not_granted")
    [event] = [json.loads(line) for line in refused.text.splitlines()]
    assert (event["client_id"], event["method"], event["status"]) == (calls, "DELETE", 403)
    assert (await export(env, client=calls, status=418)).text == ""


async def test_export_is_audited_with_its_format_and_filters(env: BrokerEnv, calls: str) -> None:
    response = await export(env, client=calls, format="csv", since="2026-01-01T00:00:00Z")
    [event] = await env.audit(action="audit.export")
    assert event["request_id"] == response.headers["x-request-id"]
    assert event["details"] == {
        "format": "csv",
        "filters": {"client_id": calls, "since": "2026-01-01T00:00:00+00:00"},
    }


async def test_export_needs_a_reader_key_and_a_known_format(env: BrokerEnv) -> None:
    assert (await env.http.get(EXPORT)).status_code == 401
    response = await env.http.get(EXPORT, params={"format": "xml"}, headers=env.auditor())
    assert response.status_code == 422


# Flat memory --------------------------------------------------------------------------------


async def drive(app: ASGIApp, key: str, query: str) -> tuple[int, int, int]:
    """GET the export through the ASGI app, counting the body without keeping it.

    Returns the status, the body's bytes and its lines.
    """
    done = asyncio.Event()
    seen = {"status": 0, "bytes": 0, "lines": 0}
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            seen["status"] = message["status"]
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            seen["bytes"] += len(body)
            seen["lines"] += body.count(b"\n")
            if not message.get("more_body", False):
                done.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": EXPORT,
        "raw_path": EXPORT.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"broker.test"), (b"authorization", f"Bearer {key}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("broker.test", 80),
    }
    await app(scope, receive, send)
    return seen["status"], seen["bytes"], seen["lines"]


async def peak_while_exporting(app: ASGIApp, key: str, query: str) -> tuple[int, int]:
    """Peak Python memory allocated while the export streams, and how many lines it sent."""
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        status, _bytes, lines = await drive(app, key, query)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert status == 200
    return peak, lines


@pytest.mark.parametrize("export_format", ["ndjson", "csv"])
async def test_export_memory_does_not_grow_with_the_number_of_events(
    env: BrokerEnv, export_format: str
) -> None:
    app = create_app(context=env.context)
    url, keyring = env.context.settings.async_database_url, env.context.keyring
    query = f"format={export_format}&token=tok_fill"
    header = 1 if export_format == "csv" else 0
    shown = fill_audit_log(url, keyring, 100)
    assert (await drive(app, env.auditor_key, query))[2] == shown + header  # warm caches

    calls = 700  # 2,100 events as exported, then 21,000: both read several pages of 1,000
    shown = fill_audit_log(url, keyring, calls - 100) + shown
    small, lines = await peak_while_exporting(app, env.auditor_key, query)
    assert lines == shown + header
    shown += fill_audit_log(url, keyring, 9 * calls)
    large, lines = await peak_while_exporting(app, env.auditor_key, query)
    assert lines == shown + header == 10 * 3 * calls + header

    # Ten times the events, about the same peak: one page at a time, never the whole log.
    assert large < small * 1.5, (small, large)
