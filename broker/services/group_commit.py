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
