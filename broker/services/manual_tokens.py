"""Manual tokens with a lifecycle: their Canvas record, regeneration, and a rotation schedule.

Contract: docs/interfaces.md#manual-tokens-with-a-lifecycle. A manual token is one a Canvas
user generated (Account > Settings > New Access Token). Canvas's Access Tokens API
(canvas-lms app/controllers/tokens_controller.rb) shows such a token to its own user at
``GET /api/v1/users/self/tokens/:id``, where ``:id`` may be the token's *hint*, its first
``HINT_LENGTH`` characters (app/models/access_token.rb: ``token_hint = new_token[0, 5]``); the
record carries the token's ``id``, ``expires_at`` and ``purpose``. ``PUT`` on the same path with
``token[regenerate]=1`` gives the token a new value, returned once as ``visible_token``; the old
value stops working at once.

The broker reads the record when a manual token is stored, so its expiry shows
(``token_expires_at``, the expiry warnings, the ``broker_credential_token_expires_seconds``
gauge) and an expired token is refused before anything is sent (``503 credential_expired``).
It regenerates a token on request (``broker credentials rotate NAME --regenerate``) and, for a
credential with ``rotate_every``, on a schedule: once across every process and replica, under
a lease taken with one conditional UPDATE. A call racing a regeneration is sent once more with
the new token (``services.proxy``, ``renewed_token``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlencode

from sqlalchemy.exc import SQLAlchemyError

from broker.errors import (
    BrokerError,
    ConflictError,
    DecryptionError,
    UpstreamError,
    ValidationFailedError,
)
from broker.requestid import current_request_facts, current_request_id
from broker.services import renewal
from broker.services.audit import add_events, admin_event
from broker.services.revocation import bump_revocation_epoch
from broker.services.tokens import WORKER_TOKEN_PURPOSE
from broker.storage import credentials, upstreams
from broker.storage.credentials import SealedToken, TokenRecord
from broker.storage.models import MANUAL, utcnow

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.domain import WorkerCredential
    from broker.keyring import Keyring
    from broker.services.revocation import CacheEpoch
    from broker.upstream import Forwarder

logger = logging.getLogger(__name__)

TOKENS_PATH: Final = "/api/v1/users/self/tokens/"
HINT_LENGTH: Final = 5
"""``AccessToken::TOKEN_HINT_LENGTH`` (canvas-lms): the hint is the token's first 5 characters."""

EXPIRY_WARNING: Final = timedelta(days=14)
"""A manual token expiring within this long is flagged in ``credentials list``/``get``."""

MIN_ROTATE_EVERY: Final = 3600
"""The shortest rotation schedule, in seconds (one hour)."""

MAX_ROTATE_EVERY: Final = 10 * 365 * 86400

LEASE: Final = timedelta(seconds=60)
"""How long a regeneration may hold the rotation lease (it normally takes one Canvas call)."""

RETRY_AFTER_FAILURE: Final = timedelta(minutes=15)
"""When a scheduled regeneration failed, try again this much later."""

_MAX_PURPOSE = 255
_REGENERATE_HINTS: Final[dict[int, str]] = {
    HTTPStatus.UNAUTHORIZED: ": the token is rejected, or may not manage its own tokens",
    HTTPStatus.NOT_FOUND: ": Canvas has no such token of this user",
    HTTPStatus.BAD_REQUEST: ": an expired token needs a new one from Canvas",
}
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SHORT = re.compile(r"([0-9]+)\s*([smhdw])", re.IGNORECASE)
_ISO = re.compile(
    r"P(?:(?P<w>[0-9]+)W)?(?:(?P<d>[0-9]+)D)?"
    r"(?:T(?:(?P<h>[0-9]+)H)?(?:(?P<m>[0-9]+)M)?(?:(?P<s>[0-9]+)S)?)?",
    re.IGNORECASE,
)


class CanvasRegenerateError(BrokerError):
    """Canvas did not regenerate the token (it refused, or could not be asked)."""

    status = 502
    error = "canvas_refused_regenerate"


def parse_rotate_every(value: int | str | None) -> int | None:
    """A rotation interval in seconds: an integer, ``30d``/``12h``/``90m``, or ISO ``P30D``.

    None clears the schedule. At least ``MIN_ROTATE_EVERY`` seconds.
    """
    if value is None:
        return None
    seconds: int | None = None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, int):
        seconds = value
    else:
        text = value.strip()
        if text.isdigit():
            seconds = int(text)
        elif (short := _SHORT.fullmatch(text)) is not None:
            seconds = int(short.group(1)) * _UNITS[short.group(2).lower()]
        elif text[:1] in {"P", "p"} and len(text) > 1 and (iso := _ISO.fullmatch(text)):
            parts = {k: int(v) for k, v in iso.groupdict().items() if v is not None}
            if parts:
                seconds = sum(n * _UNITS[unit] for unit, n in parts.items())
    if seconds is None:
        raise ValidationFailedError(
            "rotate_every", "give seconds, a duration like 30d, 12h or 90m, or ISO 8601 (P30D)"
        )
    if not MIN_ROTATE_EVERY <= seconds <= MAX_ROTATE_EVERY:
        raise ValidationFailedError(
            "rotate_every", f"must be at least one hour ({MIN_ROTATE_EVERY} s) and at most 10 years"
        )
    return seconds


def expiry_warnings(credential: WorkerCredential, now: datetime) -> list[str]:
    """Warnings about a manual token that has expired or expires within ``EXPIRY_WARNING``."""
    expiry = credential.token_expires_at
    if credential.kind != MANUAL or expiry is None:
        return []
    how = f"rotate it (broker credentials rotate {credential.name} --regenerate)"
    left = expiry - now
    if left <= timedelta(0):
        return [
            (
                f"the token expired at Canvas at {expiry.isoformat()}: calls are refused with "
                f"503 credential_expired; store a new token (broker credentials rotate "
                f"{credential.name})"
            )
        ]
    if left > EXPIRY_WARNING:
        return []
    days = left.days
    when = (
        f"in {days} days"
        if days >= 2  # noqa: PLR2004
        else f"in {max(1, int(left.total_seconds() // 3600))} hours"
    )
    scheduled = (
        ""
        if credential.rotate_every is None
        else " (it is on a rotation schedule; regenerating keeps its expiry date)"
    )
    return [f"token expires {when} ({expiry.isoformat()}): {how}{scheduled}"]


def _headers(token: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"Authorization", b"Bearer " + token.encode("ascii")),
        (b"Accept", b"application/json"),
    ]


def _canvas_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _parse_record(body: bytes) -> tuple[TokenRecord, str | None] | None:
    """The token record and its ``visible_token`` from Canvas's Token JSON, or None."""
    try:
        payload: Any = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    token_id = payload.get("id")
    if isinstance(token_id, bool) or not isinstance(token_id, int | str) or token_id == "":
        return None
    purpose = payload.get("purpose")
    visible = payload.get("visible_token")
    record = TokenRecord(
        canvas_token_id=str(token_id)[:40],
        expires_at=_canvas_time(payload.get("expires_at")),
        purpose=purpose[:_MAX_PURPOSE] if isinstance(purpose, str) else None,
    )
    return record, visible if isinstance(visible, str) else None


async def _call(
    forwarder: Forwarder, method: str, url: str, token: str, body: bytes = b""
) -> tuple[int, bytes]:
    headers = _headers(token)
    if body:
        headers.append((b"Content-Type", b"application/x-www-form-urlencoded"))
    response = await forwarder.send(method, url, headers, body)
    try:
        return response.status, await response.read()
    finally:
        response.release()


async def read_record(forwarder: Forwarder, base_url: str, token: str) -> TokenRecord | str:
    """The token's record in Canvas's Access Tokens API, looked up by its hint.

    Returns why not (a sentence, never the token) when Canvas does not answer it: an older
    Canvas, a token whose user may not read its own tokens, or Canvas unreachable.
    """
    url = base_url + TOKENS_PATH + quote(token[:HINT_LENGTH], safe="")
    try:
        status, body = await _call(forwarder, "GET", url, token)
    except UpstreamError as exc:
        return f"Canvas's Access Tokens API did not answer ({exc})"
    parsed = _parse_record(body) if status == HTTPStatus.OK else None
    if parsed is None:
        return f"Canvas's Access Tokens API answered {status} without the token's record"
    return parsed[0]


def lookup_warning(why: str) -> str:
    """The create/rotate warning when the token's Canvas record could not be read."""
    return (
        f"the token was stored, but its expiry is unknown: {why}; the broker cannot warn "
        "before it expires nor regenerate it (--regenerate, --rotate-every)"
    )


def _canvas_message(body: bytes) -> str:
    """Canvas's error message, for a refusal's explanation (bounded; never a token)."""
    try:
        payload: Any = json.loads(body)
    except ValueError:
        return ""
    found: list[str] = []

    def walk(node: Any) -> None:  # noqa: ANN401 - JSON
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "message" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(payload)
    return "; ".join(found)[:200]


async def regenerate_at_canvas(
    forwarder: Forwarder, base_url: str, token: str, canvas_token_id: str
) -> tuple[str, TokenRecord]:
    """Ask Canvas to regenerate the token (authenticated by itself): the new value and record.

    Raises ``CanvasRegenerateError`` saying why when Canvas does not; the old token then works
    as before.
    """
    url = base_url + TOKENS_PATH + quote(canvas_token_id, safe="")
    form = urlencode({"token[regenerate]": "1"}).encode()
    try:
        status, body = await _call(forwarder, "PUT", url, token, form)
    except UpstreamError as exc:
        raise CanvasRegenerateError(
            f"could not regenerate the token: Canvas at {base_url} did not answer ({exc}); "
            "nothing changed"
        ) from exc
    parsed = _parse_record(body) if status == HTTPStatus.OK else None
    new_value = None if parsed is None else parsed[1]
    if parsed is None or new_value is None or new_value.endswith("..."):
        message = _canvas_message(body)
        explained = f" ({message})" if message else ""
        hint = _REGENERATE_HINTS.get(status, "")
        raise CanvasRegenerateError(
            f"Canvas did not regenerate the token: PUT {TOKENS_PATH}{canvas_token_id} answered "
            f"{status}{explained}{hint}; nothing changed"
        )
    return new_value, parsed[0]


class ManualTokenService:
    """Regeneration (on request and on schedule) of manual worker tokens."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        keyring: Keyring,
        epoch: CacheEpoch,
        forwarder: Forwarder,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._keyring = keyring
        self._epoch = epoch
        self._forwarder = forwarder
        self._clock = clock
        self._holder = renewal.holder_id()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the schedule again now (it changed)."""
        self._wake.set()

    async def regenerate(
        self, credential_id: str, *, actor_key_id: str | None, scheduled: bool = False
    ) -> WorkerCredential:
        """Regenerate the credential's token at Canvas and store the new value, audited.

        Holds the rotation lease throughout (a ``ConflictError`` if another process holds
        it); a scheduled regeneration takes it only when due. The new token is stored sealed in
        the same transaction as its audit event (``credential.rotate``, ``regenerated``),
        which also moves the revocation epoch, so every cached copy of the old one is dropped.
        """
        now = self._clock()
        async with self._sessions.begin() as session:
            current = await credentials.get(session, credential_id)
            if current.kind != MANUAL:
                raise ConflictError(
                    f"credential {current.name!r} is renewed through its developer key; "
                    "it holds no manual token to regenerate"
                )
            taken = await credentials.ROTATION_LEASE.take(
                session,
                current.id,
                holder=self._holder,
                now=now,
                until=now + LEASE,
                due_by=now if scheduled else None,
            )
        if not taken:
            raise ConflictError(
                f"credential {current.name!r} is being rotated by another process; try again "
                "in a minute"
            )
        try:
            return await self._regenerate_leased(current, actor_key_id, scheduled=scheduled)
        except BaseException as exc:
            error = exc.message if isinstance(exc, BrokerError) else type(exc).__name__
            with contextlib.suppress(SQLAlchemyError, OSError):
                async with self._sessions.begin() as session:
                    await credentials.release_rotation(
                        session,
                        current.id,
                        holder=self._holder,
                        error=error,
                        retry_at=now + RETRY_AFTER_FAILURE if scheduled else None,
                    )
            raise

    async def _regenerate_leased(
        self,
        current: WorkerCredential,
        actor_key_id: str | None,
        *,
        scheduled: bool,
    ) -> WorkerCredential:
        async with self._sessions() as session:
            sealed = await credentials.sealed_token(session, current.id)
            upstream = await upstreams.find(session, current.upstream_id)
        if sealed is None or upstream is None:
            raise ConflictError(f"credential {current.name!r} or its upstream is gone")
        try:
            token = self._open(sealed, current.id)
        except DecryptionError as exc:
            raise ConflictError(
                f"the token of credential {current.name!r} does not decrypt with this keyring"
            ) from exc
        canvas_token_id = current.canvas_token_id
        if canvas_token_id is None:
            found = await read_record(self._forwarder, upstream.base_url, token)
            if isinstance(found, str):
                raise CanvasRegenerateError(
                    f"cannot find the token's record to regenerate it: {found}; nothing changed"
                )
            canvas_token_id = found.canvas_token_id
            assert canvas_token_id is not None  # noqa: S101 - parsed records have an id
        new_value, record = await regenerate_at_canvas(
            self._forwarder, upstream.base_url, token, canvas_token_id
        )
        # Canvas has killed the old value: store the new one now, whatever else happens.
        async with self._sessions.begin() as session:
            credential = await credentials.replace_token(
                session,
                current.id,
                self._seal(new_value, current.id),
                last4=new_value[-4:],
                at=self._clock(),
                canvas_record=record,
            )
            await add_events(
                session,
                self._keyring,
                admin_event(
                    **current_request_facts(),
                    request_id=current_request_id(),
                    action="credential.rotate",
                    actor_key_id=actor_key_id,
                    credential_id=credential.id,
                    details={
                        "target": credential.id,
                        "changes": {
                            "token_last4": credential.token_last4,
                            "regenerated": True,
                            "scheduled": scheduled,
                            "canvas_token_id": credential.canvas_token_id,
                            "token_expires_at": _iso(credential.token_expires_at),
                            "rotate_due_at": _iso(credential.rotate_due_at),
                        },
                    },
                ),
            )
            await bump_revocation_epoch(session, self._epoch.bump)
        logger.info(
            "regenerated the token of credential %s%s", current.id, " (scheduled)" * scheduled
        )
        return credential

    async def renewed_token(self, credential_id: str, rejected: str) -> str | None:
        """The credential's stored token if it is newer than ``rejected``, else None.

        Canvas kills the old value the moment it regenerates, a moment before the rotating
        process has stored the new one: while a rotation lease is live, this waits for it
        (``renewal.newer_token``).
        """

        async def read() -> tuple[str | None, bool]:
            async with self._sessions() as session:
                # The lease before the token (renewal.newer_token says why).
                lease = credentials.ROTATION_LEASE
                leased = await lease.live(session, credential_id, self._clock())
                sealed = await credentials.sealed_token(session, credential_id)
            return (None if sealed is None else self._open(sealed, credential_id)), leased

        return await renewal.newer_token(read, rejected)

    # The rotation loop -------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Regenerate manual tokens on their schedule until ``stopping`` is set."""
        await renewal.run_loop(self.run_once, stopping, self._wake, "token rotation loop")

    async def run_once(self) -> float:
        """Regenerate what is due now (each once across processes); how long to sleep next."""
        async with self._sessions() as session:
            due = await credentials.rotation_due(session, self._clock())
        for credential_id in due:
            try:
                await self.regenerate(credential_id, actor_key_id=None, scheduled=True)
            except ConflictError:
                continue  # another process holds the lease, or has just rotated it
            except BrokerError as exc:
                logger.warning(
                    "scheduled rotation of credential %s failed: %s", credential_id, exc.message
                )
        async with self._sessions() as session:
            following = await credentials.next_rotation(session)
        return renewal.sleep_until(
            None if following is None else (following - self._clock()).total_seconds()
        )

    # Helpers -------------------------------------------------------------------------------

    def _seal(self, value: str, credential_id: str) -> SealedToken:
        return SealedToken(
            *self._keyring.encrypt(
                value.encode(), purpose=WORKER_TOKEN_PURPOSE, record_id=credential_id
            )
        )

    def _open(self, sealed: SealedToken, credential_id: str) -> str:
        return self._keyring.decrypt(
            sealed.key_id, sealed.ciphertext, purpose=WORKER_TOKEN_PURPOSE, record_id=credential_id
        ).decode()


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
