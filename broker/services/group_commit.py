"""When audit events go to be committed: the one batching policy of every audit writer.

``AuditWriter`` (one process), ``AuditHub`` (the supervisor of ``broker serve --workers N``)
and ``RemoteAuditWriter`` (each of its workers) all queue events on an event loop and hand
them on in batches; :class:`GroupCommit` decides when (docs/audit.md#group-commit):

- an event someone waits for (a pending event before its call is forwarded, a refusal before
  it is answered) is handed on at the end of the loop turn it arrived in, with everything
  queued by then, so the requests of one turn share one commit and one fsync;
- an event nobody waits for (a call's completion) waits up to ``completion_delay`` for such a
  batch to ride along with, then goes on its own;
- a batch holds at most ``max_batch`` events; what is left goes in the next, in order.

What "handing on" means is the writer's: commit on the loop's thread, hand to a thread that
may wait for the database's write lock, or send one frame to the hub.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Queues items on one event loop and hands them to ``flush`` in batches (see above).

    ``flush`` is called on the loop with each batch, in arrival order; it must not block for
    long (a write lock or a network round trip belongs to another thread).
    """

    def __init__(
        self,
        flush: Callable[[list[T]], None],
        *,
        completion_delay: float,
        max_batch: int,
    ) -> None:
        self._flush = flush
        self._delay = completion_delay
        self._max_batch = max_batch
        self._items: deque[tuple[T, bool]] = deque()
        self._waited = 0
        self._soon: asyncio.Handle | None = None  # a flush due at the end of this turn
        self._later: asyncio.TimerHandle | None = None  # a flush of completions only

    def __len__(self) -> int:
        return len(self._items)

    @property
    def waited(self) -> int:
        """How many queued items someone waits for."""
        return self._waited

    def put(self, item: T, *, waited: bool) -> None:
        """Queue ``item``; it goes this turn if someone waits for it, else within the delay."""
        self._items.append((item, waited))
        if waited:
            self._waited += 1
            self._due_now()
        elif self._soon is None and self._later is None:
            self._later = asyncio.get_running_loop().call_later(self._delay, self.flush_now)

    def put_back(self, items: list[T]) -> None:
        """Return items nobody waits for to the front of the queue (a failed hand-off)."""
        self._items.extendleft((item, False) for item in reversed(items))

    def take(self) -> list[T]:
        """Everything queued, in order (for a writer committing or closing by itself)."""
        items = [item for item, _ in self._items]
        self._items.clear()
        self._waited = 0
        self._cancel()
        return items

    def flush_now(self) -> None:
        """Hand on everything queued, batch by batch."""
        self._cancel()
        while self._items:
            count = min(len(self._items), self._max_batch)
            batch = []
            for _ in range(count):
                item, waited = self._items.popleft()
                self._waited -= waited
                batch.append(item)
            self._flush(batch)

    def _due_now(self) -> None:
        if self._soon is None:
            if self._later is not None:
                self._later.cancel()
                self._later = None
            self._soon = asyncio.get_running_loop().call_soon(self.flush_now)

    def _cancel(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        if self._later is not None:
            self._later.cancel()
            self._later = None


class Retained(Generic[T]):
    """Completions a commit lost, kept (at most ``limit``) and queued again with back-off.

    A completion nobody waits for records a call that has already been answered, so when the
    audit store is down it is not dropped: it is kept here and put back at the front of the
    writer's queue (``GroupCommit.put_back``), in order, after ``first`` seconds, then twice
    as long after each failure up to ``longest``, and at once after a commit succeeds. Beyond
    ``limit`` a completion is dropped and counted in ``dropped``; its call stays ``pending``
    in the log, which ``broker audit verify`` counts (docs/audit.md#under-faults).
    """

    def __init__(
        self,
        batches: GroupCommit[T],
        limit: int,
        *,
        first: float = 0.25,
        longest: float = 5.0,
    ) -> None:
        self._batches = batches
        self._limit = limit
        self._first = first
        self._longest = longest
        self._delay = first
        self._items: deque[T] = deque()
        self._retry: asyncio.Handle | None = None
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def keep(self, items: list[T]) -> None:
        """On the loop: keep ``items`` (in order) for a later commit, or count them dropped."""
        room = max(0, self._limit - len(self._items))
        self._items.extend(items[:room])
        self.dropped += len(items) - min(room, len(items))
        if self._items and self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(self._delay, self._put_back)
            self._delay = min(self._delay * 2, self._longest)

    def succeeded(self) -> None:
        """On the loop: a commit went through; what is kept goes again now."""
        self._delay = self._first
        if self._items and self._retry is not None:
            self._retry.cancel()
            self._retry = asyncio.get_running_loop().call_soon(self._put_back)

    def take(self) -> list[T]:
        """Everything kept, in order (for a writer closing)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        items = list(self._items)
        self._items.clear()
        return items

    def _put_back(self) -> None:
        self._retry = None
        self._batches.put_back(self.take())
        self._batches.flush_now()


class AuditHealth:
    """Whether this process's audit path works, as its commits and waits found it.

    ``failure`` says why from a failed or timed-out commit until the next one that succeeds
    (``since``: when, on the monotonic clock); ``committing_since`` is when the commit now in
    progress began. ``/readyz`` reports both (``services.readiness``). Plain attributes,
    set from the loop or the writer's thread alike.
    """

    def __init__(self) -> None:
        self.failure: str | None = None
        self.since = 0.0
        self.committing_since: float | None = None

    def failed(self, what: str) -> None:
        """A commit failed or a wait for one ran past the bound."""
        self.since = time.monotonic()
        self.failure = what

    def succeeded(self) -> None:
        """A commit went through."""
        self.failure = None
