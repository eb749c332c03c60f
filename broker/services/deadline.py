"""Waiting for a store at most a bound, without waiting for its clean-up as well.

Contract: docs/audit.md#under-faults. When a database stops answering, a statement fails at
its bound, and then the session's clean-up (a rollback over the silent connection, which
SQLAlchemy shields from cancellation) may wait as long again. ``within`` answers the caller at
the bound and lets the clean-up finish in the background.

A bound counts the time this process could run. A process that could not (a paused virtual
machine, a stopped process, an event loop held by other work) wakes up late, with the bound
spent while neither it nor its own threads ran: a healthy lookup then lost the race to its
own timer and the call was refused ``503 token_store_unavailable``, the store never at fault.
So a wait that wakes at least ``STALL`` past its deadline waits once more for the time it
lost, at most one more bound; a store that does not answer while the process runs is still
refused at the bound (``tests/services/test_deadline.py``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

T = TypeVar("T")

STALL: Final = 0.1
"""Seconds past its deadline a wait must wake for the process to count as having stalled."""


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome, so its failure is not reported as unhandled."""
    if not task.cancelled():
        task.exception()


async def within(work: Coroutine[Any, Any, T], seconds: float | None) -> T:
    """The result of ``work``, or ``TimeoutError`` after ``seconds`` with ``work`` left running.

    ``seconds`` None waits as long as it takes. If the caller is cancelled, so is ``work``.
    """
    if seconds is None:
        return await work
    task = asyncio.ensure_future(work)
    try:
        finished = await settled(task, seconds)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_consume)
        raise
    if not finished:
        task.add_done_callback(_consume)
        raise TimeoutError
    return task.result()


class Deadline:
    """Calls ``expire`` once ``seconds`` of time this process could run have passed.

    The timer is due at the bound; if it runs at least ``STALL`` late, the process stalled
    and the timer is set once more for the time lost (at most one more bound). One timer
    handle and no task: it sits on the path of every proxied call (``bounded_wait``).
    """

    __slots__ = ("_deadline", "_expire", "_extended", "_handle", "_loop", "_seconds", "fired")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, seconds: float, expire: Callable[[], object]
    ) -> None:
        self._loop = loop
        self._seconds = seconds
        self._expire = expire
        self._extended = False
        self.fired = False
        """Whether ``expire`` was called."""
        self._deadline = loop.time() + seconds
        self._handle = loop.call_at(self._deadline, self._due)

    def cancel(self) -> None:
        """Never call ``expire`` (the wait is over)."""
        self._handle.cancel()

    def _due(self) -> None:
        late = self._loop.time() - self._deadline
        if late >= STALL and not self._extended:
            self._extended = True
            self._handle = self._loop.call_later(min(late, self._seconds), self._due)
            return
        self.fired = True
        self._expire()


async def settled(future: asyncio.Future[Any], seconds: float) -> bool:
    """Whether ``future`` is done within ``seconds`` of time this process could run.

    It is neither cancelled nor awaited past that (the caller decides); see ``Deadline``.
    """
    if future.done():
        return True
    waiter = asyncio.get_running_loop().create_future()

    def wake(_done: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    deadline = Deadline(asyncio.get_running_loop(), seconds, wake)
    try:
        await waiter
    finally:
        deadline.cancel()
        future.remove_done_callback(wake)
    return future.done()
