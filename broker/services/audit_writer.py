"""Committing audit events: the chain's committer and the process's writer (docs/audit.md).

A request hands its event to the writer and, when the broker must not act before the event is
durable (the pending event of a call about to be forwarded, a refusal about to be answered),
waits for the event's ``seq``. Events are committed in batches (``GroupCommit`` decides
when): everything queued by the end of a turn of the event loop goes in one transaction, one
fsync for many requests, chained by ``storage.audit_chain``. So each request still waits for
its own event to be durable, but requests share commits.

Completions of forwarded calls are not waited for: they ride along with the next batch, or go
on their own after ``completion_delay`` seconds. A crash in between leaves the pending event
without completion: visible as incomplete, never a silent gap.

Where a batch is committed: on SQLite, on the event loop's own thread, as long as the
database's write lock is free (taking it never waits: ``BEGIN IMMEDIATE`` with no busy
timeout); the fsync is short, and no thread hand-off, wake-up or contention for the GIL
costs anything per call. If the lock is taken (another process, or a management transaction
of this one, whose next step needs the loop), and always on PostgreSQL, where a commit is a
network round trip, the batch goes to the writer's thread, which may wait. Several processes
sharing one SQLite file take a lock file (``flock``) around each transaction, so their
writers queue in the kernel rather than polling in SQLite's busy handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from broker.errors import AuditStoreUnavailableError, AuditWriteError, WriteLockBusy
from broker.services.deadline import Deadline
from broker.services.group_commit import AuditHealth, GroupCommit, Retained
from broker.storage.audit_chain import (
    ChainKey,
    ChainStatements,
    Prepared,
    append_raw,
    chain_statements,
    prepare,
)
from broker.storage.database import busy_timeout_ms

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from sqlalchemy import Engine, PoolProxiedConnection

    from broker.core.audit_chain import AuditEvent
    from broker.keyring import Keyring
    from broker.storage.database import Database

logger = logging.getLogger(__name__)


class EventWriter(Protocol):
    """What the broker needs of an audit writer.

    ``AuditWriter`` in a single process; ``audit_hub.RemoteAuditWriter`` in each worker of
    ``broker serve --workers N``.
    """

    observe: Callable[[float, int], None] | None
    health: AuditHealth

    @property
    def completions_retained(self) -> int:
        """Completions kept because the store was down, not yet committed."""

    @property
    def completions_dropped(self) -> int:
        """Completions dropped because too many were kept: their calls stay pending."""

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


@dataclass(slots=True)
class _Item:
    """A queued event (None for a flush marker) and who waits for it, if anyone."""

    event: AuditEvent | None
    future: asyncio.Future[int] | None
    # What to record if the waiter went away before its pending event was committed.
    abandoned: Callable[[int], AuditEvent] | None = None


class _Watchdog:
    """Cuts the connection of a commit still running past the bound (PostgreSQL only).

    A database that stops answering without closing the connection (a partition, a
    blackholed link) leaves the driver waiting in ``recv`` however the server was told to
    time out; keepalives only help if the peer's kernel stops acknowledging. So a thread
    looks every ``bound / 4`` seconds at the commit in progress and, once it has run past
    the bound, shuts its socket down (``shutdown(2)`` on a duplicate of the descriptor wakes
    a thread blocked on the original): the driver fails at once, the committer drops the
    connection and connects afresh for the next batch. Arming costs two assignments.
    """

    def __init__(self, bound: float) -> None:
        self._bound = bound
        self._lock = threading.Lock()
        self._armed: tuple[float, int] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = False

    def arm(self, fileno: int) -> None:
        """A commit begins on the connection of ``fileno``."""
        self.fired = False
        self._armed = (time.monotonic() + self._bound, fileno)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-watchdog", daemon=True)
            self._thread.start()

    def disarm(self) -> None:
        """The commit ended; its descriptor may be closed and reused from now on."""
        with self._lock:
            self._armed = None

    def stop(self) -> None:
        """End the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.wait(self._bound / 4):
            armed = self._armed
            if armed is None or time.monotonic() < armed[0]:
                continue
            with self._lock:
                if self._armed is not armed:
                    continue
                self._armed = None
                self.fired = True
                with contextlib.suppress(OSError):
                    duplicate = socket.socket(fileno=os.dup(armed[1]))
                    try:
                        duplicate.shutdown(socket.SHUT_RDWR)
                    finally:
                        duplicate.close()
            logger.error("audit commit ran past BROKER_AUDIT_TIMEOUT; its connection was cut")


async def bounded_wait(
    future: asyncio.Future[int], bound: float | None, health: AuditHealth
) -> int:
    """Await the seq of a queued event for at most ``bound`` seconds (None: no bound).

    Past the bound the future is cancelled, so a commit that lands later records the
    caller's ``abandoned`` event, and the caller gets ``AuditWriteError``: the broker answers
    503 and forwards nothing (docs/audit.md#under-faults).
    """
    if bound is None:
        return await future
    # The bound as this process could run (a stall is not the store's fault).
    deadline = Deadline(asyncio.get_running_loop(), bound, future.cancel)
    try:
        return await future
    except asyncio.CancelledError:
        caller = asyncio.current_task()
        if not deadline.fired or (caller is not None and caller.cancelling()):
            raise  # the caller was cancelled (perhaps in the same turn the bound passed)
        health.failed("an audit commit ran past BROKER_AUDIT_TIMEOUT")
        raise AuditStoreUnavailableError(
            "the audit event was not committed within BROKER_AUDIT_TIMEOUT"
        ) from None
    finally:
        deadline.cancel()


class ChainCommitter:
    """Appends batches of events to the chain on one DB-API connection of its own.

    The commit half of a writer, used from one thread at a time: the writer thread of
    ``AuditWriter`` (and the event loop's, for an inline commit), or the loop of the audit
    hub that all workers of one ``broker serve`` share (``services.audit_hub``).
    """

    def __init__(self, database: Database, keyring: Keyring) -> None:
        self._database = database
        self._keyring = keyring
        self._engine: Engine | None = None
        self._raw: PoolProxiedConnection | None = None
        self._sqlite = database.sqlite_file is not None
        self._sql: ChainStatements | None = None
        self._lock_file: int | None = None
        self._busy_ms = busy_timeout_ms(database.timeout)
        self._watchdog = (
            _Watchdog(database.timeout)
            if database.timeout is not None and not self._sqlite
            else None
        )
        self._unavailable: tuple[type[BaseException], ...] = ()

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
        self._engine = self._database.blocking(bounded=True)
        self._sql = chain_statements(self._engine.dialect)
        dbapi = self._engine.dialect.loaded_dbapi
        self._unavailable = (dbapi.OperationalError, dbapi.InterfaceError, AuditWriteError)
        path = self._database.sqlite_file
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
        if self._watchdog is not None:
            self._watchdog.stop()

    def commit(
        self,
        events: Sequence[AuditEvent | Prepared],
        *,
        wait: bool = True,
        observe: Callable[[float, int], None] | None = None,
    ) -> list[int | BaseException]:
        """Commit ``events`` in one transaction; per event, its seq or the error.

        If the transaction fails, the events are committed one by one, so one bad event
        cannot sink the others; but not when the store itself failed or ran past the bound
        (each retry would wait as long again): then every event gets an
        ``AuditStoreUnavailableError``, which writers keep completions for. With ``wait`` False,
        raise ``WriteLockBusy`` instead of waiting for the database's write lock (see
        ``AuditWriter._commit_inline``), and fail the whole batch rather than retry it event
        by event. ``observe`` is called with the seconds and the size of a successful commit.
        """
        if not events:
            return []
        started = time.perf_counter()
        try:
            seqs: list[int | BaseException] = list(self._append(events, wait=wait))
        except WriteLockBusy:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means "not durable"
            unavailable = isinstance(exc, self._unavailable) or (
                self._watchdog is not None and self._watchdog.fired
            )
            if len(events) == 1 or not wait or unavailable:
                # (Without ``wait`` no retry: one by one, a retry could wait for the lock.)
                logger.error("audit store unavailable: %s", type(exc).__name__)  # noqa: TRY400
                if unavailable:
                    exc = AuditStoreUnavailableError("the audit store failed")
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
            # (SQLite: WAL, full fsync, driver transaction control off; PostgreSQL: the
            # bounds of storage.database, connect_timeout among them).
            self._raw = engine.raw_connection()
        raw = self._raw
        # Prepared before the lock, which is held only to link and insert.
        ready = [e if isinstance(e, Prepared) else prepare(statements, [e])[0] for e in events]
        watchdog = self._watchdog
        with self._locked(wait=wait):
            if self._sqlite:
                self._begin_immediate(raw, wait=wait)
            if watchdog is not None:
                watchdog.arm(raw.dbapi_connection.fileno())  # type: ignore[union-attr]
            try:
                # Signed under the primary of this moment: a reloaded keyring signs anew.
                seqs = append_raw(raw, statements, ChainKey(*self._keyring.chain_key()), ready)
                raw.commit()
            except BaseException:
                # The connection's state is unknown: drop it, connect afresh next time.
                if watchdog is not None:
                    watchdog.disarm()
                with contextlib.suppress(Exception):
                    raw.rollback()
                with contextlib.suppress(Exception):
                    raw.invalidate()
                self._raw = None
                raise
            if watchdog is not None:
                watchdog.disarm()
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
                    cursor.execute(f"PRAGMA busy_timeout={self._busy_ms}")
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
    """The process's audit writer: batches on the event loop, commits there or in its thread."""

    def __init__(
        self,
        database: Database,
        keyring: Keyring,
        *,
        completion_delay: float = 0.02,
        max_batch: int = 1000,
        observe: Callable[[float, int], None] | None = None,
        retained: int = 10_000,
    ) -> None:
        self._committer = ChainCommitter(database, keyring)
        self._completion_delay = completion_delay
        self._max_batch = max_batch
        self.observe = observe
        self._on_loop = database.sqlite_file is not None
        # How long a request waits for its event (BROKER_AUDIT_TIMEOUT): never longer.
        self._timeout = database.timeout
        self._retained_limit = retained
        self.health = AuditHealth()
        self._batches: GroupCommit[_Item] | None = None  # made on the first event's loop
        self._retained: Retained[_Item] | None = None
        # Batches the loop could not commit itself, for the thread.
        self._handed: deque[list[_Item]] = deque()
        self._cond = threading.Condition(threading.Lock())
        # Held while a batch is committed, by the thread or the loop: one connection, one user.
        self._busy = threading.Lock()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # Event-loop side ------------------------------------------------------------------------

    async def write(
        self,
        event: AuditEvent,
        *,
        abandoned: Callable[[int], AuditEvent] | None = None,
        alone: bool = False,  # noqa: ARG002 - every batch is committed on the loop if it can be
    ) -> int:
        """Commit ``event`` and return its seq; raise ``AuditWriteError`` if it cannot be.

        ``abandoned(seq)`` is written in turn if the caller is cancelled while waiting and the
        event was committed anyway, so the log says why the call went no further.
        """
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue().put(_Item(event, future, abandoned), waited=True)
        return await bounded_wait(future, self._timeout, self.health)

    def write_later(self, event: AuditEvent) -> None:
        """Queue ``event`` for the next commit; nobody waits for it."""
        self._queue().put(_Item(event, None), waited=False)

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed (or has failed)."""
        if self._batches is None and self._thread is None:
            return
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue().put(_Item(None, future), waited=True)
        with contextlib.suppress(AuditWriteError):
            await future

    async def aclose(self) -> None:
        """Commit what is queued (and what was kept) and stop the thread."""
        if self._batches is not None and not self._closing:
            if self._retained is not None:
                self._batches.put_back(self._retained.take())
            self._batches.flush_now()
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._committer.close()

    @property
    def completions_retained(self) -> int:
        """Completions kept because the store was down, not yet committed."""
        return 0 if self._retained is None else len(self._retained)

    @property
    def completions_dropped(self) -> int:
        """Completions dropped because too many were kept: their calls stay pending."""
        return 0 if self._retained is None else self._retained.dropped

    def _queue(self) -> GroupCommit[_Item]:
        if self._closing:
            raise AuditWriteError("the audit writer is closed")
        if self._batches is None:
            self._committer.open()
            self._batches = GroupCommit(
                self._flush, completion_delay=self._completion_delay, max_batch=self._max_batch
            )
            self._retained = Retained(self._batches, self._retained_limit)
            self._loop = asyncio.get_running_loop()
        return self._batches

    def _flush(self, batch: list[_Item]) -> None:
        """Commit ``batch`` here if the loop may, else hand it to the thread."""
        if self._on_loop and not self._handed and self._busy.acquire(blocking=False):
            try:
                results = self._commit(batch, wait=False)
            except WriteLockBusy:
                results = None
            finally:
                self._busy.release()
            # A failed batch goes to the thread, which retries it event by event.
            if results is not None and not any(isinstance(r, BaseException) for r in results):
                self._settle(list(zip(batch, results, strict=True)))
                self._succeeded()
                return
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
            self._handed.append(batch)
            self._cond.notify()

    # Writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._handed and not self._closing:
                    self._cond.wait()
                if not self._handed:
                    return
                batch = self._take_handed()
            with self._busy:
                self.health.committing_since = time.monotonic()
                try:
                    results = self._commit(batch)
                finally:
                    self.health.committing_since = None
            self._resolve(batch, results)

    def _take_handed(self) -> list[_Item]:
        """Every batch handed so far, as one (at most ``max_batch`` events), in order.

        While a commit runs, the loop goes on and hands a batch each turn, often of one or
        two events; committed one by one they would each cost a transaction and an fsync
        (at 32 connections, 2.4 events per commit and 0.9 ms each, the thread became the
        bottleneck). Held: ``_cond``.
        """
        batch = self._handed.popleft()
        while self._handed and len(batch) + len(self._handed[0]) <= self._max_batch:
            batch.extend(self._handed.popleft())
        return batch

    def _commit(self, batch: list[_Item], *, wait: bool = True) -> list[int | BaseException]:
        events = [item.event for item in batch if item.event is not None]
        results = iter(self._committer.commit(events, wait=wait, observe=self.observe))
        return [next(results) if item.event is not None else 0 for item in batch]

    def _resolve(self, batch: list[_Item], results: list[int | BaseException]) -> None:
        """From the thread: settle the waiters on their loops, keep lost completions."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Item, int | BaseException]]] = {}
        lost: list[_Item] = []
        for item, result in zip(batch, results, strict=True):
            if item.future is not None:
                by_loop.setdefault(item.future.get_loop(), []).append((item, result))
            elif isinstance(result, AuditStoreUnavailableError) and item.event is not None:
                lost.append(item)
        failed = any(isinstance(result, BaseException) for result in results)
        if failed:
            self.health.failed("the last audit commit failed")
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                if lost:
                    loop.call_soon_threadsafe(self._keep, lost)
                elif not failed and results:
                    loop.call_soon_threadsafe(self._succeeded)
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(self._settle, outcomes)

    def _keep(self, lost: list[_Item]) -> None:
        if self._retained is not None and not self._closing:
            self._retained.keep(lost)

    def _succeeded(self) -> None:
        self.health.succeeded()
        if self._retained is not None:
            self._retained.succeeded()

    def _settle(self, outcomes: list[tuple[_Item, int | BaseException]]) -> None:
        """On the event loop: hand each waiter its seq or the failure."""
        for item, result in outcomes:
            future = item.future
            if future is None:
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
