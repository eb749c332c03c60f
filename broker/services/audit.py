"""Recording and reviewing audit events: fail closed, never a silent gap.

Every event is a link of one MAC chain (``broker.core.audit_chain``). Proxied calls are
recorded in two events: ``begin`` commits a ``pending`` event before anything is sent
upstream, and ``complete`` appends a second event naming the first with the outcome. Refusals
and token refusals are one event each. All three go through the process's group-commit writer
(``AuditWriter``); if it cannot commit, ``AuditUnavailableError`` tells the caller to answer
503 and forward nothing. Management actions and minted or revoked tokens are chained inside
the transaction that makes the change (``add_events``), so the change and its record commit
together.

Review merges each pending event with its completion, so a call reads as one event whose
``state`` is ``complete`` or, if its outcome was never recorded, ``pending``.

Contract: docs/audit.md#fail-closed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from broker.core.audit_chain import (
    GENESIS,
    PENDING,
    AuditEvent,
    ChainVerifier,
    Checkpoint,
    Problem,
    beyond_head,
    checkpoint_sound,
)
from broker.errors import (
    AuditUnavailableError,
    AuditWriteError,
    BadRequestError,
    ChainBrokenError,
    ValidationFailedError,
)
from broker.storage import audit_chain as chain
from broker.storage import audit_events, clients, credentials
from broker.storage.models import utcnow

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping
    from datetime import datetime

    from sqlalchemy import Connection
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.audit_filter import AuditFilter
    from broker.keyring import Keyring
    from broker.services.audit_writer import EventWriter
    from broker.storage.database import Database

logger = logging.getLogger(__name__)


def new_event(**fields: Any) -> AuditEvent:  # noqa: ANN401 - column values of many types
    """An event with defaults filled in (complete, now); an unknown field is a TypeError."""
    fields.setdefault("time", utcnow())
    return AuditEvent(**fields)


def admin_event(**fields: Any) -> AuditEvent:  # noqa: ANN401 - column values of many types
    """A management-action event (``actor_key_id`` names who; ``details`` what changed).

    Allowed unless ``decision`` says otherwise (a refused attempt is recorded too).
    """
    return new_event(kind="admin", **fields)


def chain_key(keyring: Keyring) -> chain.ChainKey:
    """The key that signs new audit events: the keyring's primary."""
    return chain.ChainKey(*keyring.chain_key())


async def add_events(session: AsyncSession, keyring: Keyring, *events: AuditEvent) -> None:
    """Chain events inside the caller's transaction (atomic with the change they record)."""
    key = chain_key(keyring)
    await session.run_sync(lambda sync: chain.append(sync.connection(), key, list(events)))


class Begun(NamedTuple):
    """A committed pending event: its seq and what it recorded."""

    seq: int
    event: AuditEvent


def _completion(begun: Begun, **outcome: Any) -> AuditEvent:  # noqa: ANN401 - column values
    """The event recording the outcome of a pending one."""
    pending = begun.event
    return AuditEvent(
        time=utcnow(),
        request_id=pending.request_id,
        kind=pending.kind,
        action=f"{pending.action}.complete",
        decision=pending.decision,
        completes=begun.seq,
        **outcome,
    )


@dataclass
class VerifyReport:
    """What ``broker audit verify`` and ``GET /broker/v1/audit/verify`` report."""

    ok: bool
    checked: int
    first_seq: int | None
    last_seq: int | None
    head: dict[str, Any] | None
    checkpoint: dict[str, Any] | None
    incomplete: int
    incomplete_oldest: list[int]
    problem: dict[str, Any] | None
    keys: list[str] = field(default_factory=list)
    earlier_head: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "head": self.head,
            "checkpoint": self.checkpoint,
            "incomplete": {"count": self.incomplete, "oldest": self.incomplete_oldest},
            "problem": self.problem,
            "keys": self.keys,
            "earlier_head": self.earlier_head,
        }


_MAC_LENGTH: Final = 64


@dataclass(frozen=True)
class EarlierHead:
    """A head printed by an earlier verification and kept outside the broker.

    Checking it catches what the chain alone cannot: the whole log (head included) replaced,
    by a wipe or by restoring an older backup, which otherwise looks like a young log.
    """

    seq: int
    mac: str

    @classmethod
    def parse(cls, text: str) -> EarlierHead:
        """``SEQ:MAC`` as ``broker audit verify`` prints it; ``ValueError`` otherwise."""
        seq, _, mac = text.strip().partition(":")
        mac = mac.lower()
        if not seq.isdigit() or len(mac) != _MAC_LENGTH or mac.strip("0123456789abcdef"):
            raise ValueError(
                "an earlier head looks like SEQ:MAC (a number, a colon, 64 hex digits)"
            )
        return cls(int(seq), mac)


class AuditService:
    """Writes events through the process's writer; reads, verifies and prunes the log."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        writer: EventWriter,
        keyring: Keyring,
        database: Database,
    ) -> None:
        self._sessions = sessions
        self._writer = writer
        self._keyring = keyring
        self._database = database

    async def record(self, event: AuditEvent, *, alone: bool = False) -> int:
        """Commit one complete event; raise ``AuditUnavailableError`` if it cannot be.

        ``alone``: the caller is the only request in progress (see ``AuditWriter.write``).
        """
        return await self._write(event, alone=alone)

    def record_later(self, event: AuditEvent) -> None:
        """Queue one complete event without waiting for it to be durable.

        For refusals that cost the broker nothing to answer (a rate limit): waiting for the
        disk would let a flood of them hold the audit writer. Raises
        ``AuditUnavailableError`` if the writer cannot take it.
        """
        try:
            self._writer.write_later(event)
        except AuditWriteError as exc:
            raise AuditUnavailableError("the audit log is unavailable") from exc

    async def begin(self, event: AuditEvent, *, alone: bool = False) -> Begun:
        """Commit ``event`` as the pending event of a call about to be forwarded."""
        event.state = PENDING
        event.completed_at = None

        refused = False

        def abandoned(seq: int) -> AuditEvent:
            # Committed after its caller stopped waiting: the client went away, or the
            # broker refused the call at BROKER_AUDIT_TIMEOUT (docs/audit.md#under-faults).
            if refused:
                return _completion(Begun(seq, event), reason="audit_unavailable", status=503)
            return _completion(Begun(seq, event), reason="client_disconnected", status=499)

        try:
            return Begun(await self._write(event, abandoned=abandoned, alone=alone), event)
        except AuditUnavailableError:
            refused = True
            raise

    def complete(self, begun: Begun, **outcome: Any) -> None:  # noqa: ANN401
        """Record the outcome of a pending event (queued: the call has already happened)."""
        try:
            self._writer.write_later(_completion(begun, **outcome))
        except AuditWriteError:
            logger.exception("could not queue the completion of audit event %s", begun.seq)

    async def _write(self, event: AuditEvent, **options: Any) -> int:  # noqa: ANN401
        try:
            return await self._writer.write(event, **options)
        except AuditWriteError as exc:
            raise AuditUnavailableError(
                "the audit log is unavailable; nothing was forwarded"
            ) from exc

    async def flush(self) -> None:
        """Wait until this process's queued events (completions included) are committed."""
        await self._writer.flush()

    async def resolve(self, selection: AuditFilter) -> AuditFilter:
        """The selection checked, its ``client`` and ``credential`` names turned into ids.

        A value outside a closed filter's set is a ``BadRequestError`` naming the allowed
        values, and a client or credential that does not exist a ``NotFoundError``: neither
        may pass for a selection that matches nothing (docs/audit.md#review).
        """
        problem = selection.problem()
        if problem is not None:
            raise BadRequestError(problem)
        client, credential = selection.client_id, selection.credential_id
        if client is None and credential is None:
            return selection
        resolved: dict[str, str] = {}
        async with self._sessions() as session:
            if client is not None:
                resolved["client_id"] = (await clients.get(session, client)).id
            if credential is not None:
                resolved["credential_id"] = (await credentials.get(session, credential)).id
        return selection.model_copy(update=resolved)

    async def query(
        self, selection: AuditFilter, *, cursor: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One newest-first page of events and the cursor of the next page."""
        before = audit_events.decode_cursor(cursor) if cursor else None
        await self.flush()
        async with self._sessions() as session:
            events, last = await audit_events.page(session, selection, before=before, limit=limit)
        return events, (audit_events.encode_cursor(last) if last is not None else None)

    async def export(
        self, selection: AuditFilter, *, page_size: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        """Every selected event, newest first, read a page at a time (memory stays flat)."""
        await self.flush()
        before: int | None = None
        while True:
            async with self._sessions() as session:
                events, last = await audit_events.page(
                    session, selection, before=before, limit=page_size
                )
            for event in events:
                yield event
            # Let this page go before reading the next, so only one is ever held.
            del events
            if last is None:
                return
            before = last

    async def record_admin(
        self,
        action: str,
        audit: Mapping[str, Any],
        *,
        actor_key_id: str | None,
        details: Mapping[str, Any],
    ) -> int:
        """Commit an admin event for an action that changes nothing else (hash, export).

        ``audit`` holds the request's facts (request id, method, path, source address, user
        agent). Committed before the action is carried out: no record, no action.
        """
        return await self.record(
            admin_event(**audit, action=action, actor_key_id=actor_key_id, details=dict(details))
        )

    async def search_hashes(
        self, value: str, audit: Mapping[str, Any], *, actor_key_id: str | None
    ) -> dict[str, str]:
        """The keyed HMAC the log would show for ``value``, under every key, by key id.

        The request is audited first, naming who asked but never the value (nor its hashes,
        which would tie the search to what was searched for).
        """
        hashes = self._keyring.audit_hmac_candidates(value)
        await self.record_admin(
            "audit.hash", audit, actor_key_id=actor_key_id, details={"keys": sorted(hashes)}
        )
        return hashes

    def verify(self, earlier: EarlierHead | None = None) -> VerifyReport:
        """Check the whole chain, and an earlier head if given (blocking: run it in a thread)."""
        return verify_database(self._database, self._keyring, earlier)

    def prune(
        self, before: datetime, record: Mapping[str, Any], *, dry_run: bool = False
    ) -> PruneReport:
        """Remove events older than ``before`` behind a signed checkpoint (blocking).

        ``record`` holds the fields of the admin event that records the prune (who, from
        where); raises ``ConflictError`` if the part to prune does not verify. With
        ``dry_run`` nothing changes: the report says what a prune would remove.
        """
        return prune_database(self._database, self._keyring, before, record, dry_run=dry_run)


def _anchor(connection: Connection, keyring: Keyring) -> Checkpoint | None:
    """The newest checkpoint whose MAC holds (older ones are superseded)."""
    keys = keyring.audit_chain_keys()
    for checkpoint in chain.checkpoints(connection):
        if checkpoint_sound(keys, checkpoint):
            return checkpoint
    return None


_CHAIN_BROKEN: Final = ChainBrokenError.error


def verify_database(
    database: Database, keyring: Keyring, earlier: EarlierHead | None = None
) -> VerifyReport:
    """Verify the audit log of ``database`` (blocking: run it in a thread).

    The whole walk reads one snapshot (a read transaction; REPEATABLE READ on PostgreSQL), so
    events appended or pruned meanwhile never look like tampering.
    """
    engine = database.blocking()
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                connection.execution_options(isolation_level="REPEATABLE READ")
            return verify_log(connection, keyring, earlier)
    finally:
        engine.dispose()


def prune_database(
    database: Database,
    keyring: Keyring,
    before: datetime,
    record: Mapping[str, Any],
    *,
    dry_run: bool = False,
) -> PruneReport:
    """Prune the audit log of ``database`` (blocking); see ``prune_log``.

    A refused prune is recorded too (as a denied ``audit.prune``), then raised; a refused
    dry run is only raised.
    """
    engine = database.blocking(write=True)
    try:
        with engine.connect() as connection:
            try:
                return prune_log(connection, keyring, before, record, dry_run=dry_run)
            except ChainBrokenError as exc:
                if dry_run:
                    raise
                refused = admin_event(
                    **record,
                    action=PRUNE_ACTION,
                    decision="deny",
                    reason=_CHAIN_BROKEN,
                    details={"changes": {"before": before.isoformat()}, "problem": exc.message},
                )
                with connection.begin():
                    chain.append(connection, chain_key(keyring), [refused])
                raise
    finally:
        engine.dispose()


def _checkpoint_out(checkpoint: Checkpoint | None) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    return {
        "through_seq": checkpoint.through_seq,
        "events_pruned": checkpoint.events_pruned,
        "incomplete_pruned": checkpoint.incomplete_pruned,
        "created_at": checkpoint.created_at.isoformat(),
        "key": checkpoint.mac_key,
    }


def _checkpoint_problem(keyring: Keyring, checkpoints: list[Checkpoint]) -> Problem | None:
    """A retention checkpoint that does not verify: altered, forged or signed by a lost key."""
    keys = keyring.audit_chain_keys()
    for checkpoint in checkpoints:
        if checkpoint_sound(keys, checkpoint):
            continue
        if checkpoint.mac_key not in keys:
            return Problem(
                checkpoint.through_seq,
                "unknown_key",
                f"the retention checkpoint through seq {checkpoint.through_seq} is signed with "
                f"key {checkpoint.mac_key!r}, not in the keyring",
            )
        return Problem(
            checkpoint.through_seq,
            "modified",
            f"the retention checkpoint through seq {checkpoint.through_seq} does not match "
            "its MAC (altered or forged)",
        )
    return None


def verify_log(
    connection: Connection, keyring: Keyring, earlier: EarlierHead | None = None
) -> VerifyReport:
    """Walk the chain from the newest sound checkpoint (or the start) to the signed head.

    A checkpoint that does not verify is reported before anything the walk finds: events the
    walk then misses at the start of the log were removed behind it. Once the chain holds,
    an ``earlier`` head must still be in it (or pruned behind the checkpoint).
    """
    keys = keyring.audit_chain_keys()
    head = chain.read_head(connection)
    checkpoints = chain.checkpoints(connection)
    anchor = next((c for c in checkpoints if checkpoint_sound(keys, c)), None)
    anchor_seq = anchor.through_seq if anchor else 0
    through = head.last_seq if head is not None else chain.max_seq(connection)
    verifier = ChainVerifier(
        keys,
        anchor_seq=anchor_seq,
        anchor_mac=anchor.through_mac if anchor else GENESIS,
        locate=lambda mac: chain.locate(connection, mac),
    )
    result = verifier.verify(chain.read_links(connection, anchor_seq, through), head)
    problem = _checkpoint_problem(keyring, checkpoints) or result.problem
    if problem is None:
        # The highest seq first, then the head: writers move both forward together, so a seq
        # above the head's means events that did not come through the chain's writer.
        highest = chain.max_seq(connection)
        current = chain.read_head(connection)
        if current is not None and highest > current.last_seq:
            problem = beyond_head(current.last_seq)
    earlier_out = None
    if problem is None and earlier is not None:
        problem, found = _earlier_head(connection, earlier, anchor, through)
        earlier_out = {"seq": earlier.seq, "mac": earlier.mac, "found": found}
    count, oldest = chain.incomplete(connection, anchor_seq, through)
    return VerifyReport(
        ok=problem is None,
        checked=result.checked,
        first_seq=result.first_seq,
        last_seq=result.last_seq,
        head=None if head is None else {"seq": head.last_seq, "mac": head.last_mac},
        checkpoint=_checkpoint_out(anchor),
        incomplete=count,
        incomplete_oldest=oldest,
        problem=None
        if problem is None
        else {"seq": problem.seq, "kind": problem.kind, "detail": problem.detail},
        keys=sorted(result.keys_used),
        earlier_head=earlier_out,
    )


def _earlier_head(
    connection: Connection, earlier: EarlierHead, anchor: Checkpoint | None, last_seq: int
) -> tuple[Problem | None, str | None]:
    """Whether a verified chain still holds the event an earlier head named.

    Returns the problem, if any, and what was found: ``in_chain`` (the same event, or the
    checkpoint ending at it), or ``pruned`` when it has since been removed behind the
    checkpoint and can no longer be compared.
    """
    replaced = "the log was replaced since an earlier verify saw"
    if earlier.seq > last_seq:
        return Problem(
            last_seq + 1,
            "missing",
            f"{replaced} it reach seq {earlier.seq}; it now ends at seq {last_seq}",
        ), None
    stored: str | None
    if anchor is not None and earlier.seq <= anchor.through_seq:
        if earlier.seq < anchor.through_seq:
            return None, "pruned"
        stored = anchor.through_mac
    else:
        stored = chain.mac_at(connection, earlier.seq)
    if stored != earlier.mac:
        return Problem(earlier.seq, "modified", f"{replaced} another event here"), None
    return None, "in_chain"


PRUNE_ACTION: Final = "audit.prune"


@dataclass(frozen=True)
class PruneReport:
    """What ``broker audit prune`` and ``POST /broker/v1/audit/prune`` report."""

    before: datetime
    pruned: int
    through_seq: int
    incomplete_pruned: int
    checkpoint: dict[str, Any] | None
    seq: int | None
    """The seq of the admin event recording this prune (None for a dry run)."""
    dry_run: bool = False
    """Whether this only says what a prune would do: then nothing was changed."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "before": self.before.isoformat(),
            "pruned": self.pruned,
            "through_seq": self.through_seq,
            "incomplete_pruned": self.incomplete_pruned,
            "checkpoint": self.checkpoint,
            "seq": self.seq,
            "dry_run": self.dry_run,
        }


def prune_log(
    connection: Connection,
    keyring: Keyring,
    before: datetime,
    record: Mapping[str, Any],
    *,
    dry_run: bool = False,
) -> PruneReport:
    """Verify the events retention would remove, then remove them behind a checkpoint.

    Refuses (``ChainBrokenError``) if that part of the chain does not verify: pruning must
    never launder tampering into a signed checkpoint. The prune is recorded as an admin event
    (``record`` names who asked) in the same transaction, so it never happens unrecorded.

    A ``dry_run`` does all of it in a transaction it then rolls back: the counts are those
    the prune would report, and nothing is removed or recorded.
    """
    if before > utcnow():
        # Almost certainly a typo, and it would remove every event.
        raise ValidationFailedError("before", "must not be in the future")
    with connection.begin() as transaction:
        head = chain.lock_head(connection)
        anchor = _anchor(connection, keyring)
        anchor_seq = anchor.through_seq if anchor else 0
        through = min(chain.prune_through(connection, before, anchor_seq), head.last_seq)
        pruned, incomplete, checkpoint = 0, 0, anchor
        if through > anchor_seq:
            verifier = ChainVerifier(
                keyring.audit_chain_keys(),
                anchor_seq=anchor_seq,
                anchor_mac=anchor.through_mac if anchor else GENESIS,
                locate=lambda mac: chain.locate(connection, mac),
            )
            result = verifier.walk(chain.read_links(connection, anchor_seq, through))
            if result.problem is not None:
                problem = result.problem
                raise ChainBrokenError(
                    f"refusing to prune: event {problem.seq} is {problem.kind} "
                    f"({problem.detail}); run `broker audit verify`"
                )
            checkpoint = chain.prune(connection, chain_key(keyring), through, result.last_mac)
            pruned, incomplete = checkpoint.events_pruned, checkpoint.incomplete_pruned
        through_seq = max(through, anchor_seq)
        changes = {
            "before": before.isoformat(),
            "pruned": pruned,
            "through_seq": through_seq,
            "incomplete_pruned": incomplete,
        }
        seq: int | None = None
        if dry_run:
            transaction.rollback()
        else:
            [seq] = chain.append(
                connection,
                chain_key(keyring),
                [admin_event(**record, action=PRUNE_ACTION, details={"changes": changes})],
            )
    return PruneReport(
        before=before,
        pruned=pruned,
        through_seq=through_seq,
        incomplete_pruned=incomplete,
        checkpoint=_checkpoint_out(anchor if dry_run else checkpoint),
        seq=seq,
        dry_run=dry_run,
    )
