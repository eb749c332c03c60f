"""Audit API for the security team (docs/audit.md): review, export, verify, hash, retention.

Reading (query, export, verify, hash) needs an ``auditor`` or ``admin`` key; retention (prune)
an ``admin`` key. Export, hash and prune are themselves audited, naming the key, never a
secret.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from broker.api.deps import Admin, Reader, ServicesDep, reject_nul, request_facts
from broker.api.schemas import (
    AuditEventOut,
    AuditHashes,
    AuditHashRequest,
    AuditPage,
    AuditPruneOut,
    AuditPruneRequest,
    AuditVerification,
    ErrorOut,
)
from broker.audit_filter import AuditFilter
from broker.errors import BadRequestError
from broker.services.audit import EarlierHead

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 422, 503)
}
router = APIRouter(
    prefix="/broker/v1", tags=["audit"], responses=ERRORS, dependencies=[Depends(reject_nul)]
)

CSV_COLUMNS: Final = tuple(AuditEventOut.model_fields)
"""The CSV header row: every field of an event, in the order the review API shows them."""
_CHUNK_EVENTS: Final = 500
# A spreadsheet would run a cell starting with one of these as a formula; client-controlled
# text (user agent, path, query) must not become one (CWE-1236).
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")
_MEDIA_TYPES: Final = {"ndjson": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


Selection = Annotated[AuditFilter, Query()]
"""The review and export endpoints' filters: one query parameter per ``AuditFilter`` field."""


@router.get("/audit")
async def query_audit(
    _: Reader,
    services: ServicesDep,
    selection: Selection,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    """Audit events, newest first, filtered and cursor-paginated.

    An unknown ``kind``, ``decision``, ``state``, ``action`` or ``reason`` is a 400 listing
    the allowed values; ``client`` and ``credential`` take an id or a name (404 if neither).
    """
    selection = await services.audit.resolve(selection)
    events, next_cursor = await services.audit.query(selection, cursor=cursor, limit=limit)
    return AuditPage(
        events=[AuditEventOut.model_validate(e) for e in events], next_cursor=next_cursor
    )


@router.get(
    "/audit/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}},
)
async def export_audit(
    request: Request,
    actor: Reader,
    services: ServicesDep,
    selection: Selection,
    export_format: Annotated[Literal["ndjson", "csv"], Query(alias="format")] = "ndjson",
) -> StreamingResponse:
    """The same selection as ``GET /audit``, newest first, streamed as NDJSON or CSV.

    Read a page at a time, so memory stays flat however many events are selected. CSV has a
    fixed header row, ``details`` as JSON text, and text cells that a spreadsheet would take
    for a formula prefixed with ``'``.
    """
    selection = await services.audit.resolve(selection)
    filters = selection.set_filters()
    await services.audit.record_admin(
        "audit.export",
        request_facts(request),
        actor_key_id=actor.key_id,
        details={"format": export_format, "filters": filters},
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    events = services.audit.export(selection)
    body = _ndjson(events) if export_format == "ndjson" else _csv(events)
    return StreamingResponse(
        body,
        media_type=_MEDIA_TYPES[export_format],
        headers={
            "Content-Disposition": f'attachment; filename="audit-{stamp}.{export_format}"',
            "Cache-Control": "no-store",
        },
    )


async def _ndjson(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    lines: list[bytes] = []
    async for event in events:
        lines.append(AuditEventOut.model_validate(event).model_dump_json().encode() + b"\n")
        if len(lines) >= _CHUNK_EVENTS:
            yield b"".join(lines)
            lines.clear()
    if lines:
        yield b"".join(lines)


async def _csv(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    rows = 0
    async for event in events:
        fields = AuditEventOut.model_validate(event).model_dump(mode="json")
        writer.writerow(_csv_cell(fields[name]) for name in CSV_COLUMNS)
        rows += 1
        if rows >= _CHUNK_EVENTS:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
            rows = 0
    yield buffer.getvalue().encode()


def _csv_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        value = json.dumps(value, separators=(",", ":"), sort_keys=True)
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


@router.get("/audit/verify")
async def verify_audit(
    _: Reader,
    services: ServicesDep,
    expect_head: Annotated[
        str | None,
        Query(description="SEQ:MAC of a head kept from an earlier verify; it must still hold"),
    ] = None,
) -> AuditVerification:
    """Verify the audit chain from the newest checkpoint (or the start) to the signed head.

    Always 200 when the check ran: the finding is the body. ``ok`` false names the first
    ``problem`` (``modified``, ``inserted``, ``missing``, ``reordered``, ``unknown_key``) at
    its ``seq``; monitoring must look at ``ok``, not at the status code.
    """
    try:
        earlier = EarlierHead.parse(expect_head) if expect_head is not None else None
    except ValueError as exc:
        raise BadRequestError(f"expect_head: {exc}") from exc
    report = await asyncio.to_thread(services.audit.verify, earlier)
    return AuditVerification.model_validate(report.as_dict())


@router.post("/audit/hash")
async def hash_audit_value(
    body: AuditHashRequest,
    request: Request,
    response: Response,
    actor: Reader,
    services: ServicesDep,
) -> AuditHashes:
    """The keyed HMAC the audit log stores for a sensitive value, under every key.

    Search for it with ``GET /audit?query_contains=<hash>``. The value travels in the body,
    never in a URL; it is neither echoed nor recorded (the request itself is audited).
    """
    response.headers["Cache-Control"] = "no-store"
    hashes = await services.audit.search_hashes(
        body.value.get_secret_value(), request_facts(request), actor_key_id=actor.key_id
    )
    return AuditHashes(hashes=hashes)


@router.post("/audit/prune")
async def prune_audit(
    body: AuditPruneRequest, request: Request, actor: Admin, services: ServicesDep
) -> AuditPruneOut:
    """Retention: remove events older than ``before`` behind a signed checkpoint.

    Refused (409 ``audit_chain_broken``) if the events to remove do not verify. The prune is
    recorded as an admin event (``audit.prune``) in the same transaction.
    """
    record = {**request_facts(request), "actor_key_id": actor.key_id}
    report = await asyncio.to_thread(
        functools.partial(services.audit.prune, body.before, record, dry_run=body.dry_run)
    )
    return AuditPruneOut.model_validate(report.as_dict())
