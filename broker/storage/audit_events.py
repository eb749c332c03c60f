"""Reviewing the audit log: filtered, newest-first pages of calls. Reads only.

Which condition each filter adds comes from ``broker.audit_filter``: its field names the
column and the kind of match, so a filter defined there needs nothing here.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import InstrumentedAttribute, aliased

from broker.audit_filter import SELECTS, Match, Selects
from broker.errors import BadRequestError
from broker.storage.models import AuditEventRow

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from broker.audit_filter import AuditFilter

Completion = aliased(AuditEventRow, name="completion")
"""The event a completion event completes; reviewing merges the two into one call."""
_MAX_SEQ: Final = 2**63 - 1


def conditions(selection: AuditFilter) -> list[ColumnElement[bool]]:
    """The selection's conditions, for a query that joins ``Completion`` to each event."""
    found = []
    for name, selects in SELECTS.items():
        value = getattr(selection, name)
        if value is not None:
            condition = _condition(selects, value)
            if condition is not None:
                found.append(condition)
    return found


def _condition(selects: Selects, value: object) -> ColumnElement[bool] | None:  # noqa: PLR0911 - one per match
    column: InstrumentedAttribute[Any] = getattr(AuditEventRow, selects.column)
    match selects.match:
        case Match.SINCE:
            return column >= value
        case Match.UNTIL:
            return column < value
        case Match.EQUAL:
            return column == value
        case Match.OUTCOME:
            completed: InstrumentedAttribute[Any] = getattr(Completion, selects.column)
            return func.coalesce(completed, column) == value
        case Match.PREFIX | Match.CONTAINS if not value:
            return None  # a blank pattern selects everything
        case Match.PREFIX:
            return column.like(f"{_like_escaped(str(value))}%", escape="\\")
        case Match.CONTAINS:
            return column.like(f"%{_like_escaped(str(value))}%", escape="\\")


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


async def page(
    session: AsyncSession, selection: AuditFilter, *, before: int | None, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Newest-first calls with ``seq < before`` (each merged with its completion, if any).

    Also returns the seq to read the next page before, or None on the last page. The
    position stays stable as events arrive: it names a place in the append-only sequence,
    not an offset. Completion events are shown only through what they complete.
    """
    query = (
        select(AuditEventRow, Completion)
        .outerjoin(Completion, Completion.completes == AuditEventRow.seq)
        .where(AuditEventRow.completes.is_(None), *conditions(selection))
    )
    if before is not None:
        query = query.where(AuditEventRow.seq < before)
    result = await session.execute(query.order_by(AuditEventRow.seq.desc()).limit(limit + 1))
    rows = [(row[0], row[1]) for row in result]
    last = rows[limit - 1][0].seq if len(rows) > limit else None
    return [merged_event(begin, done) for begin, done in rows[:limit]], last


_OUTCOME: Final = (
    "reason",
    "status",
    "upstream_status",
    "response_bytes",
    "duration_ms",
    "canvas_context_id",
    "details",
)
_CHAIN_COLUMNS: Final = ("prev_mac", "mac", "mac_key", "completes")


def merged_event(begin: AuditEventRow, done: AuditEventRow | None) -> dict[str, Any]:
    """One call as the review API shows it: the event, with its completion's outcome."""
    fields = {
        column.key: getattr(begin, column.key) for column in AuditEventRow.__mapper__.column_attrs
    }
    for chain_column in _CHAIN_COLUMNS:
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
