"""The security console's sessions and the reads and checks behind its views.

Signing in takes an ``auditor`` or ``admin`` key once and opens a server-side session: the
browser holds a random session id in an HttpOnly cookie, the database only its keyed hash.
Every request re-reads the session and its admin key, so an idle session, one past its
lifetime and one whose key was revoked all end at once. A state-changing form must carry the
session's CSRF token (an HMAC of the session id, so it is never stored); an ``auditor``
session can change nothing. Sign-ins, refused sign-ins, sign-outs, refused forms and the
console's own actions are audit events; the changes themselves go through the management
service and are audited as the management API's are.

Contract: docs/interfaces.md#security-console.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, NoReturn

from broker.audit_filter import AuditFilter
from broker.core.request_limits import KeyedBuckets
from broker.core.tokens import SecretKind, check_secret
from broker.errors import MalformedSecretError
from broker.services.audit import add_events, admin_event
from broker.services.management import Actor
from broker.storage import admin_keys, audit_events
from broker.storage import console as store
from broker.storage.models import utcnow

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.config import Settings
    from broker.core.audit_chain import AuditEvent, Checkpoint, Head
    from broker.keyring import Keyring
    from broker.services.audit import AuditService, VerifyReport
    from broker.storage.console import EventInChain

SIGN_IN: Final = "console.sign_in"
SIGN_OUT: Final = "console.sign_out"
VERIFY: Final = "console.verify"
CSRF: Final = "console.csrf"

SIGN_IN_RATE: Final = 0.2
"""Sign-in attempts a second one source address may make once its burst is spent."""
SIGN_IN_BURST: Final = 10.0
TOUCH_EVERY: Final = timedelta(seconds=15)
"""A session's idle clock moves at most this often (one write per page view is plenty)."""
_CSRF_LABEL: Final = b"broker-console-csrf"


class SignInRefusedError(Exception):
    """A sign-in the console refused, already audited: why (a reason) and the status."""

    def __init__(
        self, reason: str, status: int, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    """A signed-in browser, as one request sees it."""

    id_hash: str
    key_id: str
    role: str
    csrf_token: str
    expires_at: datetime

    @property
    def actor(self) -> Actor:
        """Who the console's actions are made as: the admin key signed in with."""
        return Actor(key_id=self.key_id, role=self.role)

    @property
    def can_change(self) -> bool:
        """Only ``admin`` sessions change anything."""
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class SignedIn:
    """A new session: the cookie value (shown to nobody but the browser) and the session."""

    cookie: str
    session: ConsoleSession


def csrf_token(session_id: str) -> str:
    """The CSRF token of a session: derived from its id, so neither is stored."""
    return hmac.new(session_id.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def same_token(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a submitted token with the expected one."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class ConsoleService:
    """Sessions of the security console, and what its views read."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        keyring: Keyring,
        settings: Settings,
        audit: AuditService,
        *,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._keyring = keyring
        self._audit = audit
        self._idle = timedelta(seconds=settings.console_idle_timeout)
        self._lifetime = timedelta(seconds=settings.console_session_lifetime)
        self._clock = clock
        self._monotonic = monotonic
        self._attempts = KeyedBuckets(SIGN_IN_RATE, burst=SIGN_IN_BURST)

    # Sessions ------------------------------------------------------------------------------

    async def sign_in(
        self, key_text: str, facts: Mapping[str, Any], *, previous: str | None = None
    ) -> SignedIn:
        """Open a session for a valid admin key; else ``SignInRefusedError`` (audited).

        Attempts are limited per source address before the key is even looked at, so the
        page cannot be used to guess keys quickly; a refusal never names the key. A session
        the browser already had (``previous``, its cookie) ends: a sign-in always starts a
        new session id.
        """
        source = str(facts.get("source_ip") or "")
        wait = self._attempts.take(source, self._monotonic())
        if wait is not None:
            self._audit.record_later(
                admin_event(**facts, action=SIGN_IN, decision="deny", reason="sign_in_rate_limited")
            )
            raise SignInRefusedError(
                "sign_in_rate_limited", 429, "too many sign-in attempts; wait", retry_after=wait
            )
        try:
            value = check_secret(key_text.strip(), SecretKind.ADMIN_KEY)
        except MalformedSecretError:
            await self._refuse_sign_in(facts, "malformed_admin_key")
        async with self._sessions() as session:
            key = await admin_keys.find_by_hash(
                session, self._keyring.secret_hash_candidates(value)
            )
        if key is None:
            await self._refuse_sign_in(facts, "unknown_admin_key")
        if key.revoked_at is not None:
            await self._refuse_sign_in(facts, "revoked_admin_key", key.id)
        now = self._clock()
        session_id = secrets.token_urlsafe(32)
        id_hash = self._keyring.hash_secret(session_id)
        expires_at = now + self._lifetime
        async with self._sessions.begin() as session:
            await store.end_stale_sessions(session, idle_before=now - self._idle, now=now)
            if previous:
                await store.end_sessions(session, self._keyring.secret_hash_candidates(previous))
            await store.add_session(
                session,
                id_hash=id_hash,
                admin_key_id=key.id,
                at=now,
                expires_at=expires_at,
                source_ip=facts.get("source_ip"),
            )
            await self._record(
                session,
                admin_event(
                    **facts,
                    action=SIGN_IN,
                    actor_key_id=key.id,
                    details={"role": key.role, "expires_at": expires_at.isoformat()},
                ),
            )
        return SignedIn(
            cookie=session_id,
            session=ConsoleSession(id_hash, key.id, key.role, csrf_token(session_id), expires_at),
        )

    async def _refuse_sign_in(
        self, facts: Mapping[str, Any], reason: str, key_id: str | None = None
    ) -> NoReturn:
        await self._audit.record(
            admin_event(
                **facts,
                action=SIGN_IN,
                decision="deny",
                reason=reason,
                status=401,
                actor_key_id=key_id,
            )
        )
        raise SignInRefusedError(reason, 401, "that key does not open the console")

    async def session(self, cookie: str | None, *, touch: bool = True) -> ConsoleSession | None:
        """The live session this cookie names, or None (and the session ended) if it is not.

        ``touch`` moves the idle clock: page views do, the live tail's polling does not, so
        an unattended tab still times out.
        """
        if not cookie:
            return None
        now = self._clock()
        async with self._sessions.begin() as session:
            found = await store.find_session(session, self._keyring.secret_hash_candidates(cookie))
            if found is None:
                return None
            if (
                found.key_revoked
                or now >= found.expires_at
                or now - found.last_seen_at >= self._idle
            ):
                await store.end_session(session, found.id_hash)
                return None
            if touch and now - found.last_seen_at >= TOUCH_EVERY:
                await store.touch_session(session, found.id_hash, now)
        return ConsoleSession(
            found.id_hash, found.admin_key_id, found.role, csrf_token(cookie), found.expires_at
        )

    async def sign_out(self, current: ConsoleSession, facts: Mapping[str, Any]) -> None:
        """End the session, recorded."""
        async with self._sessions.begin() as session:
            await store.end_session(session, current.id_hash)
            await self._record(
                session, admin_event(**facts, action=SIGN_OUT, actor_key_id=current.key_id)
            )

    async def refuse_form(
        self, facts: Mapping[str, Any], current: ConsoleSession | None, *, csrf: bool
    ) -> None:
        """Record a refused form: a missing or wrong CSRF token, or an auditor's change."""
        key_id = None if current is None else current.key_id
        if csrf:
            event = admin_event(
                **facts,
                action=CSRF,
                decision="deny",
                reason="csrf_token_invalid",
                status=403,
                actor_key_id=key_id,
            )
        else:
            # The same event an auditor key gets from the management API.
            event = admin_event(
                **facts,
                action="admin_key.authorize",
                decision="deny",
                reason="read_only_key",
                status=403,
                actor_key_id=key_id,
            )
        await self._audit.record(event)

    async def _record(self, session: AsyncSession, event: AuditEvent) -> None:
        await add_events(session, self._keyring, event)

    # Integrity -----------------------------------------------------------------------------

    async def verify(self, current: ConsoleSession, facts: Mapping[str, Any]) -> VerifyReport:
        """Verify the chain now; the finding is recorded as a ``console.verify`` event."""
        report = await asyncio.to_thread(self._audit.verify)
        details: dict[str, Any] = {
            "ok": report.ok,
            "checked": report.checked,
            "head": report.head,
            "problem": report.problem,
            "incomplete": report.incomplete,
        }
        await self._audit.record_admin(VERIFY, facts, actor_key_id=current.key_id, details=details)
        return report

    async def last_verify(self) -> dict[str, Any] | None:
        """The newest ``console.verify`` event (its details hold the finding), if any."""
        events, _ = await self._audit.query(
            AuditFilter.model_validate({"action": VERIFY}), cursor=None, limit=1
        )
        return events[0] if events else None

    async def head_and_checkpoints(self) -> tuple[Head | None, list[Checkpoint]]:
        """The signed head to copy out, and the retention checkpoints."""
        async with self._sessions() as session:
            return await store.head_and_checkpoints(session)

    # Reads ---------------------------------------------------------------------------------

    async def event(self, seq: int) -> EventInChain | None:
        """One event and its place in the chain."""
        await self._audit.flush()
        async with self._sessions() as session:
            return await store.event_in_chain(session, seq)

    async def tail(
        self, selection: AuditFilter, after: int, *, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Selected calls after seq ``after``, oldest first."""
        await self._audit.flush()
        async with self._sessions() as session:
            return await store.newer_than(session, selection, after, limit=limit)

    async def recent(self, selection: AuditFilter, limit: int) -> list[dict[str, Any]]:
        """The newest selected calls (for the clients page's recent admin actions)."""
        async with self._sessions() as session:
            events, _ = await audit_events.page(session, selection, before=None, limit=limit)
        return events

    async def activity(self, hours: int, names: Mapping[str, str]) -> dict[str, Any]:
        """Calls, refusals and Canvas capacity spent over the last ``hours``, in 48 buckets.

        ``names`` maps client ids to names for the chart's legend.
        """
        width = max(60, hours * 3600 // BUCKETS)
        now = self._clock()
        first = int(now.timestamp()) // width * width - (BUCKETS - 1) * width
        since = datetime.fromtimestamp(first, UTC)
        await self._audit.flush()
        async with self._sessions() as session:
            rows = await store.activity(session, since=since, bucket_seconds=width)
        starts = [first + i * width for i in range(BUCKETS)]
        index = {start: i for i, start in enumerate(starts)}
        calls: dict[str, list[int]] = {}
        costs: dict[str, list[float]] = {}
        refusals: dict[str, list[int]] = {}
        per_client: dict[str, dict[str, Any]] = {}
        for row in rows:
            at = index.get(row.bucket)
            if at is None:
                continue
            client = row.client_id or "(no client)"
            calls.setdefault(client, [0] * BUCKETS)[at] += row.calls
            if row.canvas_cost:
                spent = costs.setdefault(client, [0.0] * BUCKETS)
                spent[at] = round(spent[at] + row.canvas_cost, 3)
            totals = per_client.setdefault(
                client,
                {
                    "client_id": row.client_id,
                    "name": names.get(row.client_id or "", client),
                    "calls": 0,
                    "refused": 0,
                    "canvas_cost": 0.0,
                },
            )
            totals["calls"] += row.calls
            totals["canvas_cost"] = round(totals["canvas_cost"] + row.canvas_cost, 3)
            if row.decision == "deny":
                totals["refused"] += row.calls
                reason = row.reason or "unknown"
                refusals.setdefault(reason, [0] * BUCKETS)[at] += row.calls
        return {
            "since": since.isoformat(),
            "bucket_seconds": width,
            "buckets": [datetime.fromtimestamp(s, UTC).isoformat() for s in starts],
            "calls_per_client": {
                names.get(client, client): series for client, series in sorted(calls.items())
            },
            "refusals_per_reason": dict(sorted(refusals.items())),
            "canvas_cost_per_client": {
                names.get(client, client): series for client, series in sorted(costs.items())
            },
            "clients": sorted(per_client.values(), key=lambda c: (-c["calls"], c["name"])),
        }


BUCKETS: Final = 48
"""Points on the activity charts' time axis."""
