"""Queries shared by the services. Functions here flush at most; services own transactions."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import aliased

from broker.errors import BadRequestError
from broker.storage.models import (
    AuditEventRow,
    Client,
    ProxyToken,
    Upstream,
    WorkerCredential,
)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession

_MAX_SEQ = 2**63 - 1


@dataclass(frozen=True)
class TokenRecord:
    """A proxy token with everything the proxy needs to forward a call."""

    token: ProxyToken
    client: Client
    credential: WorkerCredential
    upstream: Upstream


async def find_token(session: AsyncSession, hashes: Sequence[str]) -> TokenRecord | None:
    """The token whose keyed hash is one of ``hashes``, joined to its chain of owners."""
    row = (
        await session.execute(
            select(ProxyToken, Client, WorkerCredential, Upstream)
            .join(Client, ProxyToken.client_id == Client.id)
            .join(WorkerCredential, Client.credential_id == WorkerCredential.id)
            .join(Upstream, WorkerCredential.upstream_id == Upstream.id)
            .where(ProxyToken.token_hash.in_(list(hashes)))
        )
    ).first()
    if row is None:
        return None
    token, client, credential, upstream = row
    return TokenRecord(token, client, credential, upstream)


# The event a completion event completes; reviewing merges the two into one call.
Completion = aliased(AuditEventRow, name="completion")


@dataclass(frozen=True)
class AuditFilter:
    """Selection of audit events for review and export (docs/audit.md#review).

    Conditions on the outcome (``status``, ``state``, ``reason``) look at the completion of a
    pending event when there is one.
    """

    since: datetime | None = None
    until: datetime | None = None
    client_id: str | None = None
    token_id: str | None = None
    credential_id: str | None = None
    upstream: str | None = None
    kind: str | None = None
    action: str | None = None
    decision: str | None = None
    reason: str | None = None
    status: int | None = None
    method: str | None = None
    path_prefix: str | None = None
    state: str | None = None
    request_id: str | None = None
    actor_key_id: str | None = None
    query_contains: str | None = None

    def apply(self, query: Select[Any, Any]) -> Select[Any, Any]:
        """Add this filter's conditions to ``query`` (which joins ``Completion``)."""
        conditions: list[ColumnElement[bool]] = []
        if self.since is not None:
            conditions.append(AuditEventRow.time >= self.since)
        if self.until is not None:
            conditions.append(AuditEventRow.time < self.until)
        equal: dict[Any, object] = {
            AuditEventRow.client_id: self.client_id,
            AuditEventRow.token_id: self.token_id,
            AuditEventRow.credential_id: self.credential_id,
            AuditEventRow.upstream: self.upstream,
            AuditEventRow.kind: self.kind,
            AuditEventRow.action: self.action,
            AuditEventRow.decision: self.decision,
            AuditEventRow.method: self.method,
            AuditEventRow.request_id: self.request_id,
            AuditEventRow.actor_key_id: self.actor_key_id,
            func.coalesce(Completion.status, AuditEventRow.status): self.status,
            func.coalesce(Completion.reason, AuditEventRow.reason): self.reason,
            func.coalesce(Completion.state, AuditEventRow.state): self.state,
        }
        conditions.extend(column == value for column, value in equal.items() if value is not None)
        if self.path_prefix:
            conditions.append(
                AuditEventRow.path.like(f"{_like_escaped(self.path_prefix)}%", escape="\\")
            )
        if self.query_contains:
            conditions.append(
                AuditEventRow.query.like(f"%{_like_escaped(self.query_contains)}%", escape="\\")
            )
        return query.where(*conditions)


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def encode_cursor(seq: int) -> str:
    """Opaque cursor naming the last event of a page."""
    return base64.urlsafe_b64encode(json.dumps({"before": seq}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Reverse :func:`encode_cursor`, or raise ``BadRequestError``."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded))["before"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadRequestError("cursor is not one this API returned") from exc
    # bool is an int subclass, and a seq outside BIGINT would fail in the database, not here.
    if type(value) is not int or not 0 < value <= _MAX_SEQ:
        raise BadRequestError("cursor is not one this API returned")
    return value


async def audit_page(
    session: AsyncSession, selection: AuditFilter, *, before: int | None, limit: int
) -> tuple[list[tuple[AuditEventRow, AuditEventRow | None]], int | None]:
    """Newest-first page of events with ``seq < before``, each with its completion if any.

    The cursor stays stable as events arrive: it names a position in the append-only
    sequence, not an offset. Completion events are shown only through what they complete.
    """
    query = selection.apply(
        select(AuditEventRow, Completion)
        .outerjoin(Completion, Completion.completes == AuditEventRow.seq)
        .where(AuditEventRow.completes.is_(None))
    )
    if before is not None:
        query = query.where(AuditEventRow.seq < before)
    result = await session.execute(query.order_by(AuditEventRow.seq.desc()).limit(limit + 1))
    rows = [(row[0], row[1]) for row in result]
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1][0].seq
    return rows, None


_OUTCOME = (
    "reason",
    "status",
    "upstream_status",
    "response_bytes",
    "duration_ms",
    "canvas_context_id",
)


def merged_event(begin: AuditEventRow, done: AuditEventRow | None) -> dict[str, Any]:
    """One call as the review API shows it: the event, with its completion's outcome."""
    fields = {
        column.key: getattr(begin, column.key) for column in AuditEventRow.__mapper__.column_attrs
    }
    for chain_column in ("prev_mac", "mac", "mac_key", "completes"):
        fields.pop(chain_column)
    fields["completion_seq"] = None
    if done is not None:
        for name in _OUTCOME:
            value = getattr(done, name)
            if value is not None:
                fields[name] = value
        fields["state"] = done.state
        fields["completed_at"] = done.completed_at
        fields["completion_seq"] = done.seq
    return fields
