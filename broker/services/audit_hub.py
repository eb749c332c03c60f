"""One audit writer for all the worker processes of a ``broker serve`` (docs/audit.md#audit-hub).

With a writer per worker, every worker takes the database's write lock for its own small
group of events, and while one holds it (through a commit and its fsync, and any wait for its
own process's GIL) the others' requests wait. ``broker serve --workers N`` instead runs the
**audit hub** in its supervising process: a thread with its own event loop, listening on a Unix
socket in a private directory. In each worker a ``RemoteAuditWriter`` stands where the
``AuditWriter`` would: it makes each event canonical, sends what one turn of the worker's event
loop produced as one frame, and resolves the waiters when the hub answers with their seqs.
The hub commits everything that arrived since its last commit in one transaction, on its own
thread, and answers each worker with one frame. Groups stay as large as the whole server's
load makes them, and no worker ever holds the lock.

The guarantees are those of ``AuditWriter``: a request that waits for its event goes on only
after the event is durable; when the hub is unreachable, the connection drops or the commit
fails, the waiter gets ``AuditWriteError`` and the broker fails closed. Completions nobody
waits for ride with the next commit, or go after ``completion_delay``.

Frames are a 4-byte big-endian length and a ``marshal`` payload of plain values (worker to hub:
a list of ``(id, waited, content, values)``, ``content`` None for a flush marker; hub to worker:
``(commit seconds, events committed, [(id, seq)])``, seq -1 for a failure). Only the broker's own
user reaches the socket: its directory is private, the socket is 0600, and the hub checks each
peer's uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import marshal
import os
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Final, cast

from broker.errors import (
    AuditStoreUnavailableError,
    AuditWriteError,
    ConfigurationError,
    WriteLockBusy,
)
from broker.services.audit_writer import ChainCommitter, bounded_wait
from broker.services.group_commit import AuditHealth, GroupCommit, Retained
from broker.storage.audit_chain import Prepared, canonical_form, stored

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from broker.core.audit_chain import AuditEvent
    from broker.keyring import Keyring
    from broker.storage.database import Database

logger = logging.getLogger(__name__)

_LENGTH: Final = struct.Struct("!I")
MAX_FRAME: Final = 64 * 1024 * 1024
"""The largest frame either side accepts; a larger one is a broken peer and closes the link."""
FAILED: Final = -1
"""The seq the hub answers for an event it could not commit."""
_MAX_SOCKET_PATH: Final = 100  # sun_path holds 108 bytes on Linux, fewer elsewhere


def check_socket_path(path: Path) -> None:
    """Raise ``ConfigurationError`` if ``path`` is too long for a Unix socket address."""
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise ConfigurationError(
            "BROKER_AUDIT_SOCKET",
            f"is longer than {_MAX_SOCKET_PATH} bytes; set TMPDIR to a shorter directory",
        )


class _Frames:
    """Splits a byte stream into the payloads of length-prefixed frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data``; return the decoded payloads now complete. Raises ``ValueError``."""
        buffer = self._buffer
        buffer += data
        payloads = []
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if length > MAX_FRAME:
                raise ValueError("audit hub frame too large")
            end = start + _LENGTH.size + length
            if len(buffer) < end:
                break
            # Only the broker's own user can send (see the module docstring); marshal builds
            # plain values and runs no code.
            payloads.append(marshal.loads(buffer[start + _LENGTH.size : end]))  # noqa: S302
            start = end
        del buffer[:start]
        return payloads


_Message = tuple[int, bool, bytes | None, list[Any] | None]
"""A worker's message: its id, whether someone waits, the event's content and values."""
_Waiter = tuple["asyncio.Future[int]", "Callable[[int], AuditEvent] | None"]
MAX_MESSAGES: Final = 1000
"""The most events a worker sends in one frame."""


def _frame(payload: Any) -> bytes:  # noqa: ANN401 - any marshal-able value
    body = marshal.dumps(payload)
    return _LENGTH.pack(len(body)) + body


# The hub (supervising process) ----------------------------------------------------------------


class _Peer(asyncio.Protocol):
    """One worker's connection to the hub."""

    def __init__(self, hub: AuditHub) -> None:
        self._hub = hub
        self._frames = _Frames()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)  # a stream server's (uvloop's own type)
        sock = transport.get_extra_info("socket")
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", credentials)
        if uid != os.getuid():
            logger.warning("audit hub: refused a connection from uid %d", uid)
            transport.abort()
            return
        self.transport = transport
        self._hub.peers.add(self)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        self.transport = None
        self._hub.peers.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        try:
            for messages in self._frames.feed(data):
                self._hub.enqueue(self, messages)
        except (ValueError, TypeError, EOFError):
            logger.error("audit hub: a worker sent a malformed frame; closing its connection")  # noqa: TRY400
            self.transport.abort()
            self.transport = None

    def answer(self, seconds: float, events: int, results: list[tuple[int, int]]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame((seconds, events, results)))


class AuditHub:
    """Commits the audit events of every worker of one server, in one chain, from one thread."""

    def __init__(
        self,
        database: Database,
        keyring: Keyring,
        path: Path,
        *,
        completion_delay: float = 0.02,
        max_batch: int = 1000,
        retained: int = 10_000,
    ) -> None:
        check_socket_path(path)
        self.path = path
        self._committer = ChainCommitter(database, keyring)
        # (peer, id if someone waits for the answer else None, the event, a flush marker
        # (None) or why the event cannot be chained)
        self._batches: GroupCommit[tuple[_Peer, int | None, Prepared | ValueError | None]] = (
            GroupCommit(self._commit_batch, completion_delay=completion_delay, max_batch=max_batch)
        )
        # Completions whose commit failed, written again once the store is back.
        self._retained = Retained(self._batches, retained)
        self.peers: set[_Peer] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Listen on the socket (from a thread of its own); return once workers can connect."""
        self._committer.open()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="audit-hub", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout) or self._failure is not None:
            self.stop()
            raise RuntimeError("the audit hub did not start") from self._failure

    def stop(self, timeout: float = 30.0) -> None:
        """Commit what has arrived, close every connection and the socket, stop the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already finished
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._committer.close()

    def _run(self, ready: threading.Event) -> None:
        try:
            import uvloop  # noqa: PLC0415 - optional speed-up, as in the workers

            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        except ImportError:  # pragma: no cover - uvloop is a dependency
            factory = asyncio.new_event_loop
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(self._serve(ready))
        except BaseException as exc:
            self._failure = exc
            logger.exception("audit hub stopped")
        finally:
            ready.set()

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = await self._loop.create_unix_server(lambda: _Peer(self), path=str(self.path))
        self.path.chmod(0o600)
        ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            self._batches.put_back(self._retained.take())
            self._batches.flush_now()
            for peer in list(self.peers):
                if peer.transport is not None:
                    peer.transport.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def enqueue(self, peer: _Peer, messages: list[tuple[int, bool, bytes | None, Any]]) -> None:
        """Queue one frame's events; committed at the end of this turn if someone waits.

        Frames that arrive in the same turn of the hub's loop join the same batch.
        """
        statements = self._committer.statements
        for ident, wait, content, values in messages:
            event: Prepared | ValueError | None = None
            if content is not None:
                try:
                    event = stored(statements, content, list(values))
                except (ValueError, TypeError) as exc:
                    event = ValueError(str(exc))
            self._batches.put((peer, ident if wait else None, event), waited=bool(wait))

    def _commit_batch(
        self, batch: list[tuple[_Peer, int | None, Prepared | ValueError | None]]
    ) -> None:
        events = [event for _, _, event in batch if isinstance(event, Prepared)]
        started = time.perf_counter()
        results = iter(self._committer.commit(events))
        seconds = time.perf_counter() - started
        answers: dict[_Peer, list[tuple[int, int]]] = {}
        lost: list[tuple[_Peer, int | None, Prepared | ValueError | None]] = []
        for item in batch:
            peer, ident, event = item
            if isinstance(event, Prepared):
                result = next(results)
                seq = result if isinstance(result, int) else FAILED
                if ident is None and isinstance(result, AuditStoreUnavailableError):
                    lost.append(item)
            else:
                seq = 0 if event is None else FAILED
            if ident is not None:
                answers.setdefault(peer, []).append((ident, seq))
        if lost:
            self._retained.keep(lost)
        elif events:
            self._retained.succeeded()
        for peer, results_of_peer in answers.items():
            peer.answer(seconds, len(events), results_of_peer)


# The workers ----------------------------------------------------------------------------------


class _Link(asyncio.Protocol):
    """A worker's connection to the hub."""

    def __init__(self, writer: RemoteAuditWriter) -> None:
        self._writer = writer
        self._frames = _Frames()

    def data_received(self, data: bytes) -> None:
        try:
            for seconds, events, results in self._frames.feed(data):
                self._writer.answered(seconds, events, results)
        except (ValueError, TypeError, EOFError):
            logger.error("audit hub sent a malformed frame; reconnecting")  # noqa: TRY400
            self._writer.lost(self)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        self._writer.lost(self)


class RemoteAuditWriter:
    """Stands in for ``AuditWriter`` in a worker: the hub of ``broker serve`` commits.

    Messages are batched by the same policy as every writer (``GroupCommit``): what one turn
    of the worker's loop produced goes to the hub as one frame. Given the database
    (``database`` and ``keyring``) and on SQLite, a lone request's event is committed
    right here instead, as ``AuditWriter`` does: when the worker has no other request in
    progress and nothing waits for the hub, a round trip through the hub costs more than the
    commit. It never waits for the database's write lock; if the hub (or anyone) holds it,
    the event goes to the hub after all.
    """

    def __init__(
        self,
        path: Path,
        *,
        database: Database | None = None,
        keyring: Keyring | None = None,
        connect_timeout: float = 5.0,
        completion_delay: float = 0.02,
        retained: int = 10_000,
    ) -> None:
        self.observe: Callable[[float, int], None] | None = None
        self.health = AuditHealth()
        # How long a request waits for the hub's answer (BROKER_AUDIT_TIMEOUT): never longer.
        self._timeout = database.timeout if database is not None else None
        self._retained_limit = retained
        self._dropped = 0
        self._local: ChainCommitter | None = None
        if database is not None and keyring is not None and database.sqlite_file is not None:
            self._local = ChainCommitter(database, keyring)
        self._path = path
        self._connect_timeout = connect_timeout
        self._transport: asyncio.Transport | None = None
        self._link: _Link | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._batches: GroupCommit[_Message] = GroupCommit(
            self._send_batch, completion_delay=completion_delay, max_batch=MAX_MESSAGES
        )
        self._unsent: list[_Message] = []  # batches waiting for the connection
        self._waiters: dict[
            int, tuple[asyncio.Future[int], Callable[[int], AuditEvent] | None]
        ] = {}
        self._ids = itertools.count(1)
        self._closing = False

    async def write(
        self,
        event: AuditEvent,
        *,
        abandoned: Callable[[int], AuditEvent] | None = None,
        alone: bool = False,
    ) -> int:
        """Have ``event`` committed; return its seq or raise ``AuditWriteError``.

        ``abandoned`` is as for ``AuditWriter.write``; ``alone`` says the caller is the only
        request in progress in this worker (see the class docstring).
        """
        try:
            content, values = canonical_form(event)
        except ValueError as exc:
            raise AuditWriteError("the audit event could not be committed") from exc
        if alone and self._local is not None and not self._waiters and not self._closing:
            seq = self._commit_inline(self._local, content, values)
            if seq is not None:
                return seq
        return await self._waited(content, values, abandoned)

    def _commit_inline(
        self, local: ChainCommitter, content: bytes, values: list[Any]
    ) -> int | None:
        """Commit the event and the completions not yet sent here; None if the lock is taken.

        Nothing waits for the hub, so what is queued and unsent is completions only.
        """
        local.open()
        statements = local.statements
        queued = [*self._unsent, *self._batches.take()]
        events = [stored(statements, c, list(v)) for _, _, c, v in queued if c is not None and v]
        events.append(stored(statements, content, list(values)))
        try:
            results = local.commit(events, wait=False, observe=self.observe)
        except WriteLockBusy:
            self._unsent = []
            self._batches.put_back(queued)
            return None
        self._unsent = []
        result = results[-1]
        if isinstance(result, BaseException):
            raise AuditWriteError("the audit event could not be committed") from result
        return result

    def write_later(self, event: AuditEvent) -> None:
        """Queue ``event`` for the hub's next commit; nobody waits for it."""
        content, values = canonical_form(event)
        self._queue((next(self._ids), False, content, values))

    async def flush(self) -> None:
        """Wait until the hub has committed everything this worker sent before the call."""
        if (
            self._transport is None
            and not self._batches
            and not self._unsent
            and self._connecting is None
        ):
            return
        with contextlib.suppress(AuditWriteError):
            await self._waited(None, None, None)

    async def aclose(self) -> None:
        """Send what is queued, wait for it to be committed, close the connection."""
        await self.flush()
        self._closing = True
        if self._connecting is not None:
            self._connecting.cancel()
        self._batches.take()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._local is not None:
            self._local.close()

    async def _waited(
        self,
        content: bytes | None,
        values: list[Any] | None,
        abandoned: Callable[[int], AuditEvent] | None,
    ) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        ident = next(self._ids)
        self._queue((ident, True, content, values))
        self._waiters[ident] = (future, abandoned)
        return await bounded_wait(future, self._timeout, self.health)

    @property
    def completions_retained(self) -> int:
        """Completions kept for the hub while it cannot be reached."""
        return sum(1 for message in self._unsent if not message[1])

    @property
    def completions_dropped(self) -> int:
        """Completions dropped because too many were kept: their calls stay pending."""
        return self._dropped

    def _queue(self, message: _Message) -> None:
        """Queue a message: sent this turn if someone waits for it, else within the delay.

        Completions nobody waits for ride with the next event someone waits for (to the hub,
        or in a lone request's commit here), so a quiet worker does not wake the hub for
        each of them.
        """
        if self._closing:
            raise AuditWriteError("the audit writer is closed")
        self._batches.put(message, waited=message[1])

    def _send_batch(self, batch: list[_Message]) -> None:
        """One batch to the hub as one frame, connecting first if need be."""
        self._unsent.extend(batch)
        if self._transport is not None:
            self._send()
        elif self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def _send(self) -> None:
        if self._transport is None or not self._unsent:
            return
        unsent, self._unsent = self._unsent, []
        self._transport.write(_frame(unsent))

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, link = await loop.create_unix_connection(
                    lambda: _Link(self), str(self._path)
                )
        except Exception as exc:  # noqa: BLE001 - whatever the reason, nobody may wait on
            logger.error("audit hub unreachable: %s", type(exc).__name__)  # noqa: TRY400
            self._give_up()
            return
        finally:
            self._connecting = None
        self._transport, self._link = transport, link
        self._send()

    def answered(self, seconds: float, events: int, results: list[tuple[int, int]]) -> None:
        """On the event loop: the hub committed a batch holding some of this worker's events."""
        if self.observe is not None and events:
            self.observe(seconds, events)
        for ident, seq in results:
            waiter = self._waiters.pop(ident, None)
            if waiter is None:
                continue
            future, abandoned = waiter
            if future.done():
                # The request went away while waiting; if its event was chained, say so.
                if seq > 0 and abandoned is not None and not self._closing:
                    self.write_later(abandoned(seq))
            elif seq == FAILED:
                self.health.failed("the audit hub could not commit an event")
                future.set_exception(AuditWriteError("the audit event could not be committed"))
            else:
                self.health.succeeded()
                future.set_result(seq)

    def lost(self, link: _Link) -> None:
        """The connection to the hub ended: whoever still waits is refused."""
        if link is not self._link:
            return
        if self._transport is not None:
            self._transport.abort()
        self._transport = self._link = None
        if not self._closing:
            logger.error("audit hub connection lost")
        self._give_up()

    def _give_up(self) -> None:
        """Refuse every waiter: its event was lost in transit or cannot be sent now.

        An event someone waited for is never sent after its waiter was refused; completions
        nobody waits for stay queued for the next connection.
        """
        kept = [message for message in self._unsent if not message[1]]
        self._dropped += max(0, len(kept) - self._retained_limit)
        self._unsent = kept[: self._retained_limit]
        self.health.failed("the audit hub is unreachable")
        waiters, self._waiters = self._waiters, {}
        for future, _ in waiters.values():
            if not future.done():
                future.set_exception(AuditWriteError("the audit hub is unreachable"))
