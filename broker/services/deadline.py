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
    from collections.abc import Coroutine

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


async def settled(future: asyncio.Future[Any], seconds: float) -> bool:
    """Whether ``future`` is done within ``seconds`` of time this process could run.

    It is neither cancelled nor awaited past that (the caller decides); see the module's
    docstring for the time a stalled process lost.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    done, _pending = await asyncio.wait({future}, timeout=seconds)
    if done:
        return True
    late = loop.time() - deadline
    if late >= STALL:
        done, _pending = await asyncio.wait({future}, timeout=min(late, seconds))
    return bool(done)
