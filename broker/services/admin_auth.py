"""Admin-key authentication for the management API, with every refusal audited.

A missing, malformed, unknown or revoked admin key (401) and an auditor key attempting a
mutation (403) each leave an ``admin`` event with decision ``deny``, so the security team sees
who knocked and from where. The event never holds the key: a revoked key is named by its id,
other keys not at all.

Contract: docs/audit.md#what-is-audited.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from broker.core.tokens import SecretKind, check_secret
from broker.errors import AuthenticationError, MalformedSecretError, PermissionDeniedError
from broker.services.audit import admin_event
from broker.services.management import Actor
from broker.storage import admin_keys

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.keyring import Keyring
    from broker.services.audit import AuditService

AUTHENTICATE: Final = "admin_key.authenticate"
AUTHORIZE: Final = "admin_key.authorize"
_INVALID: Final = "invalid_admin_key"


class AdminAuthenticator:
    """Resolves ``Authorization: Bearer <admin key>`` to an ``Actor``, auditing refusals."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], keyring: Keyring, audit: AuditService
    ) -> None:
        self._sessions = sessions
        self._keyring = keyring
        self._audit = audit

    async def authenticate(
        self, authorization: str | None, audit: Mapping[str, Any], *, admin: bool
    ) -> Actor:
        """The actor behind the header; ``admin`` requires the ``admin`` role.

        ``audit`` holds the request's facts for the refusal event. Raises
        ``AuthenticationError`` (401) or ``PermissionDeniedError`` (403) once the refusal is
        committed (``AuditUnavailableError`` if it cannot be: no record, no answer).
        """
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            await self._refuse(audit, AUTHENTICATE, "missing_admin_key", 401)
            raise AuthenticationError("send Authorization: Bearer <admin key>", error=_INVALID)
        try:
            key_value = check_secret(value.strip(), SecretKind.ADMIN_KEY)
        except MalformedSecretError as exc:
            await self._refuse(audit, AUTHENTICATE, "malformed_admin_key", 401)
            raise AuthenticationError("the admin key is malformed", error=_INVALID) from exc
        async with self._sessions() as session:
            key = await admin_keys.find_by_hash(
                session, self._keyring.secret_hash_candidates(key_value)
            )
        if key is None or key.revoked_at is not None:
            reason = "unknown_admin_key" if key is None else "revoked_admin_key"
            await self._refuse(audit, AUTHENTICATE, reason, 401, key.id if key else None)
            raise AuthenticationError("the admin key is not valid", error=_INVALID)
        if admin and key.role != "admin":
            await self._refuse(audit, AUTHORIZE, "read_only_key", 403, key.id)
            raise PermissionDeniedError("auditor keys are read-only", error="read_only_key")
        return Actor(key_id=key.id, role=key.role)

    async def _refuse(
        self,
        audit: Mapping[str, Any],
        action: str,
        reason: str,
        status: int,
        key_id: str | None = None,
    ) -> None:
        await self._audit.record(
            admin_event(
                **audit,
                action=action,
                decision="deny",
                reason=reason,
                status=status,
                actor_key_id=key_id,
            )
        )
