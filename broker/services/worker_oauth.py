"""OAuth worker credentials: authorise once in a browser, then renew the access token forever.

Contract: docs/interfaces.md#oauth-worker-credentials. An OAuth credential holds a Canvas
developer key (its secret sealed) and, once the worker user has authorised it, a refresh
token (sealed). The credential's stored token is then Canvas's current access token, which
lives an hour; the refresher renews it a margin before it expires, once across every process
and replica (a lease taken with one conditional UPDATE), and stores the new one with the
revocation epoch moved, so every cached copy of the old one is dropped. A refresh Canvas
refuses (the key disabled, the user's access revoked) makes the credential unavailable at
once: calls are refused with ``503 credential_unavailable`` until an admin re-authorises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final
from urllib.parse import urlencode

from sqlalchemy.exc import SQLAlchemyError

from broker.core import worker_oauth as flow
from broker.core.request_limits import KeyedBuckets
from broker.errors import (
    BrokerError,
    ConflictError,
    DecryptionError,
    NotFoundError,
    UpstreamError,
)
from broker.requestid import current_request_facts, current_request_id
from broker.services import renewal
from broker.services.audit import add_events, admin_event
from broker.services.revocation import bump_revocation_epoch
from broker.services.tokens import WORKER_TOKEN_PURPOSE
from broker.storage import credentials, oauth_grants, upstreams
from broker.storage.credentials import SealedToken
from broker.storage.models import OAUTH, utcnow

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.domain import WorkerCredential
    from broker.keyring import Keyring
    from broker.metrics import Metrics
    from broker.services.revocation import CacheEpoch
    from broker.upstream import Forwarder

logger = logging.getLogger(__name__)

DEVELOPER_KEY_PURPOSE: Final = "developer-key-secret"
REFRESH_TOKEN_PURPOSE: Final = "oauth-refresh-token"  # noqa: S105 - a purpose label
VERIFIER_PURPOSE: Final = "pkce-verifier"

NOT_AUTHORIZED: Final = "not_authorized"
REFRESH_REFUSED: Final = "refresh_refused"

RETRY_AFTER_FAULT: Final = timedelta(seconds=15)
"""When a refresh failed for a reason other than Canvas's verdict, try again this soon."""

REJECTED_REFRESH_INTERVAL: Final = 10.0
"""After Canvas rejects an access token, refresh at once, but at most this often (seconds)."""

CALLBACK_RATE: Final = 0.5
"""Callbacks a second one source address may make (a burst of ``CALLBACK_BURST``)."""
CALLBACK_BURST: Final = 10.0

_FORM: Final = [
    (b"Content-Type", b"application/x-www-form-urlencoded"),
    (b"Accept", b"application/json"),
]


class AuthorizationRefusedError(BrokerError):
    """The OAuth callback cannot complete: unknown, replayed or expired state, or Canvas said no."""

    status = 400
    error = "authorization_refused"


class CallbackRateLimitedError(BrokerError):
    """Too many callbacks from one address: refused before anything is looked up."""

    status = 429
    error = "too_many_requests"


class CanvasTokenEndpointError(BrokerError):
    """Canvas's token endpoint could not be reached or did not answer as OAuth."""

    status = 502
    error = "canvas_unreachable"


@dataclass(frozen=True, slots=True)
class Authorization:
    """An authorisation URL for the worker user to open once, and until when it works."""

    credential: WorkerCredential
    url: str
    redirect_uri: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Authorized:
    """A completed authorisation: the credential, now usable, and the Canvas user it acts as."""

    credential: WorkerCredential


class WorkerOAuthService:
    """Authorisation, refresh and the refresher loop for OAuth worker credentials."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        keyring: Keyring,
        epoch: CacheEpoch,
        forwarder: Forwarder,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._keyring = keyring
        self._epoch = epoch
        self._forwarder = forwarder
        self._metrics = metrics
        self._clock = clock
        self._holder = renewal.holder_id()
        self._wake = asyncio.Event()
        self._rejected_at: dict[str, float] = {}
        # The callback is unauthenticated and each refusal is an audit event: a flood of
        # forged callbacks from one address is cut off before it can fill the log.
        self._callbacks = KeyedBuckets(CALLBACK_RATE, burst=CALLBACK_BURST)
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    # Authorisation --------------------------------------------------------------------------

    async def start(self, actor_key_id: str | None, ref: str, public_base: str) -> Authorization:
        """Begin the authorization-code flow for credential ``ref``: the URL to open once.

        ``public_base`` is the broker's own origin as Canvas will redirect the browser to it
        (``BROKER_PUBLIC_URL``); the callback URL must be registered on the developer key.
        """
        now = self._clock()
        state, verifier = flow.new_state(), flow.new_verifier()
        redirect_uri = public_base.rstrip("/") + flow.CALLBACK_PATH
        async with self._sessions.begin() as session:
            credential = await credentials.get(session, ref)
            grant = await oauth_grants.find(session, credential.id)
            if grant is None:
                raise ConflictError(
                    f"credential {credential.name!r} holds a manual token, not a developer key; "
                    "create an OAuth credential (broker credentials create --developer-key-id)"
                )
            upstream = await upstreams.find(session, credential.upstream_id)
            if upstream is None:
                raise NotFoundError(f"the upstream of credential {credential.name!r} is gone")
            expires_at = now + flow.STATE_TTL
            await oauth_grants.add_state(
                session,
                self._keyring.hash_secret(state),
                credential_id=credential.id,
                verifier=self._seal(verifier, VERIFIER_PURPOSE, credential.id),
                redirect_uri=redirect_uri,
                created_by=actor_key_id,
                at=now,
                expires_at=expires_at,
            )
            await self._event(
                session,
                "credential.authorize_start",
                credential,
                actor_key_id=actor_key_id,
                redirect_uri=redirect_uri,
                expires_at=expires_at.isoformat(),
                scopes=list(grant.key_scopes) if grant.key_scopes else None,
            )
        url = flow.authorization_url(
            upstream.base_url,
            developer_key_id=grant.developer_key_id,
            redirect_uri=redirect_uri,
            state=state,
            verifier=verifier,
            scopes=grant.key_scopes,
        )
        return Authorization(credential, url, redirect_uri, expires_at)

    async def complete(
        self, *, state: str | None, code: str | None, error: str | None
    ) -> Authorized:
        """The callback: use the ``state`` up, exchange the code, store the grant sealed.

        Refuses (``AuthorizationRefusedError``, audited) a state this broker never issued, one
        already used, or one expired; and a denial or a code Canvas does not accept. Nothing
        secret is in any message.
        """
        source = current_request_facts().get("source_ip") or "-"
        wait = self._callbacks.take(source, time.monotonic())
        if wait is not None:
            raise CallbackRateLimitedError(
                f"too many authorisation callbacks from this address; retry in {wait} s"
            )
        now = self._clock()
        if not state or len(state) > 200:  # noqa: PLR2004
            await self._refused_callback(None, "the callback carries no state")
            raise AuthorizationRefusedError("the callback carries no state: start again")
        async with self._sessions.begin() as session:
            pending = await oauth_grants.take_state(
                session, self._keyring.hash_secret(state), now=now
            )
        if isinstance(pending, str):
            why = {
                "unknown": "this broker did not issue that state (a foreign or forged link)",
                "replayed": "that authorisation link was already used",
                "expired": "that authorisation link expired",
            }[pending]
            await self._refused_callback(None, why, cause=pending)
            raise AuthorizationRefusedError(
                f"{why}; run `broker credentials authorize` again for a new link"
            )
        credential_id = pending.credential_id
        if error is not None or not code:
            what = "the worker user declined" if error == "access_denied" else "Canvas sent no code"
            await self._refused_callback(credential_id, what, cause=error or "no_code")
            raise AuthorizationRefusedError(f"{what}; nothing was stored")
        async with self._sessions() as session:
            grant = await oauth_grants.sealed(session, credential_id)
            current = await credentials.find(session, credential_id)
            upstream = None if grant is None else await upstreams.find(session, grant.upstream_id)
        if grant is None or current is None or upstream is None:
            raise AuthorizationRefusedError("the credential is gone; nothing was stored")
        verifier = self._open(pending.verifier, VERIFIER_PURPOSE, credential_id)
        form = {
            "grant_type": "authorization_code",
            "client_id": grant.developer_key_id,
            "client_secret": self._open(grant.secret, DEVELOPER_KEY_PURPOSE, credential_id),
            "redirect_uri": pending.redirect_uri,
            "code": code,
            "code_verifier": verifier,
        }
        answer = await self._token_request(upstream.base_url, form)
        if isinstance(answer, flow.CanvasRefusal):
            await self._refused_callback(credential_id, f"Canvas refused the code ({answer.error})")
            raise AuthorizationRefusedError(
                f"Canvas refused the authorisation code ({answer.error}); nothing was stored"
            )
        if answer.refresh_token is None:
            await self._refused_callback(credential_id, "Canvas issued no refresh token")
            raise AuthorizationRefusedError(
                "Canvas issued no refresh token for this developer key; nothing was stored"
            )
        if (
            current.canvas_user_id is not None
            and answer.user_id is not None
            and answer.user_id != current.canvas_user_id
        ):
            # As with a manual token's rotation: another user would change what every client
            # of this credential can reach. Not stored; a new credential is the way.
            await self._refused_callback(
                credential_id, f"authorised as Canvas user {answer.user_id}", cause="other_user"
            )
            raise AuthorizationRefusedError(
                f"Canvas authorised user {answer.user_id}, but credential {current.name!r} is "
                f"for Canvas user {current.canvas_user_id}; sign in to Canvas as that user, or "
                "create a new credential; nothing was stored"
            )
        async with self._sessions.begin() as session:
            await self._store(session, credential_id, answer, now=now, authorized=True)
            credential = await credentials.get(session, credential_id)
            await self._event(
                session,
                "credential.authorize",
                credential,
                actor_key_id=pending.created_by,
                canvas_user_id=credential.canvas_user_id,
                canvas_user_name=credential.canvas_user_name,
                token_expires_at=_iso(credential.token_expires_at),
            )
        self._wake.set()
        self._count("authorized")
        return Authorized(credential)

    async def _refused_callback(
        self, credential_id: str | None, why: str, *, cause: str = "refused"
    ) -> None:
        self._count("authorize_refused")
        with contextlib.suppress(SQLAlchemyError, OSError):
            async with self._sessions.begin() as session:
                await add_events(
                    session,
                    self._keyring,
                    admin_event(
                        **current_request_facts(),
                        request_id=current_request_id(),
                        action="credential.authorize",
                        decision="deny",
                        reason="authorization_refused",
                        credential_id=credential_id,
                        details={"why": why, "cause": cause},
                    ),
                )

    # Refresh --------------------------------------------------------------------------------

    async def refresh(self, credential_id: str, *, force: bool = False) -> str:
        """Renew the credential's access token if it is due (or ``force``), holding the lease.

        Returns what happened: ``refreshed``, ``refused`` (now unavailable), ``failed`` (tried
        again soon), ``not_due`` or ``leased`` (another process is on it).
        """
        now = self._clock()
        async with self._sessions.begin() as session:
            taken = await oauth_grants.REFRESH_LEASE.take(
                session,
                credential_id,
                holder=self._holder,
                now=now,
                until=now + flow.LEASE,
                due_by=None if force else now,
            )
        if not taken:
            return "leased" if force else "not_due"
        try:
            return await self._refresh_leased(credential_id, now)
        except BaseException:
            # Whatever went wrong, the lease must not stay taken: release it for the next try.
            with contextlib.suppress(SQLAlchemyError, OSError):
                async with self._sessions.begin() as session:
                    await oauth_grants.record_failure(
                        session,
                        credential_id,
                        problem="the refresh was interrupted",
                        unavailable_reason=None,
                        retry_at=now + RETRY_AFTER_FAULT,
                        at=now,
                    )
            raise

    async def _refresh_leased(self, credential_id: str, now: datetime) -> str:
        async with self._sessions() as session:
            grant = await oauth_grants.sealed(session, credential_id)
            upstream = None if grant is None else await upstreams.find(session, grant.upstream_id)
        if grant is None or grant.refresh is None or upstream is None:
            return "not_due"
        try:
            form = {
                "grant_type": "refresh_token",
                "client_id": grant.developer_key_id,
                "client_secret": self._open(grant.secret, DEVELOPER_KEY_PURPOSE, credential_id),
                "refresh_token": self._open(grant.refresh, REFRESH_TOKEN_PURPOSE, credential_id),
            }
        except DecryptionError as exc:
            logger.error("OAuth credential %s does not decrypt: %s", credential_id, exc)  # noqa: TRY400
            await self._failed(credential_id, now, "the stored grant does not decrypt")
            return "failed"
        try:
            answer = await self._token_request(upstream.base_url, form)
        except CanvasTokenEndpointError as exc:
            logger.warning("refreshing credential %s: %s", credential_id, exc)
            await self._failed(credential_id, now, str(exc))
            return "failed"
        if isinstance(answer, flow.CanvasRefusal):
            await self._refused_refresh(credential_id, now, answer)
            return "refused"
        async with self._sessions.begin() as session:
            await self._store(session, credential_id, answer, now=now, authorized=False)
            credential = await credentials.get(session, credential_id)
            await self._event(
                session,
                "credential.refresh",
                credential,
                actor_key_id=None,
                token_expires_at=_iso(credential.token_expires_at),
            )
        self._count("refreshed")
        logger.info("renewed the access token of credential %s", credential_id)
        return "refreshed"

    async def _failed(self, credential_id: str, now: datetime, error: str) -> None:
        self._count("failed")
        async with self._sessions.begin() as session:
            await oauth_grants.record_failure(
                session,
                credential_id,
                problem=error,
                unavailable_reason=None,
                retry_at=now + RETRY_AFTER_FAULT,
                at=now,
            )

    async def _refused_refresh(
        self, credential_id: str, now: datetime, answer: flow.CanvasRefusal
    ) -> None:
        self._count("refused")
        logger.error(
            "Canvas refused to renew the access token of credential %s (%s %s): the developer "
            "key was disabled or the worker user's access revoked; re-authorise with "
            "`broker credentials authorize`",
            credential_id,
            answer.status,
            answer.error,
        )
        async with self._sessions.begin() as session:
            await oauth_grants.record_failure(
                session,
                credential_id,
                problem=f"Canvas refused the refresh: {answer.status} {answer.error}",
                unavailable_reason=REFRESH_REFUSED,
                retry_at=None,
                at=now,
            )
            credential = await credentials.get(session, credential_id)
            await self._event(
                session,
                "credential.refresh",
                credential,
                actor_key_id=None,
                decision="deny",
                reason="credential_unavailable",
                canvas_status=answer.status,
                canvas_error=answer.error,
            )

    def canvas_rejected(self, credential_id: str) -> None:
        """Canvas answered 401 to the credential's access token: refresh now (rate-limited).

        A disabled developer key shows first as 401s to the access token; the refresh then
        fails too and the credential becomes unavailable, so every later call is refused
        before it is sent.
        """
        last = self._rejected_at.get(credential_id, 0.0)
        if time.monotonic() - last < REJECTED_REFRESH_INTERVAL:
            return
        running = self._refreshing.get(credential_id)
        if running is not None and not running.done():
            return
        self._rejected_at[credential_id] = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._refresh_quietly(credential_id))
        self._refreshing[credential_id] = task

    async def _refresh_quietly(self, credential_id: str) -> None:
        try:
            await self.refresh(credential_id, force=True)
        except (SQLAlchemyError, OSError, BrokerError):
            logger.exception("refreshing credential %s after Canvas rejected it", credential_id)

    async def renewed_token(self, credential_id: str, rejected: str) -> str | None:
        """The credential's stored access token if it is newer than ``rejected``, else None.

        Canvas regenerates the token when it answers a refresh, a moment before the refresher
        has stored the new one: while a refresh lease is live, this waits for it
        (``renewal.newer_token``).
        """

        async def read() -> tuple[str | None, bool]:
            async with self._sessions() as session:
                # The lease before the token (renewal.newer_token says why).
                lease = oauth_grants.REFRESH_LEASE
                leased = await lease.live(session, credential_id, self._clock())
                sealed = await credentials.sealed_token(session, credential_id)
            token = (
                None if sealed is None else self._open(sealed, WORKER_TOKEN_PURPOSE, credential_id)
            )
            return token, leased

        return await renewal.newer_token(read, rejected)

    # The refresher ----------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Renew due access tokens until ``stopping`` is set (one task per process)."""
        await renewal.run_loop(self.run_once, stopping, self._wake, "credential refresher")

    async def run_once(self) -> float:
        """Renew what is due now; return how long to sleep before the next is due."""
        now = self._clock()
        async with self._sessions() as session:
            due = await oauth_grants.due(session, now)
        for credential_id in due:
            await self.refresh(credential_id)
        async with self._sessions() as session:
            following = await oauth_grants.next_refresh(session)
        # Another process may hold the lease: look again shortly after it would be done.
        return renewal.sleep_until(
            None if following is None else (following - self._clock()).total_seconds()
        )

    # Helpers -----------------------------------------------------------------------------

    async def _token_request(
        self, base_url: str, form: dict[str, str]
    ) -> flow.CanvasGrant | flow.CanvasRefusal:
        """POST the form to Canvas's token endpoint; a grant or Canvas's refusal."""
        url = base_url + flow.TOKEN_PATH
        try:
            response = await self._forwarder.send("POST", url, _FORM, urlencode(form).encode())
            try:
                body = await response.read()
            finally:
                response.release()
        except UpstreamError as exc:
            raise CanvasTokenEndpointError(
                f"Canvas's token endpoint did not answer ({exc})"
            ) from exc
        answer = flow.read_token_response(response.status, body)
        if answer is None:
            raise CanvasTokenEndpointError(
                f"Canvas's token endpoint answered {response.status} without an OAuth answer"
            )
        return answer

    async def _store(
        self,
        session: AsyncSession,
        credential_id: str,
        answer: flow.CanvasGrant,
        *,
        now: datetime,
        authorized: bool,
    ) -> None:
        lifetime = timedelta(seconds=answer.expires_in) if answer.expires_in else None
        expires_at = None if lifetime is None else now + lifetime
        await oauth_grants.store_tokens(
            session,
            credential_id,
            access=self._seal(answer.access_token, WORKER_TOKEN_PURPOSE, credential_id),
            last4=answer.access_token[-4:],
            token_expires_at=expires_at,
            refresh_due_at=None
            if expires_at is None or lifetime is None
            else flow.refresh_at(expires_at, lifetime),
            refresh=None
            if answer.refresh_token is None
            else self._seal(answer.refresh_token, REFRESH_TOKEN_PURPOSE, credential_id),
            canvas_user=None if answer.user_id is None else (answer.user_id, answer.user_name),
            at=now,
            authorized=authorized,
        )

    async def _event(
        self,
        session: AsyncSession,
        action: str,
        credential: WorkerCredential,
        *,
        actor_key_id: str | None,
        decision: str = "allow",
        reason: str | None = None,
        **details: object,
    ) -> None:
        """Chain the event with the change; the epoch moves, so caches drop the old token."""
        await add_events(
            session,
            self._keyring,
            admin_event(
                **current_request_facts(),
                request_id=current_request_id(),
                action=action,
                decision=decision,
                reason=reason,
                actor_key_id=actor_key_id,
                credential_id=credential.id,
                details={"target": credential.id, "changes": details},
            ),
        )
        await bump_revocation_epoch(session, self._epoch.bump)

    def _seal(self, value: str, purpose: str, credential_id: str) -> SealedToken:
        return SealedToken(
            *self._keyring.encrypt(value.encode(), purpose=purpose, record_id=credential_id)
        )

    def _open(self, sealed: SealedToken, purpose: str, credential_id: str) -> str:
        return self._keyring.decrypt(
            sealed.key_id, sealed.ciphertext, purpose=purpose, record_id=credential_id
        ).decode()

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.credential_refreshes.labels(outcome).inc()


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def is_oauth(credential: WorkerCredential) -> bool:
    """Whether the credential is renewed through a developer key."""
    return credential.kind == OAUTH
