"""Revocation reaching cached proxy tokens: immediate here, within 1 s elsewhere.

The proxy resolves bearer tokens from an in-process cache instead of a database round trip
per call. Every change that can make a cached token unusable (revoking tokens, disabling or
changing a client, credential or upstream) bumps the ``revocation_epoch`` counter in its own
transaction, and a cached token is used only while the *epoch value* it was cached under is
still current:

- the process that made the change replaces the value right after its commit;
- worker processes of one ``broker serve`` share the value through a small memory-mapped file,
  so they see the change on their very next request (a memory read per call, no syscall);
- every process polls the database counter every ``POLL_INTERVAL`` and replaces the value
  when the counter moves, so other replicas follow within a second. Given the database's
  URL, it polls from a thread of its own with a connection of its own, so an event loop
  crowded with requests cannot delay the poll (and switch the cache off when it is most
  needed); otherwise from a task on the event loop;
- if polling has not succeeded for ``STALE_AFTER``, the cache is not used at all: a process
  that cannot hear about revocations resolves every token from the database (and fails
  closed with it);
- when a poll sees the counter move, ``on_change`` runs too (the keyring's reload: a key
  rotation moves the counter, so every process takes on the new primary key within a poll).

Values are random, never reused, so a cache entry can never become valid again.
``bump_revocation_epoch`` is how a change moves the counter and, once it commits, this
host's value; SQLAlchemy session listeners here run (or, on rollback, drop) that last step.

Contract: docs/storage-and-keys.md#revocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import secrets
import threading
import time
from typing import TYPE_CHECKING, Final

from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from broker.storage import revocation_epoch

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.storage.database import Database

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.25
STALE_AFTER = 0.9
_SIZE = 8
_AFTER_COMMIT: Final = "broker_after_commit"


async def bump_revocation_epoch(session: AsyncSession, after_commit: Callable[[], None]) -> None:
    """Tell every replica to drop cached tokens once the caller's transaction commits.

    The counter changes in the same transaction; ``after_commit`` (usually
    ``CacheEpoch.bump``) tells this host's processes at once; other replicas poll the counter.
    A rollback drops ``after_commit`` unrun.
    """
    await revocation_epoch.bump(session)
    session.sync_session.info.setdefault(_AFTER_COMMIT, []).append(after_commit)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    for callback in session.info.pop(_AFTER_COMMIT, []):
        callback()


@event.listens_for(Session, "after_rollback")
def _drop_after_commit(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)


class CacheEpoch:
    """The current epoch value, shared with sibling processes through ``shared_file``."""

    def __init__(
        self,
        shared_file: Path | None = None,
        database: Database | None = None,
        on_change: Callable[[], object] | None = None,
    ) -> None:
        self._on_change = on_change
        self._map: mmap.mmap | None = None
        self._local = secrets.token_bytes(_SIZE)
        if shared_file is not None:
            fd = os.open(shared_file, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < _SIZE:
                    os.ftruncate(fd, _SIZE)
                self._map = mmap.mmap(fd, _SIZE)
            finally:
                os.close(fd)
        self._fresh_until = 0.0
        self._seen: int | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        self._database = database
        self._thread: threading.Thread | None = None
        self._thread_stopping = threading.Event()

    def current(self) -> bytes | None:
        """The value cache entries must carry to be used, or None while polling is stale."""
        if time.monotonic() > self._fresh_until:
            return None
        return self._map[:_SIZE] if self._map is not None else self._local

    def bump(self) -> None:
        """Make every cached token of this host stale (call after a revoking commit)."""
        value = secrets.token_bytes(_SIZE)
        if self._map is not None:
            self._map[:_SIZE] = value
        else:
            self._local = value

    def start(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Start polling the database counter, if not yet polling."""
        if self._database is not None:
            if self._thread is None or not self._thread.is_alive():
                self._thread_stopping.clear()
                self._thread = threading.Thread(
                    target=self._poll_thread, name="revocation-epoch-poller", daemon=True
                )
                self._thread.start()
            return
        if self._poller is None or self._poller.done():
            self._stopping = asyncio.Event()
            self._poller = asyncio.get_running_loop().create_task(
                self._poll(sessions, self._stopping), name="revocation-epoch-poller"
            )

    async def _poll(
        self, sessions: async_sessionmaker[AsyncSession], stopping: asyncio.Event
    ) -> None:
        while not stopping.is_set():
            started = time.monotonic()
            try:
                async with sessions() as session:
                    counter = await revocation_epoch.read(session)
            except (SQLAlchemyError, OSError):
                logger.warning("cannot read the revocation epoch; token cache off until it can")
            else:
                self._read(counter, started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), POLL_INTERVAL)

    def _poll_thread(self) -> None:
        assert self._database is not None  # noqa: S101 - started only with a database
        engine = self._database.blocking(bounded=True)
        try:
            while not self._thread_stopping.is_set():
                started = time.monotonic()
                try:
                    with engine.connect() as connection:
                        counter = revocation_epoch.read_sync(connection)
                except (SQLAlchemyError, OSError):
                    logger.warning("cannot read the revocation epoch; token cache off until it can")
                else:
                    self._read(counter, started)
                self._thread_stopping.wait(POLL_INTERVAL)
        finally:
            engine.dispose()

    def _read(self, counter: int | None, started: float) -> None:
        """The counter as read by a poll that began at ``started`` (monotonic seconds).

        No counter row means revocations cannot be counted: the cache stays off.
        """
        if counter is None:
            logger.warning(
                "the revocation epoch row is missing (run `broker init`); token cache off"
            )
            return
        if counter != self._seen:
            if self._seen is not None:
                self.bump()
                self._changed()
            self._seen = counter
        self._fresh_until = started + STALE_AFTER

    def _changed(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change()
        except Exception:  # the poller must outlive whatever the listener does
            logger.exception("the revocation epoch's listener failed")

    async def aclose(self) -> None:
        """Stop polling (letting a read in progress finish) and release the shared file."""
        if self._poller is not None and self._stopping is not None:
            self._stopping.set()
            await self._poller
            self._poller = None
        if self._thread is not None:
            self._thread_stopping.set()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._map is not None:
            self._map.close()
            self._map = None
