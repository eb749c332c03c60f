"""Waiting for a store at most a bound, without waiting for its clean-up as well.

Contract: docs/audit.md#under-faults. When a database stops answering, a statement fails at
its bound, and then the session's clean-up (a rollback over the silent connection, which
SQLAlchemy shields from cancellation) may wait as long again. ``within`` answers the caller at
the bound and lets the clean-up finish in the background.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Coroutine

T = TypeVar("T")


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
        done, _pending = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_consume)
        raise
    if not done:
        task.add_done_callback(_consume)
        raise TimeoutError
    return task.result()
