"""The audit chain: canonical event content, MACs, and verification. Pure logic.

Every audit event is one link of a single chain ordered by ``seq``. An event's MAC is
HMAC-SHA256, keyed by a keyring subkey that never reaches the database, over the MAC of the
event before it and the event's canonical content; each event stores its own MAC, its
predecessor's MAC and the id of the key. A signed *head* records the last event, so cutting
events off the end shows too, and a signed *checkpoint* stands in for events removed by
retention.

``seq`` is deliberately not part of the content: order is carried by the links alone, which is
what lets verification tell kinds of tampering apart instead of only saying "broken":

- ``modified``: an event's MAC does not match its content (a changed column, a forged event);
- ``inserted``: a forged event whose successor links straight to the event before it, or
  events beyond the signed head;
- ``missing``: the chain skips over events that are not in the log (deleted), also at the tail;
- ``reordered``: an event links to a genuine event that sits elsewhere in the log;
- ``unknown_key``: an event was signed with a key the keyring no longer has.

Events written as ``pending`` before a call is forwarded are completed by a separate event
(``completes`` names the pending one), so no event is ever updated after it is written.

Contract: docs/audit.md#the-hmac-chain.
"""

from __future__ import annotations

import hmac
import operator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from broker.core.digest import json_encoder, mac

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping

GENESIS: Final = "0" * 64
"""The predecessor MAC of the first event ever written."""

# Every column of an audit event except seq and the chain's own columns, in a fixed order.
CHAINED_FIELDS: Final = (
    "time",
    "request_id",
    "kind",
    "action",
    "state",
    "decision",
    "reason",
    "client_id",
    "token_id",
    "credential_id",
    "upstream",
    "actor_key_id",
    "source_ip",
    "user_agent",
    "method",
    "path",
    "query",
    "scope",
    "status",
    "upstream_status",
    "response_bytes",
    "duration_ms",
    "canvas_context_id",
    "details",
    "completes",
    "completed_at",
)
_FLOAT_FIELDS: Final = ("duration_ms",)
_ENCODE: Final = json_encoder(separators=(",", ":"), sort_keys=True)


class _Seconds:
    """The ISO text of a UTC time up to its seconds, for the last second asked (one entry).

    ``isoformat`` costs about 1.2 µs, twice per proxied call; the events of one second share
    this part, and only the microseconds are formatted for each (bench/README.md, "Costs
    CPython hides").
    """

    def __init__(self) -> None:
        # One tuple, replaced whole: a thread reading it meanwhile sees the old or the new.
        self._last: tuple[tuple[int, ...], str] = ((), "")

    def text(self, value: datetime) -> str:
        key = (value.second, value.minute, value.hour, value.day, value.month, value.year)
        last = self._last
        if key != last[0]:
            last = self._last = (key, value.isoformat(timespec="seconds")[:19])
        return last[1]


_SECONDS: Final = _Seconds()


def _time_text(name: str, value: object) -> str:
    """An aware time as UTC ISO text with microseconds, the same whatever the offset."""
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise TypeError(f"{name} must be an aware datetime")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return f"{_SECONDS.text(value)}.{value.microsecond:06d}+00:00"


_AT: Final = CHAINED_FIELDS.index("time")
_COMPLETED_AT: Final = CHAINED_FIELDS.index("completed_at")
_FLOAT_POSITIONS: Final = tuple(CHAINED_FIELDS.index(name) for name in _FLOAT_FIELDS)


PENDING: Final = "pending"
COMPLETE: Final = "complete"
_CHAINED_VALUES: Final = operator.attrgetter(*CHAINED_FIELDS)


@dataclass(slots=True, kw_only=True)
class AuditEvent:
    """One audit event as the broker writes it: every chained column (docs/audit.md#event-fields).

    A complete event's ``completed_at`` is its ``time`` unless given. ``details`` holds what a
    management action changed (never a secret); ``completes`` names the pending event an
    outcome completes.
    """

    kind: str
    action: str
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    request_id: str | None = None
    state: str = COMPLETE
    decision: str = "allow"
    reason: str | None = None
    client_id: str | None = None
    token_id: str | None = None
    credential_id: str | None = None
    upstream: str | None = None
    actor_key_id: str | None = None
    source_ip: str | None = None
    user_agent: str | None = None
    method: str | None = None
    path: str | None = None
    query: str | None = None
    scope: str | None = None
    status: int | None = None
    upstream_status: int | None = None
    response_bytes: int | None = None
    duration_ms: float | None = None
    canvas_context_id: str | None = None
    details: dict[str, Any] | None = None
    completes: int | None = None
    completed_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.completed_at is None and self.state == COMPLETE:
            self.completed_at = self.time

    def values(self) -> list[Any]:
        """The chained fields' values, in :data:`CHAINED_FIELDS` order, as given."""
        return list(_CHAINED_VALUES(self))


def canonical_values(event: AuditEvent | Mapping[Any, Any]) -> list[Any]:
    """Every chained field, in order, as the database gives it back.

    ``event`` is an event being written, or a stored row's mapping being verified. Times
    become UTC ISO text with microseconds and durations floats, so the writer and the
    verifier see the same thing.
    """
    if isinstance(event, AuditEvent):
        values = event.values()
    else:
        values = [event.get(name) for name in CHAINED_FIELDS]
    at, completed = values[_AT], values[_COMPLETED_AT]
    if at is not None:
        values[_AT] = _time_text("time", at)
    if completed is not None:
        # A complete event's completed_at is usually its time: the same text, made once.
        values[_COMPLETED_AT] = (
            values[_AT] if completed is at else _time_text("completed_at", completed)
        )
    for position in _FLOAT_POSITIONS:
        number = values[position]
        if number is not None:
            values[position] = float(number)
    return values


def encode(values: list[Any]) -> bytes:
    """The canonical bytes of ``canonical_values``: compact JSON with sorted keys."""
    return _ENCODE(values).encode()


def canonical(event: AuditEvent | Mapping[Any, Any]) -> bytes:
    """The bytes a MAC covers: every chained field, in order, as compact sorted JSON."""
    return encode(canonical_values(event))


def event_mac(key: bytes, prev_mac: str, content: bytes) -> str:
    """HMAC-SHA256 of an event's predecessor MAC and its canonical content, as hex."""
    return mac(key).hexdigest(b"event\x00" + prev_mac.encode() + b"\x00" + content)


def head_mac(key: bytes, last_seq: int, last_mac: str) -> str:
    """MAC of the head record: the newest event's seq and MAC."""
    return mac(key).hexdigest(f"head\x00{last_seq}\x00{last_mac}".encode())


def checkpoint_mac(key: bytes, checkpoint: Checkpoint) -> str:
    """MAC of a retention checkpoint."""
    message = (
        f"checkpoint\x00{checkpoint.through_seq}\x00{checkpoint.through_mac}\x00"
        f"{checkpoint.events_pruned}\x00{checkpoint.incomplete_pruned}\x00"
        f"{_time_text('created_at', checkpoint.created_at)}"
    ).encode()
    return hmac.digest(key, message, "sha256").hex()


@dataclass(frozen=True)
class Link:
    """One event's place in the chain as stored: what verification reads for each event."""

    seq: int
    prev_mac: str | None
    mac: str | None
    mac_key: str | None
    content: bytes


@dataclass(frozen=True)
class Head:
    """The signed record of the newest event."""

    last_seq: int
    last_mac: str
    mac_key: str | None
    mac: str | None


@dataclass(frozen=True)
class Checkpoint:
    """Signed stand-in for the events up to ``through_seq``, removed by retention."""

    through_seq: int
    through_mac: str
    events_pruned: int
    incomplete_pruned: int
    created_at: datetime
    mac_key: str | None = None
    mac: str | None = None


@dataclass(frozen=True)
class Problem:
    """The first place where the log is not what was written."""

    seq: int
    kind: str
    detail: str


@dataclass
class Verification:
    """What verification found: events checked and the first problem, if any."""

    checked: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_mac: str = GENESIS
    problem: Problem | None = None
    keys_used: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        """No problem was found."""
        return self.problem is None


class ChainVerifier:
    """Walks stored links in seq order and reports the first break.

    ``keys`` maps key ids to audit-chain subkeys; ``locate`` finds the seq of the event with a
    given MAC (for telling a reordering from a deletion), or None.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        *,
        anchor_seq: int = 0,
        anchor_mac: str = GENESIS,
        locate: Callable[[str], int | None] = lambda _mac: None,
    ) -> None:
        self._keys = keys
        self._anchor_seq = anchor_seq
        self._anchor_mac = anchor_mac
        self._locate = locate

    def _sound(self, link: Link) -> str | None:
        """None if the link's MAC matches its content, else the kind of problem."""
        if link.mac is None or link.prev_mac is None or link.mac_key is None:
            return "modified"
        key = self._keys.get(link.mac_key)
        if key is None:
            return "unknown_key"
        expected = event_mac(key, link.prev_mac, link.content)
        return None if hmac.compare_digest(expected, link.mac) else "modified"

    def walk(self, links: Iterable[Link]) -> Verification:
        """Check every link in turn, stopping at the first problem."""
        result = Verification(last_mac=self._anchor_mac)
        prev_seq, prev_mac = self._anchor_seq, self._anchor_mac
        for link, following in _pairs(iter(links)):
            result.first_seq = link.seq if result.first_seq is None else result.first_seq
            problem = self._check(link, following, prev_seq, prev_mac)
            if problem is not None:
                result.problem = problem
                return result
            result.checked += 1
            if link.mac_key:
                result.keys_used.add(link.mac_key)
            prev_seq, prev_mac = link.seq, link.mac or ""
            result.last_seq, result.last_mac = prev_seq, prev_mac
        return result

    def verify(self, links: Iterable[Link], head: Head | None) -> Verification:
        """Check every link, then that the last one is the one the signed head names."""
        result = self.walk(links)
        if result.problem is None:
            last_seq = self._anchor_seq if result.last_seq is None else result.last_seq
            result.problem = self._check_head(head, last_seq, result.last_mac)
        return result

    def _check(
        self, link: Link, following: Link | None, prev_seq: int, prev_mac: str
    ) -> Problem | None:
        soundness = self._sound(link)
        if soundness == "unknown_key":
            return Problem(
                link.seq, "unknown_key", f"signed with key {link.mac_key!r}, not in the keyring"
            )
        if soundness is not None:
            if following is not None and following.prev_mac == prev_mac:
                return Problem(
                    link.seq,
                    "inserted",
                    "this event was not written by the broker: "
                    "the event after it follows straight on from the one before",
                )
            return Problem(link.seq, "modified", "the event's content does not match its MAC")
        if link.prev_mac == prev_mac:
            return None
        return self._unlinked(link, prev_seq)

    def _unlinked(self, link: Link, prev_seq: int) -> Problem:
        """A sound event that does not follow the one before it: what happened in between."""
        if link.seq > prev_seq + 1:
            return Problem(
                prev_seq + 1,
                "missing",
                f"events {prev_seq + 1} to {link.seq - 1} are not in the log"
                if link.seq > prev_seq + 2
                else f"event {prev_seq + 1} is not in the log",
            )
        elsewhere = self._locate(link.prev_mac or "")
        if elsewhere is not None and elsewhere != prev_seq:
            return Problem(
                link.seq,
                "reordered",
                f"this event was written after the event now at seq {elsewhere}",
            )
        return Problem(
            link.seq,
            "missing",
            f"the event written just before seq {link.seq} is not in the log",
        )

    def _check_head(self, head: Head | None, last_seq: int, last_mac: str) -> Problem | None:
        empty = last_seq == self._anchor_seq
        if head is None:
            return None if empty else Problem(last_seq, "modified", "the chain head is missing")
        key = self._keys.get(head.mac_key or "")
        if head.mac is None or key is None:
            if head.last_seq == 0 and empty and self._anchor_seq == 0:
                return None  # a new, empty log: nothing signed yet
            return Problem(head.last_seq, "modified", "the chain head is not signed")
        if not hmac.compare_digest(head_mac(key, head.last_seq, head.last_mac), head.mac):
            return Problem(head.last_seq, "modified", "the chain head was altered")
        return _head_position(head, last_seq, last_mac)


def _head_position(head: Head, last_seq: int, last_mac: str) -> Problem | None:
    """Whether the last event verified is the one a sound head names."""
    if head.last_seq > last_seq:
        return Problem(
            last_seq + 1,
            "missing",
            f"events {last_seq + 1} to {head.last_seq} were cut off the end of the log",
        )
    if head.last_seq < last_seq:
        return beyond_head(head.last_seq)
    if head.last_mac != last_mac:
        return Problem(last_seq, "modified", "the newest event is not the one the head signed")
    return None


def beyond_head(last_seq: int) -> Problem:
    """Events with seqs above the signed head's were not appended by the chain's writer."""
    return Problem(last_seq + 1, "inserted", "events after the signed head of the log")


def checkpoint_sound(keys: Mapping[str, bytes], checkpoint: Checkpoint) -> bool:
    """Whether a checkpoint's MAC matches its content under a key the keyring has."""
    key = keys.get(checkpoint.mac_key or "")
    if key is None or checkpoint.mac is None:
        return False
    return hmac.compare_digest(checkpoint_mac(key, checkpoint), checkpoint.mac)


def _pairs(links: Iterator[Link]) -> Iterator[tuple[Link, Link | None]]:
    """Each link with the one after it (one-link lookahead, still streaming)."""
    current = next(links, None)
    while current is not None:
        following = next(links, None)
        yield current, following
        current = following
