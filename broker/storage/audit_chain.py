"""The audit chain in the database: append, read back, seal, prune. Never commits.

Every function takes a synchronous ``Connection`` so one implementation serves the
group-commit writer thread, management and token transactions (through
``AsyncSession.run_sync``) and the verifier. Appending locks the single ``audit_head`` row
(``SELECT … FOR UPDATE`` on PostgreSQL; on SQLite the caller's ``BEGIN IMMEDIATE`` already
holds the database's write lock), so every process extends one chain and ``seq`` follows the
order in which events were chained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from itertools import compress, repeat
from operator import is_not
from typing import TYPE_CHECKING, Any, ClassVar, Final, NamedTuple, cast

from sqlalchemy import delete, exists, func, insert, select, update

from broker.core.audit_chain import (
    CHAINED_FIELDS,
    GENESIS,
    AuditEvent,
    Checkpoint,
    Head,
    Link,
    canonical,
    canonical_values,
    checkpoint_mac,
    encode,
    event_mac,
    head_mac,
)
from broker.core.digest import json_encoder
from broker.errors import UnsealedLogError
from broker.storage.models import AuditCheckpoint, AuditEventRow, AuditHead, utcnow

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from sqlalchemy import Connection, Dialect, Row, Table

EVENTS: Final = cast("Table", AuditEventRow.__table__)
HEAD: Final = cast("Table", AuditHead.__table__)
CHECKPOINTS: Final = cast("Table", AuditCheckpoint.__table__)
HEAD_ID: Final = 1
PENDING: Final = "pending"
_READ_CHUNK: Final = 2000
_DETAILS_TEXT: Final = json_encoder(separators=(", ", ": "), sort_keys=False)  # json.dumps's text


@dataclass(frozen=True)
class ChainKey:
    """The key that signs new links: its keyring id and the audit-chain subkey."""

    key_id: str
    key: bytes


def _head_from(row: Row[Any]) -> Head:
    return Head(last_seq=row.last_seq, last_mac=row.last_mac, mac_key=row.mac_key, mac=row.mac)


def read_head(connection: Connection) -> Head | None:
    """The head record as stored, without locking it."""
    row = connection.execute(select(HEAD).where(HEAD.c.id == HEAD_ID)).one_or_none()
    return None if row is None else _head_from(row)


def chain_statements(dialect: Dialect) -> ChainStatements:
    """The chain's statements for ``dialect``'s driver (for a writer's own connection)."""
    return ChainStatements.of(dialect)


def lock_head(connection: Connection) -> Head:
    """Lock the head for the connection's transaction; create the genesis head if none."""
    return _lock_head(connection.connection, ChainStatements.of(connection.dialect))


def append(connection: Connection, key: ChainKey, events: Sequence[AuditEvent]) -> list[int]:
    """Chain ``events`` after the current head, in order, in the connection's transaction."""
    return append_raw(connection.connection, ChainStatements.of(connection.dialect), key, events)


class ChainStatements:
    """The chain's statements for one driver, built once.

    Appending runs on the DB-API connection directly: it is the group commit's hot loop, and
    the same code then serves the writer thread's own connection and a management
    transaction's (through ``append``). Values are stored exactly as the column types would
    store them: naive UTC times (text on SQLite), JSON documents as text.
    """

    _cache: ClassVar[dict[tuple[str, str], ChainStatements]] = {}

    def __init__(self, dialect: str, paramstyle: str) -> None:
        def markers(count: int) -> str:
            if paramstyle in {"numeric", "numeric_dollar"}:
                sign = "$" if paramstyle == "numeric_dollar" else ":"
                return ", ".join(f"{sign}{n}" for n in range(1, count + 1))
            return ", ".join(["?" if paramstyle == "qmark" else "%s"] * count)

        head = f"SELECT last_seq, last_mac FROM {HEAD.name} WHERE id = {HEAD_ID}"  # noqa: S608
        self.lock_head = head + (" FOR UPDATE" if dialect == "postgresql" else "")
        self.any_event = f"SELECT seq FROM {EVENTS.name} LIMIT 1"  # noqa: S608 - fixed names
        self.genesis = (
            f"INSERT INTO {HEAD.name} (id, last_seq, last_mac) "  # noqa: S608 - fixed names
            f"VALUES ({HEAD_ID}, 0, '{GENESIS}') ON CONFLICT (id) DO NOTHING"
        )
        self._markers = markers
        self._inserts: dict[tuple[int, ...], str] = {}
        self.set_head = (
            f"UPDATE {HEAD.name} SET (last_seq, last_mac, mac_key, mac) "  # noqa: S608
            f"= ({markers(4)}) WHERE id = {HEAD_ID}"
        )
        time = _sqlite_time if dialect == "sqlite" else _naive_utc
        converters: dict[str, Callable[[Any], Any]] = {
            "time": time,
            "completed_at": time,
            "details": _DETAILS_TEXT,
        }
        # (position in CHAINED_FIELDS, converter) for the columns whose canonical value is not
        # what the column stores.
        self.converted = [
            (CHAINED_FIELDS.index(name), convert) for name, convert in converters.items()
        ]

    def insert(self, shape: tuple[int, ...]) -> str:
        """The INSERT naming ``seq``, the chained fields at ``shape`` and the link columns.

        An event sets a dozen of its thirty chained fields; the rest are NULL, which every
        column stores when it is not named. Binding a NULL still costs the driver and SQLite
        a value each, about as much as the insert itself (measured: 30 vs 13 µs per row), so
        each shape of event gets the statement that names only what it sets.
        """
        statement = self._inserts.get(shape)
        if statement is None:
            names = ("seq", *(CHAINED_FIELDS[i] for i in shape), *_LINK_COLUMNS)
            statement = self._inserts[shape] = (
                f"INSERT INTO {EVENTS.name} ({', '.join(names)}) "  # noqa: S608 - fixed names
                f"VALUES ({self._markers(len(names))})"
            )
        return statement

    @classmethod
    def of(cls, dialect: Dialect) -> ChainStatements:
        """The statements for ``dialect``'s driver."""
        key = (dialect.name, dialect.paramstyle)
        statements = cls._cache.get(key)
        if statements is None:
            statements = cls._cache[key] = cls(*key)
        return statements


def _lock_head(dbapi: Any, sql: ChainStatements) -> Head:  # noqa: ANN401 - a DB-API connection
    cursor = dbapi.cursor()
    try:
        cursor.execute(sql.lock_head)
        row = cursor.fetchone()
        if row is None:
            cursor.execute(sql.any_event)
            if cursor.fetchone() is not None:
                raise UnsealedLogError(
                    "the audit log holds events written before the audit chain existed; "
                    "run `broker init` to seal them"
                )
            cursor.execute(sql.genesis)
            cursor.execute(sql.lock_head)
            row = cursor.fetchone()
    finally:
        cursor.close()
    return Head(last_seq=int(row[0]), last_mac=str(row[1]), mac_key=None, mac=None)


class Prepared(NamedTuple):
    """An event ready to chain: its canonical content and the values it sets, as stored.

    ``shape`` holds the positions in ``CHAINED_FIELDS`` of the fields that are not NULL and
    ``values`` their stored values, in that order; the MAC covers ``content``, which has all
    of them.
    """

    content: bytes
    values: tuple[Any, ...]
    shape: tuple[int, ...]


def prepare(sql: ChainStatements, events: Sequence[AuditEvent]) -> list[Prepared]:
    """Everything about ``events`` that does not depend on the chain's head.

    Done before the head is locked, so the lock is held only to link and insert.
    """
    return [stored(sql, *canonical_form(event)) for event in events]


def canonical_form(event: AuditEvent) -> tuple[bytes, list[Any]]:
    """An event's canonical bytes and values: the part of ``prepare`` that needs no database.

    A worker does it before handing the event to the writer it shares with other workers.
    """
    values = canonical_values(event)
    return encode(values), values


def stored(sql: ChainStatements, content: bytes, values: list[Any]) -> Prepared:
    """``canonical_form``'s result with each value as its column stores it."""
    if len(values) != len(CHAINED_FIELDS):
        raise ValueError(f"an audit event has {len(CHAINED_FIELDS)} values, not {len(values)}")
    for index, convert in sql.converted:
        if values[index] is not None:
            values[index] = convert(values[index])
    # In C, not a Python loop over thirty values: which values are set, found once, gives
    # their positions (the shape) and the values.
    present = list(map(is_not, values, repeat(None)))
    return Prepared(content, tuple(compress(values, present)), tuple(compress(_POSITIONS, present)))


def append_raw(
    dbapi: Any,  # noqa: ANN401 - a DB-API connection inside the caller's write transaction
    sql: ChainStatements,
    key: ChainKey,
    events: Sequence[AuditEvent] | Sequence[Prepared],
) -> list[int]:
    """Chain ``events`` (or events already prepared) after the current head; return seqs."""
    ready = [e if isinstance(e, Prepared) else prepare(sql, [e])[0] for e in events]
    head = _lock_head(dbapi, sql)
    seq, prev = head.last_seq, head.last_mac
    # Events of one shape go in one executemany. Rows carry their seq, so inserting them by
    # shape rather than in chain order stores the same table in the same transaction.
    by_shape: dict[tuple[int, ...], list[tuple[Any, ...]]] = {}
    for event in ready:
        seq += 1
        mac = event_mac(key.key, prev, event.content)
        rows = by_shape.get(event.shape)
        if rows is None:
            rows = by_shape[event.shape] = []
        rows.append((seq, *event.values, prev, mac, key.key_id))
        prev = mac
    if by_shape:
        cursor = dbapi.cursor()
        try:
            for shape, rows in by_shape.items():
                cursor.executemany(sql.insert(shape), rows)
            cursor.execute(sql.set_head, (seq, prev, key.key_id, head_mac(key.key, seq, prev)))
        finally:
            cursor.close()
    return list(range(head.last_seq + 1, seq + 1))


def _set_head(connection: Connection, key: ChainKey, last_seq: int, last_mac: str) -> None:
    connection.execute(
        update(HEAD)
        .where(HEAD.c.id == HEAD_ID)
        .values(
            last_seq=last_seq,
            last_mac=last_mac,
            mac_key=key.key_id,
            mac=head_mac(key.key, last_seq, last_mac),
        )
    )


_LINK_COLUMNS: Final = ("prev_mac", "mac", "mac_key")
_POSITIONS: Final = range(len(CHAINED_FIELDS))


def _naive_utc(text: str) -> datetime:
    # Canonical times are 'YYYY-MM-DDTHH:MM:SS.ffffff+00:00'; PostgreSQL stores naive UTC.
    return datetime.fromisoformat(text[:26])


def _sqlite_time(text: str) -> str:
    # SQLAlchemy's SQLite DATETIME storage format ('YYYY-MM-DD HH:MM:SS.ffffff'), parsed back.
    return f"{text[:10]} {text[11:26]}"


def seal_unchained(connection: Connection, key: ChainKey) -> int:
    """Sign events written before the chain existed, in seq order; return how many.

    Only possible while there is no head: once the chain exists, an unsigned event is
    tampering, and verification reports it.
    """
    if read_head(connection) is not None:
        return 0
    seq, prev = 0, GENESIS
    sealed = 0
    for row in _rows_after(connection, 0, None):
        mac = event_mac(key.key, prev, canonical(row._mapping))  # noqa: SLF001 - public Row API
        connection.execute(
            update(EVENTS)
            .where(EVENTS.c.seq == row.seq)
            .values(prev_mac=prev, mac=mac, mac_key=key.key_id)
        )
        seq, prev = row.seq, mac
        sealed += 1
    connection.execute(insert(HEAD).values(id=HEAD_ID, last_seq=seq, last_mac=prev))
    if sealed:
        _set_head(connection, key, seq, prev)
    return sealed


def _rows_after(connection: Connection, after: int, through: int | None) -> Iterator[Row[Any]]:
    """Events with ``after < seq <= through``, in seq order, read in bounded chunks."""
    last = after
    while True:
        query = select(EVENTS).where(EVENTS.c.seq > last).order_by(EVENTS.c.seq).limit(_READ_CHUNK)
        if through is not None:
            query = query.where(EVENTS.c.seq <= through)
        rows = connection.execute(query).all()
        yield from rows
        if len(rows) < _READ_CHUNK:
            return
        last = rows[-1].seq


def read_links(connection: Connection, after: int, through: int) -> Iterator[Link]:
    """The stored links with ``after < seq <= through``, in seq order."""
    for row in _rows_after(connection, after, through):
        yield Link(
            seq=row.seq,
            prev_mac=row.prev_mac,
            mac=row.mac,
            mac_key=row.mac_key,
            content=canonical(row._mapping),  # noqa: SLF001 - public Row API
        )


def locate(connection: Connection, mac: str) -> int | None:
    """The seq of the event whose MAC is ``mac``, if it is in the log."""
    seq = connection.execute(select(EVENTS.c.seq).where(EVENTS.c.mac == mac).limit(1)).scalar()
    return None if seq is None else int(seq)


def mac_at(connection: Connection, seq: int) -> str | None:
    """The MAC stored for the event at ``seq``, if there is one."""
    mac = connection.execute(select(EVENTS.c.mac).where(EVENTS.c.seq == seq)).scalar()
    return None if mac is None else str(mac)


def max_seq(connection: Connection) -> int:
    """The highest seq in the log (0 when empty)."""
    return int(connection.execute(select(func.coalesce(func.max(EVENTS.c.seq), 0))).scalar_one())


def checkpoints(connection: Connection) -> list[Checkpoint]:
    """Retention checkpoints, newest (highest ``through_seq``) first."""
    rows = connection.execute(select(CHECKPOINTS).order_by(CHECKPOINTS.c.through_seq.desc()))
    names = [field.name for field in fields(Checkpoint)]
    return [Checkpoint(**{name: row._mapping[name] for name in names}) for row in rows]  # noqa: SLF001 - public Row API


def _incomplete_condition(after: int, through: int) -> Any:  # noqa: ANN401 - SQL expression
    completion = EVENTS.alias("completion")
    return (
        (EVENTS.c.state == PENDING)
        & (EVENTS.c.seq > after)
        & (EVENTS.c.seq <= through)
        & ~exists().where(completion.c.completes == EVENTS.c.seq)
    )


def incomplete(
    connection: Connection, after: int, through: int, sample: int = 10
) -> tuple[int, list[int]]:
    """Pending events in ``(after, through]`` with no completion: how many, and the oldest."""
    condition = _incomplete_condition(after, through)
    count = connection.execute(
        select(func.count()).select_from(EVENTS).where(condition)
    ).scalar_one()
    seqs = connection.execute(
        select(EVENTS.c.seq).where(condition).order_by(EVENTS.c.seq).limit(sample)
    ).scalars()
    return count, list(seqs)


def prune_through(connection: Connection, before: datetime, after: int) -> int:
    """The highest seq that retention may remove for ``before``: every event up to it is older.

    Returns ``after`` (the current anchor) when nothing is old enough.
    """
    newer = connection.execute(
        select(func.min(EVENTS.c.seq)).where(EVENTS.c.time >= before, EVENTS.c.seq > after)
    ).scalar()
    if newer is None:
        head = read_head(connection)
        return head.last_seq if head is not None else after
    return max(after, int(newer) - 1)


def prune(connection: Connection, key: ChainKey, through: int, through_mac: str) -> Checkpoint:
    """Delete events up to ``through`` and record a signed checkpoint standing in for them."""
    count = connection.execute(
        select(func.count()).select_from(EVENTS).where(EVENTS.c.seq <= through)
    ).scalar_one()
    pending, _ = incomplete(connection, 0, through, sample=0)
    checkpoint = Checkpoint(
        through_seq=through,
        through_mac=through_mac,
        events_pruned=count,
        incomplete_pruned=pending,
        created_at=utcnow(),
        mac_key=key.key_id,
    )
    signed = replace(checkpoint, mac=checkpoint_mac(key.key, checkpoint))
    connection.execute(delete(EVENTS).where(EVENTS.c.seq <= through))
    connection.execute(insert(CHECKPOINTS).values(**asdict(signed)))
    return signed
