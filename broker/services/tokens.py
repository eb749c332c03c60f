"""Proxy tokens: mint for an authenticated client, resolve for the proxy, revoke, introspect."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from broker import domain
from broker.core.admission import CallPolicy
from broker.core.assertions import LEEWAY as ASSERTION_LEEWAY
from broker.core.assertions import claimed_issuer, verify_assertion
from broker.core.net import address_allowed, parse_networks
from broker.core.request_limits import KeyedBuckets
from broker.core.scopes import Grant
from broker.core.tokens import SecretKind, check_secret, generate_secret, new_id
from broker.errors import (
    Attribution,
    DecryptionError,
    InvalidAssertionError,
    MalformedSecretError,
    OAuthError,
    Refusal,
    ScopeError,
    UnavailableError,
)
from broker.keyring import KeyringReloader
from broker.services.audit import (
    AuditService,
    add_events,
    new_event,
)
from broker.services.deadline import within
from broker.services.revocation import CacheEpoch, bump_revocation_epoch
from broker.storage import clients, credentials, proxy_tokens, upstreams, used_assertions
from broker.storage.models import (
    CLIENT_SECRET,
    OAUTH,
    PRIVATE_KEY_JWT,
    Client,
    WorkerCredential,
    utcnow,
)
from broker.storage.queries import TokenRecord, find_token

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.config import Settings
    from broker.core.audit_chain import AuditEvent
    from broker.core.net import IPNetwork
    from broker.keyring import Keyring

logger = logging.getLogger(__name__)
WORKER_TOKEN_PURPOSE = "worker-token"  # noqa: S105 - an encryption purpose label
_GRANT_CACHE_SIZE = 4096
_TOKEN_CACHE_SIZE = 65536
_CLIENT_ID = re.compile(r"[A-Za-z0-9_]{1,40}")


@dataclass(frozen=True)
class Authorized:
    """A resolved proxy token: who is calling, with what grant, through which credential.

    ``policy`` is what the grant and the client's flags let the call do; ``bearer`` the
    ``Authorization`` value that carries the worker token upstream.
    """

    token_id: str
    client_id: str
    credential_id: str
    upstream_name: str
    upstream_url: str
    worker_token: str
    policy: CallPolicy
    allowed_networks: tuple[IPNetwork, ...] = ()
    rate_limit: float | None = None
    rate_burst: int | None = None
    canvas_weight: float = 1.0
    renewed: bool = False  # a token the broker renews or regenerates: resent once if refused
    manual: bool = False  # a manual token (renewed: regenerated through Canvas's tokens API)
    bearer: bytes = field(init=False, repr=False, compare=False)
    worker_token_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        token = self.worker_token.encode()
        object.__setattr__(self, "worker_token_bytes", token)
        object.__setattr__(self, "bearer", b"Bearer " + token)

    @property
    def grant(self) -> Grant:
        """The token's effective grant."""
        return self.policy.grant


@dataclass(frozen=True)
class _Cached:
    """A resolved token, usable while its epoch value is current and nothing has expired."""

    authorized: Authorized
    epoch: bytes
    usable_until: float  # epoch seconds: the token's or the credential's expiry, if sooner


@dataclass(frozen=True)
class MintedToken:
    """The one-time response of the token endpoint."""

    access_token: str
    token_id: str
    expires_in: int
    scope: str


def _attribution(record: TokenRecord) -> Attribution:
    """Who a known but unusable token belongs to, for the audit event of its refusal."""
    return Attribution(
        client_id=record.client.id,
        token_id=record.token.id,
        credential_id=record.credential.id,
        upstream=record.upstream.name,
    )


def credential_usable(
    credential: WorkerCredential | domain.WorkerCredential, now: datetime
) -> bool:
    """Enabled and not past its expiry."""
    return credential.enabled and (credential.expires_at is None or credential.expires_at > now)


class TokenService:
    """Use cases around proxy tokens."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        keyring: Keyring,
        settings: Settings,
        audit: AuditService,
        epoch: CacheEpoch | None = None,
        *,
        keys: KeyringReloader | None = None,
    ) -> None:
        self._sessions = sessions
        self._keyring = keyring
        # Decryption reloads the keyring once before failing (a rotation elsewhere).
        self._decrypt = (keys or KeyringReloader(keyring, None)).decrypt
        # Limits of the token endpoint, per process and in memory (docs/interfaces.md).
        self._per_source = (
            KeyedBuckets(settings.token_rate_per_source) if settings.token_rate_per_source else None
        )
        self._per_client = (
            KeyedBuckets(settings.token_rate_per_client) if settings.token_rate_per_client else None
        )
        self._settings = settings
        self._audit = audit
        self._epoch = epoch or CacheEpoch()
        self._cache: dict[str, _Cached] = {}
        self._grants: dict[tuple[str, int, tuple[str, ...]], Grant] = {}
        self._network_cache: dict[tuple[str, int], tuple[IPNetwork, ...]] = {}
        # A fixed hash to compare against when the client id is unknown, so the response time
        # does not reveal which client ids exist.
        self._dummy_hash = keyring.hash_secret(generate_secret(SecretKind.CLIENT_SECRET))

    def admit_source(self, audit: dict[str, Any]) -> None:
        """Refuse a source address over ``BROKER_TOKEN_RATE_PER_SOURCE`` (429, audited).

        Checked before anything is parsed or looked up, so a flood costs a dictionary lookup.
        """
        if self._per_source is None:
            return
        wait = self._per_source.take(audit.get("source_ip") or "-", time.monotonic())
        if wait is not None:
            self._rate_limited(audit, wait, "source", "from this address")

    def admit_client(self, client: domain.Client, audit: dict[str, Any]) -> None:
        """Refuse an authenticated client over ``BROKER_TOKEN_RATE_PER_CLIENT`` (429, audited).

        Only after authentication: a caller naming someone else's client id cannot spend that
        client's allowance (the per-source limit bounds such a caller).
        """
        if self._per_client is None:
            return
        wait = self._per_client.take(client.id, time.monotonic())
        if wait is not None:
            self._rate_limited(audit, wait, "client", "by this client", client_id=client.id)

    def _rate_limited(
        self,
        audit: dict[str, Any],
        wait: int,
        limit: str,
        whose: str,
        **fields: Any,  # noqa: ANN401
    ) -> None:
        self._audit.record_later(
            new_event(
                **{
                    "action": "token.mint",
                    **audit,
                    "kind": "token",
                    "decision": "deny",
                    "reason": "token_rate_limited",
                    "status": 429,
                    "details": {"limit": limit, "retry_after": wait},
                    **fields,
                }
            )
        )
        raise OAuthError(
            "too_many_requests",
            f"too many token requests {whose}; retry in {wait} s",
            status=429,
            retry_after=wait,
        )

    async def authenticate_client(
        self, client_id: str, secret: str, *, audit: dict[str, Any]
    ) -> domain.Client:
        """The client with this id and secret, or ``invalid_client`` (audited)."""
        # Anything that cannot be a client id (NUL, huge, non-ASCII) never reaches the database.
        plausible = _CLIENT_ID.fullmatch(client_id) is not None
        async with self._sessions() as session:
            found = await clients.with_secret_hash(session, client_id) if plausible else None
        client, stored = found or (None, None)
        stored = stored or self._dummy_hash
        try:
            well_formed = bool(check_secret(secret, SecretKind.CLIENT_SECRET))
        except MalformedSecretError:
            well_formed = False
        matches = self._keyring.verify_secret(secret, stored) and well_formed
        if client is None or not matches or client.auth_method != CLIENT_SECRET:
            await self.refuse(
                audit, "invalid_client", status=401, client_id=client.id if client else None
            )
            raise OAuthError("invalid_client", "client authentication failed", status=401)
        if not client.enabled:
            await self.refuse(audit, "client_disabled", status=401, client_id=client.id)
            raise OAuthError("invalid_client", "client is disabled", status=401)
        return client

    async def authenticate_assertion(
        self,
        assertion: str,
        client_id: str | None,
        *,
        audiences: Sequence[str],
        audit: dict[str, Any],
    ) -> domain.Client:
        """The client that signed ``assertion`` (``private_key_jwt``), or ``invalid_client``.

        Each ``jti`` is accepted once: it is remembered in the database until the assertion
        expires, so a replay is refused on every replica.
        """
        try:
            issuer = claimed_issuer(assertion)
        except InvalidAssertionError as exc:
            await self.refuse(audit, "invalid_assertion", status=401)
            raise OAuthError("invalid_client", str(exc), status=401) from exc
        plausible = _CLIENT_ID.fullmatch(issuer) is not None and client_id in {None, issuer}
        async with self._sessions() as session:
            client = await clients.find(session, issuer) if plausible else None
        if client is None or client.auth_method != PRIVATE_KEY_JWT or not client.jwks:
            await self.refuse(
                audit, "invalid_client", status=401, client_id=client.id if client else None
            )
            raise OAuthError("invalid_client", "client authentication failed", status=401)
        now = utcnow()
        try:
            verified = verify_assertion(
                assertion,
                client.jwks,
                client_id=client.id,
                audiences=audiences,
                now=int(now.timestamp()),
            )
        except InvalidAssertionError as exc:
            await self.refuse(audit, "invalid_assertion", status=401, client_id=client.id)
            raise OAuthError("invalid_client", str(exc), status=401) from exc
        if not client.enabled:
            await self.refuse(audit, "client_disabled", status=401, client_id=client.id)
            raise OAuthError("invalid_client", "client is disabled", status=401)
        if not await self._remember_assertion(client.id, verified.jti, verified.expires_at):
            await self.refuse(audit, "assertion_replayed", status=401, client_id=client.id)
            raise OAuthError("invalid_client", "this client_assertion was already used", status=401)
        return client

    async def _remember_assertion(self, client_id: str, jti: str, expires_at: int) -> bool:
        """Record a used ``jti``; False if it was used before. Expired ones are forgotten."""
        now = utcnow()
        expiry = datetime.fromtimestamp(expires_at + ASSERTION_LEEWAY, tz=UTC)
        try:
            async with self._sessions.begin() as session:
                await used_assertions.remember(session, client_id, jti, expires_at=expiry, now=now)
        except IntegrityError:
            return False
        return True

    async def mint(
        self,
        client: domain.Client,
        *,
        scope: str | None,
        expires_in: str | None,
        audit: dict[str, Any],
        not_after: int | None = None,
        details: dict[str, Any] | None = None,
        before_issue: Callable[[], Awaitable[None]] | None = None,
    ) -> MintedToken:
        """Mint a proxy token for an authenticated client (audited either way).

        ``not_after`` (epoch seconds) caps the token's expiry: a token exchanged for a
        platform token lives no longer than that token
        (docs/interfaces.md#workload-identity-token-exchange).
        ``details`` are recorded in the audit event of the mint. ``before_issue`` runs once
        every check has passed, just before the token is stored; it may refuse (audited, by
        raising ``OAuthError``): the exchange spends the platform token's ``jti`` there, so a
        request refused for its scope or its client's settings does not use the token up.
        """
        try:
            granted = Grant.compile(client.scopes, client.constraints)
            # A blank scope is no scope: the whole grant, as when the parameter is left out.
            requested = scope.split() if scope else []
            wanted = granted.subset(requested) if requested else granted
        except ScopeError as exc:
            await self.refuse(audit, "invalid_scope", status=400, client_id=client.id)
            raise OAuthError("invalid_scope", str(exc)) from exc
        if not address_allowed(audit.get("source_ip"), self._networks(client)):
            await self.refuse(audit, "source_not_allowed", status=400, client_id=client.id)
            raise OAuthError(
                "unauthorized_client", "this client may not request tokens from this address"
            )
        lifetime = await self._lifetime(client, expires_in, audit)
        now = utcnow()
        if not_after is not None:
            lifetime = min(lifetime, not_after - int(now.timestamp()))
            if lifetime < 1:
                await self.refuse(audit, "subject_token_expired", status=400, client_id=client.id)
                raise OAuthError("invalid_grant", "the subject token has expired")
        async with self._sessions() as session:
            credential = await credentials.find(session, client.credential_id)
            upstream = (
                None
                if credential is None
                else await upstreams.find(session, credential.upstream_id)
            )
        # Refused outside any write transaction: the audit writer needs the write lock.
        if credential is None or not credential_usable(credential, now):
            await self.refuse(audit, "credential_disabled", status=400, client_id=client.id)
            raise OAuthError(
                "unauthorized_client", "the client's worker credential is disabled or expired"
            )
        if upstream is None or not upstream.enabled:
            await self.refuse(audit, "upstream_disabled", status=400, client_id=client.id)
            raise OAuthError("unauthorized_client", "the client's upstream (Canvas) is disabled")
        if before_issue is not None:
            await before_issue()
        async with self._sessions.begin() as session:
            value = generate_secret(SecretKind.PROXY_TOKEN)
            token = await proxy_tokens.add(
                session,
                domain.ProxyToken(
                    id=new_id("tok"),
                    client_id=client.id,
                    scopes=tuple(wanted.scope_strings()),
                    created_at=now,
                    expires_at=now + timedelta(seconds=lifetime),
                    revoked_at=None,
                    revoked_by=None,
                    source_ip=audit.get("source_ip"),
                ),
                token_hash=self._keyring.hash_secret(value),
            )
            await add_events(
                session,
                self._keyring,
                _token_event(
                    audit,
                    "token.mint",
                    client,
                    token.id,
                    details={
                        "expires_in": lifetime,
                        "scopes": list(token.scopes),
                        **(details or {}),
                    },
                ),
            )
        return MintedToken(value, token.id, lifetime, " ".join(token.scopes))

    async def _lifetime(
        self, client: domain.Client, requested: str | None, audit: dict[str, Any]
    ) -> int:
        ceiling = min(client.max_token_ttl, self._settings.max_token_ttl)
        if requested is None or requested == "":
            return min(client.token_ttl, ceiling)
        # ASCII digits only: str.isdigit() also accepts characters int() rejects, such as '²'.
        significant = requested.lstrip("0")
        if not (requested.isascii() and requested.isdigit()) or not significant:
            await self.refuse(audit, "invalid_request", status=400, client_id=client.id)
            raise OAuthError("invalid_request", "expires_in must be a positive whole number")
        # Capped however many digits it has, without int() on an unbounded string.
        if len(significant) > len(str(ceiling)):
            return ceiling
        return min(int(significant), ceiling)

    async def refuse(
        self,
        audit: dict[str, Any],
        reason: str,
        *,
        status: int,
        **fields: Any,  # noqa: ANN401
    ) -> None:
        """Record a refused token request; ``audit`` may name the action (default mint)."""
        await self._audit.record(
            new_event(
                **{
                    "action": "token.mint",
                    **audit,
                    "kind": "token",
                    "decision": "deny",
                    "reason": reason,
                    "status": status,
                    **fields,
                }
            )
        )

    async def resolve(self, value: str) -> Authorized:
        """What a bearer token may do right now, or a 401 ``Refusal`` saying why.

        The refusal names the token's client, token and credential when the token is known
        (its ``attribution``), so the audit event says who tried. A database that does not
        answer is an ``UnavailableError`` (503 ``token_store_unavailable``): fail closed.

        Served from the process's cache while the revocation epoch it was cached under is
        current (``services.revocation``) and neither the token nor the worker credential has
        expired; otherwise every check runs against the database. Revoking a token or
        disabling a client, credential or upstream therefore takes effect on the very next
        request here, and within a second on other replicas.
        """
        cache_key = self._keyring.hash_secret(value)
        # Read the epoch before the database: a revocation committed after this read changes
        # the epoch, so an entry built from a read that missed it is never used.
        epoch = self._epoch.current()
        if epoch is not None:
            cached = self._cache.get(cache_key)
            if cached is not None and cached.epoch == epoch and time.time() < cached.usable_until:
                return cached.authorized  # only well-formed tokens are ever cached
        else:
            self._epoch.start(self._sessions)
        try:
            check_secret(value, SecretKind.PROXY_TOKEN)
        except MalformedSecretError as exc:
            raise Refusal(401, "malformed_token", "the access token is malformed") from exc
        authorized, usable_until = await self._resolve_stored(value)
        if epoch is not None:
            if len(self._cache) >= _TOKEN_CACHE_SIZE:
                self._cache.clear()
            self._cache[cache_key] = _Cached(authorized, epoch, usable_until)
        return authorized

    async def _resolve_stored(self, value: str) -> tuple[Authorized, float]:
        """Resolve against the database; also return until when the answer holds."""
        candidates = self._keyring.secret_hash_candidates(value)

        async def lookup() -> TokenRecord | None:
            async with self._sessions() as session:
                return await find_token(session, candidates)

        # One bound at most; a failed session's clean-up goes on in the background.
        try:
            record = await within(lookup(), self._settings.audit_timeout)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            logger.error("token store unavailable: %s", type(exc).__name__)  # noqa: TRY400
            raise UnavailableError(
                "the token store is unavailable; nothing was forwarded",
                error="token_store_unavailable",
            ) from exc
        if record is None:
            raise Refusal(401, "unknown_token", "the access token is not valid")
        now = utcnow()
        # A disabled client's tokens are revoked too (services.management): its refusal
        # says why, while enabling it again leaves them revoked.
        checks = (
            (record.client.enabled, "client_disabled", "the client is disabled"),
            (record.token.revoked_at is None, "token_revoked", "the access token was revoked"),
            (record.token.expires_at > now, "token_expired", "the access token has expired"),
            (
                credential_usable(record.credential, now),
                "credential_disabled",
                "the worker credential is disabled or expired",
            ),
            (record.upstream.enabled, "upstream_disabled", "the upstream is disabled"),
        )
        for ok, reason, message in checks:
            if not ok:
                raise Refusal(401, reason, message, attribution=_attribution(record))
        credential = record.credential
        if (
            credential.kind != OAUTH
            and credential.token_expires_at is not None
            and credential.token_expires_at <= now
        ):
            # A manual token past the expiry Canvas recorded for it: Canvas would answer 401
            # (docs/interfaces.md#manual-tokens-with-a-lifecycle), so nothing is sent.
            raise Refusal(
                503,
                "credential_expired",
                "the broker's Canvas token for this client has expired at Canvas; nothing was "
                "sent to Canvas; an admin must store a new one (broker credentials rotate)",
                attribution=_attribution(record),
            )
        if credential.unavailable_reason is not None or (
            credential.token_expires_at is not None and credential.token_expires_at <= now
        ):
            # An OAuth credential not (or no longer) authorised, or whose access token could
            # not be renewed in time (docs/interfaces.md#oauth-worker-credentials): refused
            # before anything is sent, rather than forwarded to fail at Canvas.
            raise Refusal(
                503,
                "credential_unavailable",
                "the broker's Canvas credential for this client cannot be used until an admin "
                "re-authorises it; nothing was sent to Canvas",
                attribution=_attribution(record),
            )
        try:
            worker_token = self._decrypt(
                record.credential.token_key_id,
                record.credential.token_ciphertext,
                purpose=WORKER_TOKEN_PURPOSE,
                record_id=record.credential.id,
            ).decode()
        except DecryptionError as exc:
            # The caller's token is fine: the broker lacks the key (a fault of the broker's
            # configuration, docs/storage-and-keys.md#key-rotation), so 503, not 401.
            logger.error(  # noqa: TRY400 - the cause is named; its traceback says nothing more
                "worker credential %s (sealed under key %r) does not decrypt with this "
                "process's keyring: %s",
                record.credential.id,
                record.credential.token_key_id,
                exc,
            )
            raise Refusal(
                503,
                "credential_unavailable",
                "the broker cannot use its Canvas credential for this client right now; nothing "
                "was sent to Canvas; retry shortly, and tell the broker's operators if it persists",
                attribution=_attribution(record),
            ) from exc
        client = record.client
        authorized = Authorized(
            token_id=record.token.id,
            client_id=client.id,
            credential_id=record.credential.id,
            upstream_name=record.upstream.name,
            upstream_url=record.upstream.base_url,
            worker_token=worker_token,
            policy=CallPolicy(
                grant=self._effective_grant(client, record.token.scopes),
                allow_masquerade=client.allow_masquerade,
                allow_includes=client.allow_includes,
            ),
            allowed_networks=self._networks(client),
            rate_limit=client.rate_limit,
            rate_burst=client.rate_burst,
            canvas_weight=client.canvas_weight,
            # A manual token with a Canvas record may be regenerated by another process at
            # any moment: a call Canvas refuses is resent once with the stored token.
            renewed=credential.kind == OAUTH or credential.canvas_token_id is not None,
            manual=credential.kind != OAUTH,
        )
        expiries = [
            record.token.expires_at,
            record.credential.expires_at,
            record.credential.token_expires_at,
        ]
        usable_until = min(e.timestamp() for e in expiries if e is not None)
        return authorized, usable_until

    def _networks(self, client: Client | domain.Client) -> tuple[IPNetwork, ...]:
        """The client's allowed source networks, parsed once per grant version."""
        key = (client.id, client.grant_version)
        networks = self._network_cache.get(key)
        if networks is None:
            networks = parse_networks(client.allowed_cidrs)
            if len(self._network_cache) >= _GRANT_CACHE_SIZE:
                self._network_cache.clear()
            self._network_cache[key] = networks
        return networks

    def _effective_grant(self, client: Client, token_scopes: Sequence[str]) -> Grant:
        """The token's scopes that the client still holds, with the client's constraints.

        Compiled once per (client, grant version, token scopes), not per request.
        """
        key = (client.id, client.grant_version, tuple(token_scopes))
        grant = self._grants.get(key)
        if grant is None:
            held = set(client.scopes)
            grant = Grant.compile([s for s in token_scopes if s in held], client.constraints)
            if len(self._grants) >= _GRANT_CACHE_SIZE:
                self._grants.clear()
            self._grants[key] = grant
        return grant

    async def revoke_own(self, client: domain.Client, value: str, *, audit: dict[str, Any]) -> None:
        """RFC 7009: revoke ``value`` if it belongs to ``client``.

        The caller answers 200 either way (the RFC's rule), but the log tells the cases
        apart: a revocation, or a refusal saying why nothing was revoked (malformed, unknown
        or another client's token, or one already revoked).
        """
        reason = await self._revoke_own(client, value, audit)
        if reason is not None:
            await self.refuse(
                {**audit, "action": "token.revoke"}, reason, status=200, client_id=client.id
            )

    async def _revoke_own(
        self, client: domain.Client, value: str, audit: dict[str, Any]
    ) -> str | None:
        """Revoke; None if a token was revoked, else the reason nothing was."""
        try:
            check_secret(value, SecretKind.PROXY_TOKEN)
        except MalformedSecretError:
            return "malformed_token"
        hashes = self._keyring.secret_hash_candidates(value)
        async with self._sessions.begin() as session:
            token = await proxy_tokens.find_of_client(session, hashes, client.id)
            if token is None:
                return "unknown_token"  # also another client's: the same answer, on purpose
            if token.revoked_at is not None:
                return "token_revoked"
            await proxy_tokens.revoke(session, token.id, at=utcnow(), by=f"client:{client.id}")
            await add_events(
                session, self._keyring, _token_event(audit, "token.revoke", client, token.id)
            )
            await bump_revocation_epoch(session, self._epoch.bump)
        return None

    async def introspect(self, value: str) -> dict[str, Any]:
        """RFC 7662 response for ``value`` (``{"active": false}`` for anything unusable)."""
        try:
            authorized = await self.resolve(value)
        except Refusal:
            return {"active": False}
        async with self._sessions() as session:
            token = await proxy_tokens.find(session, authorized.token_id)
        if token is None:
            return {"active": False}
        return {
            "active": True,
            "token_type": "Bearer",
            "client_id": authorized.client_id,
            "scope": " ".join(authorized.grant.scope_strings()),
            "exp": int(token.expires_at.timestamp()),
            "iat": int(token.created_at.timestamp()),
            "jti": token.id,
        }


def _token_event(
    audit: dict[str, Any],
    action: str,
    client: domain.Client,
    token_id: str,
    **fields: Any,  # noqa: ANN401 - further column values
) -> AuditEvent:
    """A successful token event of ``client`` for ``token_id``.

    An action the request's facts already name wins (a mint by exchange is token.exchange).
    """
    return new_event(
        **{
            **audit,
            "kind": "token",
            "action": audit.get("action", action),
            "decision": "allow",
            "client_id": client.id,
            "token_id": token_id,
            "credential_id": client.credential_id,
            "status": 200,
            **fields,
        }
    )
