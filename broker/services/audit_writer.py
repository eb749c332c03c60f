"""Group commit of audit events: one writer thread per process (docs/audit.md#group-commit).

A request hands its event to the writer and, when the broker must not act before the event is
durable (the pending event of a call about to be forwarded, a refusal about to be answered),
waits for the event's ``seq``. The writer commits everything queued since its last commit in
one transaction — one fsync for many requests — chaining the events (``storage.audit_chain``).
So each request still waits for its own event to be durable, but requests share commits.

Completions of forwarded calls are not waited for: they ride along with the next commit that
someone waits for, or go on their own after ``completion_delay`` seconds. A crash in between
leaves the pending event without completion: visible as incomplete, never a silent gap.

Why a thread: the driver's blocking work (SQLite's fsync, PostgreSQL's commit round trip) runs
there with the GIL released, and the event loop only appends to a queue and, once per batch,
resolves futures. Several processes sharing one SQLite file take a lock file (``flock``)
around each transaction, so their writers queue in the kernel and wake the moment the lock is
free, rather than polling in SQLite's sleeping busy handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from broker.errors import AuditWriteError, WriteLockBusy
from broker.storage.audit_chain import (
    ChainKey,
    ChainStatements,
    Prepared,
    append_raw,
    chain_statements,
    prepare,
)
from broker.storage.database import SQLITE_BUSY_TIMEOUT_MS, create_sync_engine, sqlite_path

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from sqlalchemy import Engine, PoolProxiedConnection

    from broker.core.audit_chain import AuditEvent
    from broker.keyring import Keyring

logger = logging.getLogger(__name__)


class EventWriter(Protocol):
    """What the broker needs of an audit writer.

    ``AuditWriter`` in a single process; ``audit_hub.RemoteAuditWriter`` in each worker of
    ``broker serve --workers N``.
    """

    observe: Callable[[float, int], None] | None

    async def write(
        self,
        event: AuditEvent,
        *,
        abandoned: Callable[[int], AuditEvent] | None = None,
        alone: bool = False,
    ) -> int:
        """Commit ``event``; return its seq or raise ``AuditWriteError``."""

    def write_later(self, event: AuditEvent) -> None:
        """Queue ``event`` for the next commit; nobody waits for it."""

    async def flush(self) -> None:
        """Wait until everything queued before the call is committed (or has failed)."""

    async def aclose(self) -> None:
        """Commit what is queued and release the writer."""


@dataclass
class _Item:
    """A queued event (None for a flush marker) and who waits for it, if anyone."""

    event: AuditEvent | None
    future: asyncio.Future[int] | None
    # What to record if the waiter went away before its pending event was committed.
    abandoned: Callable[[int], AuditEvent] | None = None


class ChainCommitter:
    """Appends batches of events to the chain on one DB-API connection of its own.

    The commit half of a writer, used from one thread at a time: the writer thread of
    ``AuditWriter`` (and the event loop's, for an inline commit), or the loop of the audit
    hub that all workers of one ``broker serve`` share (``services.audit_hub``).
    """

    def __init__(self, database_url: str, keyring: Keyring) -> None:
        self._url = database_url
        self._key = ChainKey(keyring.primary_id, keyring.audit_chain_keys()[keyring.primary_id])
        self._engine: Engine | None = None
        self._raw: PoolProxiedConnection | None = None
        self._sqlite = sqlite_path(database_url) is not None
        self._sql: ChainStatements | None = None
        self._lock_file: int | None = None

    @property
    def statements(self) -> ChainStatements:
        """The chain's statements for this database (after ``open``)."""
        if self._sql is None:  # pragma: no cover - opened before first use
            raise AuditWriteError("the audit writer is not running")
        return self._sql

    def open(self) -> None:
        """Build the engine and, on SQLite, open the lock file; connects on first commit."""
        if self._engine is not None:
            return
        self._engine = create_sync_engine(self._url)
        self._sql = chain_statements(self._engine.dialect)
        path = sqlite_path(self._url)
        if path is not None:
            lock_path = path.with_name(path.name + ".audit-lock")
            self._lock_file = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)

    def close(self) -> None:
        """Release the connection, the engine and the lock file."""
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    def commit(
        self,
        events: Sequence[AuditEvent | Prepared],
        *,
        wait: bool = True,
        observe: Callable[[float, int], None] | None = None,
    ) -> list[int | BaseException]:
        """Commit ``events`` in one transaction; per event, its seq or the error.

        If the transaction fails, the events are committed one by one, so one bad event
        cannot sink the others. With ``wait`` False, raise ``WriteLockBusy`` instead of waiting
        for the database's write lock (see ``AuditWriter._commit_inline``), and fail the
        whole batch rather than retry it event by event. ``observe`` is
        called with the seconds and the size of a successful commit.
        """
        if not events:
            return []
        started = time.perf_counter()
        try:
            seqs: list[int | BaseException] = list(self._append(events, wait=wait))
        except WriteLockBusy:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means "not durable"
            if len(events) == 1 or not wait:
                # (Without ``wait`` no retry: one by one, a retry could wait for the lock.)
                logger.error("audit store unavailable: %s", type(exc).__name__)  # noqa: TRY400
                return [exc] * len(events)
            return [self.commit([event], observe=observe)[0] for event in events]
        if observe is not None:
            observe(time.perf_counter() - started, len(events))
        return seqs

    def _append(self, events: Sequence[AuditEvent | Prepared], *, wait: bool = True) -> list[int]:
        """One transaction on the writer's own DB-API connection."""
        engine, statements = self._engine, self._sql
        if engine is None or statements is None:  # pragma: no cover - started on first put
            raise AuditWriteError("the audit writer is not running")
        if self._raw is None:
            # Connected through the engine for its URL handling and connect-time settings
            # (SQLite: WAL, full fsync, driver transaction control off).
            self._raw = engine.raw_connection()
        raw = self._raw
        # Prepared before the lock, which is held only to link and insert.
        ready = [e if isinstance(e, Prepared) else prepare(statements, [e])[0] for e in events]
        with self._locked(wait=wait):
            if self._sqlite:
                self._begin_immediate(raw, wait=wait)
            try:
                seqs = append_raw(raw, statements, self._key, ready)
                raw.commit()
            except BaseException:
                # The connection's state is unknown: drop it, connect afresh next time.
                with contextlib.suppress(Exception):
                    raw.rollback()
                with contextlib.suppress(Exception):
                    raw.invalidate()
                self._raw = None
                raise
        return seqs

    def _begin_immediate(self, raw: PoolProxiedConnection, *, wait: bool) -> None:
        """Take SQLite's write lock; without ``wait``, raise ``WriteLockBusy`` if it is held."""
        cursor = raw.cursor()
        try:
            if not wait:
                cursor.execute("PRAGMA busy_timeout=0")
            try:
                cursor.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if wait or exc.sqlite_errorname != "SQLITE_BUSY":
                    raise
                raise WriteLockBusy from exc
            finally:
                if not wait:
                    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        except WriteLockBusy:
            raise  # no transaction began: the connection is as it was
        except BaseException:
            with contextlib.suppress(Exception):
                raw.invalidate()
            self._raw = None
            raise

    @contextlib.contextmanager
    def _locked(self, *, wait: bool = True) -> Iterator[None]:
        if self._lock_file is None:
            yield
            return
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise WriteLockBusy from exc
        try:
            yield
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)


class AuditWriter:
    """Appends audit events to the chain in batches, from one thread."""

    def __init__(
        self,
        database_url: str,
        keyring: Keyring,
        *,
        completion_delay: float = 0.02,
        max_batch: int = 1000,
        observe: Callable[[float, int], None] | None = None,
    ) -> None:
        self._committer = ChainCommitter(database_url, keyring)
        self._completion_delay = completion_delay
        self._max_batch = max_batch
        self.observe = observe
        self._queue: deque[_Item] = deque()
        self._waited = 0  # queued items someone is waiting for
        self._cond = threading.Condition(threading.Lock())
        # Held while a batch is committed, by the writer thread or an inline commit.
        self._busy = threading.Lock()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._sqlite = sqlite_path(database_url) is not None

    # Event-loop side ------------------------------------------------------------------------

    async def write(
        self,
        event: AuditEvent,
        *,
        abandoned: Callable[[int], AuditEvent] | None = None,
        alone: bool = False,
    ) -> int:
        """Commit ``event`` and return its seq; raise ``AuditWriteError`` if it cannot be.

        ``abandoned(seq)`` is written in turn if the caller is cancelled while waiting and the
        event was committed anyway, so the log says why the call went no further.

        ``alone`` says the caller is the only request in progress. Then, on SQLite and with
        the writer idle, the event is committed right here, on the event loop's thread:
        nothing else is waiting for the loop, and the two thread hand-offs (to the writer and
        back) cost more than a third of the commit itself.
        """
        if alone and self._sqlite:
            seq = self._commit_inline(event)
            if seq is not None:
                return seq
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._put(_Item(event, future, abandoned))
        return await future

    def _commit_inline(self, event: AuditEvent) -> int | None:
        """Commit ``event`` with the queued completions on this thread; None if busy.

        Never waits for the database's write lock: another worker, or a management
        transaction of this very process (whose next step needs this thread), may hold it.
        """
        if not self._busy.acquire(blocking=False):
            return None
        try:
            with self._cond:
                if self._waited or self._closing:
                    return None  # others wait for the writer: join their batch instead
                if self._thread is None:
                    self._start()
                batch = [*self._queue, _Item(event, None)]
                self._queue.clear()
            try:
                results = self._commit(batch, wait=False)
            except WriteLockBusy:
                with self._cond:  # the completions go back, first in line
                    self._queue.extendleft(reversed(batch[:-1]))
                return None
        finally:
            self._busy.release()
        result = results[-1]
        if isinstance(result, BaseException):
            raise AuditWriteError("the audit event could not be committed") from result
        return result

    def write_later(self, event: AuditEvent) -> None:
        """Queue ``event`` for the next commit; nobody waits for it."""
        self._put(_Item(event, None))

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed (or has failed)."""
        if self._thread is None:
            return
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._put(_Item(None, future))
        with contextlib.suppress(AuditWriteError):
            await future

    async def aclose(self) -> None:
        """Commit what is queued and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._committer.close()

    def _put(self, item: _Item) -> None:
        with self._cond:
            if self._closing:
                raise AuditWriteError("the audit writer is closed")
            if self._thread is None:
                self._start()
            self._queue.append(item)
            if item.future is not None:
                self._waited += 1
                self._cond.notify()
            # Nobody waits for a completion: the writer picks it up on its next round (at
            # most ``completion_delay`` away), so queuing one wakes no thread.

    def _start(self) -> None:
        self._committer.open()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # Writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait(self._completion_delay)
                if not self._queue:
                    return
                if not self._waited and not self._closing:
                    # Only completions: let a request someone waits for carry them.
                    self._cond.wait_for(
                        lambda: self._waited > 0 or self._closing, self._completion_delay
                    )
                if not self._queue:
                    continue  # an inline commit took the completions
                count = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(count)]
                self._waited -= sum(1 for item in batch if item.future is not None)
            with self._busy:
                results = self._commit(batch)
            self._resolve(batch, results)

    def _commit(self, batch: list[_Item], *, wait: bool = True) -> list[int | BaseException]:
        events = [item.event for item in batch if item.event is not None]
        results = iter(self._committer.commit(events, wait=wait, observe=self.observe))
        return [next(results) if item.event is not None else 0 for item in batch]

    def _resolve(self, batch: list[_Item], results: list[int | BaseException]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Item, int | BaseException]]] = {}
        for item, result in zip(batch, results, strict=True):
            if item.future is not None:
                by_loop.setdefault(item.future.get_loop(), []).append((item, result))
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(self._settle, outcomes)

    def _settle(self, outcomes: list[tuple[_Item, int | BaseException]]) -> None:
        """On the event loop: hand each waiter its seq or the failure."""
        for item, result in outcomes:
            future = item.future
            if future is None:  # pragma: no cover - only waited items are settled
                continue
            if future.done():
                if isinstance(result, int) and item.abandoned is not None:
                    with contextlib.suppress(AuditWriteError):
                        self.write_later(item.abandoned(result))
                continue
            if isinstance(result, BaseException):
                future.set_exception(AuditWriteError("the audit event could not be committed"))
            else:
                future.set_result(result)
