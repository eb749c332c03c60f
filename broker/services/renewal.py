"""What the two renewers of worker tokens share: their loop, and waiting for a renewed token.

The OAuth refresher (``services.worker_oauth``) and the manual-token rotation
(``services.manual_tokens``) each run one loop per process, taking a lease per credential so
the work happens once across processes (docs/interfaces.md#oauth-worker-credentials,
docs/interfaces.md#manual-tokens-with-a-lifecycle).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Final

from sqlalchemy.exc import SQLAlchemyError

from broker.errors import BrokerError, DecryptionError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

RENEWAL_WAIT: Final = 2.0
"""How long a call Canvas refused waits for a renewal in progress elsewhere (seconds)."""

MAX_SLEEP: Final = 30.0
"""The longest a loop sleeps between looks at what is due (seconds)."""
MIN_SLEEP: Final = 0.2


def holder_id() -> str:
    """The name this process puts on the leases it takes: host, pid and a random part."""
    return f"{os.uname().nodename[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


def sleep_until(due_in: float | None) -> float:
    """How long a loop sleeps when the next renewal is due in ``due_in`` seconds (or never)."""
    if due_in is None:
        return MAX_SLEEP
    return min(MAX_SLEEP, max(MIN_SLEEP, due_in))


async def run_loop(
    run_once: Callable[[], Awaitable[float]],
    stopping: asyncio.Event,
    wake: asyncio.Event,
    label: str,
) -> None:
    """Call ``run_once`` (which says how long to sleep) until ``stopping``; ``wake`` cuts a sleep.

    A store or Canvas fault is logged and the loop goes on after the longest sleep.
    """
    while not stopping.is_set():
        sleep = MAX_SLEEP
        try:
            sleep = await run_once()
        except (SQLAlchemyError, OSError, BrokerError) as exc:
            logger.warning("the %s could not run: %s", label, type(exc).__name__)
        wake.clear()
        waits = {asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(wake.wait())}
        _done, pending = await asyncio.wait(
            waits, timeout=sleep, return_when=asyncio.FIRST_COMPLETED
        )
        for waiting in pending:
            waiting.cancel()


async def newer_token(
    read: Callable[[], Awaitable[tuple[str | None, bool]]], rejected: str
) -> str | None:
    """The stored token if it differs from ``rejected``, else None.

    ``read`` answers the stored token and whether a renewal lease is live. Canvas kills the
    old token the moment it answers a renewal, a moment before the renewer has stored the new
    one: while a lease is live, this waits for it, at most ``RENEWAL_WAIT`` seconds.

    ``read`` must read the lease first, then the token. The renewer stores the token and
    releases the lease in one transaction, but on PostgreSQL (read committed) each statement
    sees the latest commit: read token first, a renewal committing between the two reads
    gives the old token with no lease, and the call is refused although the new token is
    stored. Read lease first, a lease seen released means the new token is there to read.
    """
    deadline = time.monotonic() + RENEWAL_WAIT
    while True:
        try:
            token, leased = await read()
        except (SQLAlchemyError, OSError, TimeoutError, DecryptionError):
            return None
        if token is not None and token != rejected:
            return token
        if not leased or time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.05)
