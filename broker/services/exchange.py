"""Keyless jobs: a platform's identity token exchanged for a proxy token.

RFC 8693 token exchange and the RFC 7523 JWT bearer grant at the token endpoint. The job
names its client (``client_id``) and presents the token its platform gave it (GitHub Actions
or GitLab CI ID token, Kubernetes projected service-account token); no client secret exists.
The token must come from an issuer on the instance's allowlist, verify with that issuer's
published keys, and satisfy one of the client's trust policies; its ``jti`` is accepted once
on every replica. The proxy token lives no longer than the platform token and is down-scoped
as requested, exactly as with client credentials. Every exchange, granted or refused, is
audited with the issuer and the claims that matched or failed, never the token
(docs/interfaces.md#workload-identity-token-exchange).
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.exc import IntegrityError

from broker.core.workload import (
    JWT_BEARER,
    LEEWAY,
    SubjectTokenError,
    TrustPolicy,
    VerifiedSubject,
    read_unverified,
    verify_subject_token,
)
from broker.errors import OAuthError
from broker.services.issuer_keys import IssuerUnavailableError
from broker.storage import clients, trusted_issuers
from broker.storage.models import utcnow

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.services.issuer_keys import IssuerKeys
    from broker.services.tokens import MintedToken, TokenService

EXCHANGE_ACTION: Final = "token.exchange"
_CLIENT_ID = re.compile(r"[A-Za-z0-9_]{1,40}")


class ExchangeService:
    """Verify a platform token against a client's trust policies and mint a proxy token."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        tokens: TokenService,
        issuer_keys: IssuerKeys,
    ) -> None:
        self._sessions = sessions
        self._tokens = tokens
        self._keys = issuer_keys

    async def exchange(
        self,
        *,
        grant_type: str,
        subject_token: str,
        client_id: str | None,
        scope: str | None,
        expires_in: str | None,
        audit: dict[str, Any],
    ) -> MintedToken:
        """A proxy token for ``client_id`` in exchange for ``subject_token``, or ``OAuthError``.

        Refusals are ``invalid_request`` for token exchange (RFC 8693 §2.2.2) and
        ``invalid_grant`` for the JWT bearer grant (RFC 7523 §3.1); the message names the
        rule that failed, the audit event its reason.
        """
        audit = {**audit, "action": EXCHANGE_ACTION}
        error = "invalid_grant" if grant_type == JWT_BEARER else "invalid_request"
        details: dict[str, Any] = {"grant_type": grant_type}
        try:
            unverified = read_unverified(subject_token)
        except SubjectTokenError as exc:
            await self._tokens.refuse(audit, exc.reason, status=400, details=details)
            raise OAuthError(error, str(exc)) from exc
        issuer = unverified.issuer
        details["issuer"] = issuer
        if client_id is None or _CLIENT_ID.fullmatch(client_id) is None:
            await self._tokens.refuse(audit, "invalid_client", status=401, details=details)
            raise OAuthError(
                "invalid_client", "client_id is required: the client whose grant to use", 401
            )
        async with self._sessions() as session:
            client = await clients.find(session, client_id)
            allowed = await trusted_issuers.find(session, issuer)
        if client is None:
            await self._tokens.refuse(audit, "invalid_client", status=401, details=details)
            raise OAuthError("invalid_client", "client authentication failed", 401)
        if not client.enabled:
            await self._tokens.refuse(
                audit, "client_disabled", status=401, client_id=client.id, details=details
            )
            raise OAuthError("invalid_client", "client is disabled", 401)
        self._tokens.admit_client(client, audit)
        policies = [
            (index, TrustPolicy.from_json(policy))
            for index, policy in enumerate(client.trust_policies)
            if policy["issuer"] == issuer
        ]
        if not policies:
            await self._tokens.refuse(
                audit, "issuer_not_trusted", status=400, client_id=client.id, details=details
            )
            raise OAuthError(error, f"this client has no trust policy for the issuer {issuer}")
        if allowed is None:
            await self._tokens.refuse(
                audit, "issuer_not_allowed", status=400, client_id=client.id, details=details
            )
            raise OAuthError(
                error, f"the issuer {issuer} is not on this broker's list of trusted issuers"
            )
        try:
            jwks = await self._keys.keys_for(issuer, unverified.kid)
        except IssuerUnavailableError as exc:
            await self._tokens.refuse(
                audit, "issuer_unavailable", status=503, client_id=client.id, details=details
            )
            raise OAuthError(
                "temporarily_unavailable",
                f"the issuer's keys cannot be read, so the token cannot be verified: {exc}",
                503,
            ) from exc
        now = utcnow()
        try:
            verified = verify_subject_token(subject_token, jwks, policies, now=int(now.timestamp()))
        except SubjectTokenError as exc:
            await self._tokens.refuse(
                audit,
                exc.reason,
                status=400,
                client_id=client.id,
                details={**details, **exc.details},
            )
            raise OAuthError(error, str(exc)) from exc
        details |= {
            "subject": verified.subject,
            "policy": verified.policy_index,
            "claims": verified.matched,
        }
        return await self._tokens.mint(
            client,
            scope=scope,
            expires_in=expires_in,
            audit=audit,
            not_after=verified.expires_at,
            details=details,
            before_issue=self._jti_spender(verified, audit, client.id, details, error),
        )

    def _jti_spender(
        self,
        verified: VerifiedSubject,
        audit: dict[str, Any],
        client_id: str,
        details: dict[str, Any],
        error: str,
    ) -> Callable[[], Awaitable[None]]:
        """What the mint runs once every other check has passed: spend the token's ``jti``.

        Spent there rather than before the mint, so a request refused for its scope or
        lifetime leaves the platform token usable; a replayed ``jti`` is refused, audited.
        """

        async def spend() -> None:
            jti = verified.jti
            if jti is not None and not await self._remember(
                verified.issuer, jti, verified.expires_at
            ):
                await self._tokens.refuse(
                    audit,
                    "subject_token_replayed",
                    status=400,
                    client_id=client_id,
                    details=details,
                )
                raise OAuthError(error, "this subject token (its jti) was already exchanged")

        return spend

    async def _remember(self, issuer: str, jti: str, expires_at: int) -> bool:
        """Record a used ``jti`` of ``issuer``; False if it was used before."""
        key = hashlib.sha256(f"{issuer}\x00{jti}".encode()).hexdigest()
        expiry = datetime.fromtimestamp(expires_at + LEEWAY, tz=UTC)
        try:
            async with self._sessions.begin() as session:
                await trusted_issuers.remember_subject_token(
                    session, key, expires_at=expiry, now=utcnow()
                )
        except IntegrityError:
            return False
        return True
