"""Per-client rate limits: a token bucket per client, kept in the database.

Design. Every replica must see the same bucket (docs/deployment.md#what-replicas-share), so
the bucket is a row of ``rate_buckets`` and each call takes a token with one atomic upsert
(``storage.rate_buckets.take``)::

    INSERT INTO rate_buckets (client_id, tokens, updated_at) VALUES (:id, :burst - 1, :now)
    ON CONFLICT (client_id) DO UPDATE
        SET tokens = least(:burst, tokens + greatest(0, :now - updated_at) * :rate) - 1,
            updated_at = greatest(updated_at, :now)
        WHERE least(:burst, tokens + greatest(0, :now - updated_at) * :rate) >= 1
    RETURNING tokens

A returned row means the call was allowed; no row means the bucket is empty and nothing was
written. The database serialises concurrent upserts of one row, so two replicas can never
spend the same token. ``updated_at`` never moves backwards, so a replica whose clock lags
only refills late, it never refills twice.

The client's ``rate_limit`` and ``rate_burst`` come with the resolved token, which the proxy
caches; a ``PATCH`` of the client moves the revocation epoch, so the new limit applies on the
next call here and within a second on other replicas (``services.revocation``). A client
without a limit never touches the table. Only a refused call reads its bucket once more, to
compute ``Retry-After``.

Time is the process clock in epoch seconds (``clock``, replaceable in tests); replicas are
expected to keep their clocks in sync (NTP), and skew only shifts when tokens come back.

Every call whose token resolves spends a token, including calls refused later by the grant:
the limit bounds what a script may attempt, not only what reaches Canvas.

Contract: docs/proxy-rules.md#rate-limit.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from broker.errors import UnavailableError
from broker.storage import rate_buckets

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.domain import RateBucket

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RateDecision:
    """Whether a call may proceed and, if not, how many whole seconds to wait."""

    allowed: bool
    retry_after: int = 0


ALLOWED = RateDecision(allowed=True)


class RateLimitService:
    """Take one token from a client's bucket per proxied call."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], clock: Callable[[], float] = time.time
    ) -> None:
        self._sessions = sessions
        self.clock = clock

    async def take(self, client_id: str, rate_limit: float, rate_burst: int | None) -> RateDecision:
        """Spend one of the client's tokens, or say how long until one is back.

        Raises ``UnavailableError`` (503 ``rate_limit_unavailable``) if the database cannot
        answer: the call is refused, never let through.
        """
        rate = float(rate_limit)
        burst = float(rate_burst or default_burst(rate))
        try:
            now = self.clock()
            async with self._sessions.begin() as session:
                taken = await rate_buckets.take(session, client_id, rate=rate, burst=burst, now=now)
            if taken:
                return ALLOWED
            async with self._sessions() as session:
                bucket = await rate_buckets.find(session, client_id)
        except (SQLAlchemyError, OSError) as exc:
            logger.exception("rate limit store unavailable")
            raise UnavailableError(
                "the rate limit store is unavailable; nothing was forwarded",
                error="rate_limit_unavailable",
            ) from exc
        return RateDecision(allowed=False, retry_after=_retry_after(bucket, rate, burst, now))


def default_burst(rate: float) -> int:
    """The bucket size when none is given: one second's worth of calls, at least one."""
    return max(1, math.ceil(rate))


def _retry_after(bucket: RateBucket | None, rate: float, burst: float, now: float) -> int:
    """Whole seconds until the bucket holds one token again (at least 1)."""
    if bucket is None:  # pragma: no cover - a refused upsert means the row exists
        return 1
    tokens = min(burst, bucket.tokens + max(0.0, now - bucket.updated_at) * rate)
    return max(1, math.ceil((1 - tokens) / rate))
