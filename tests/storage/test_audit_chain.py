"""Appending to the chain names only the columns an event sets (docs/audit.md#the-hmac-chain).

Events of different shapes in one batch are inserted by one statement per run of a shape;
what is stored, and what the verifier recomputes from it, is the same as if every column had
been bound, NULLs included.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from broker.core.audit_chain import CHAINED_FIELDS, AuditEvent, ChainVerifier, canonical
from broker.keyring import Keyring
from broker.services.audit import chain_key
from broker.storage.audit_chain import EVENTS, append, read_head, read_links
from broker.storage.database import create_sync_engine

if TYPE_CHECKING:
    from collections.abc import Iterator


def _events() -> Iterator[AuditEvent]:
    at = datetime(2026, 12, 2, 9, 30, 0, 123456, tzinfo=UTC)

    def call(**fields: Any) -> AuditEvent:
        return AuditEvent(
            kind="proxy", action="proxy", time=at, request_id="req1", client_id="cli_a", **fields
        )

    # Falsy values that are not NULL must be stored as themselves, not dropped.
    yield call(state="pending", method="GET", path="/x", query="")
    yield call(state="pending", method="GET", path="/y", query="")
    yield call(completes=1, status=0, response_bytes=0, duration_ms=0.0, details={})
    yield AuditEvent(
        kind="admin", action="client.update", time=at, request_id="req2", details={"scopes": []}
    )
    yield call(state="pending", method="GET", path="/z", query="")


def test_events_of_every_shape_store_what_a_full_insert_would(database_url: str) -> None:
    keyring = Keyring.generate()
    key = chain_key(keyring)
    events = list(_events())
    engine = create_sync_engine(database_url, write=True)
    try:
        with engine.begin() as connection:
            seqs = append(connection, key, events)
        with engine.connect() as connection:
            rows = connection.execute(select(EVENTS).order_by(EVENTS.c.seq)).all()
            links = list(read_links(connection, 0, seqs[-1]))
            head = read_head(connection)
    finally:
        engine.dispose()

    assert seqs == [1, 2, 3, 4, 5]
    assert [row.seq for row in rows] == seqs
    for event, row in zip(events, rows, strict=True):
        stored = row._mapping
        assert canonical(stored) == canonical(event)
        for name, value in zip(CHAINED_FIELDS, event.values(), strict=True):
            if value is None:
                assert stored[name] is None, name
    completion = rows[2]._mapping
    assert (completion["status"], completion["response_bytes"]) == (0, 0)
    assert completion["duration_ms"] == 0.0
    assert completion["details"] == {}
    assert rows[0].query == ""
    verification = ChainVerifier(keyring.audit_chain_keys()).verify(links, head)
    assert verification.ok, verification.problem
    assert verification.checked == len(events)
