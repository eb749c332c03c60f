"""OAuth worker credentials in the database: the developer key, the grant, the lease, states.

Flushes, never commits, except where a function says so. Sealed secrets (the developer key's
secret, the refresh token, a PKCE verifier) leave storage only as ``SealedToken`` values to
``services.worker_oauth``, which alone decrypts them. Contract:
docs/interfaces.md#oauth-worker-credentials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import and_, or_, select, update

from broker.domain import OAuthGrant
from broker.storage import models
from broker.storage.credentials import SealedToken
from broker.storage.leases import Lease

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class SealedGrant:
    """What a refresh needs: the key's id, its sealed secret and the sealed refresh token."""

    credential_id: str
    developer_key_id: str
    secret: SealedToken
    refresh: SealedToken | None
    upstream_id: str
    token_expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class PendingAuthorization:
    """A ``state`` taken for its callback: the credential and the sealed PKCE verifier."""

    credential_id: str
    verifier: SealedToken
    redirect_uri: str
    created_by: str | None


def _grant(row: models.OAuthGrant) -> OAuthGrant:
    return OAuthGrant(
        credential_id=row.credential_id,
        developer_key_id=row.developer_key_id,
        key_scopes=None if row.key_scopes is None else tuple(row.key_scopes),
        authorized=row.refresh_ciphertext is not None,
        authorized_at=row.authorized_at,
        refreshed_at=row.refreshed_at,
        refresh_error=row.refresh_error,
    )


async def add(
    session: AsyncSession,
    credential_id: str,
    *,
    developer_key_id: str,
    secret: SealedToken,
    key_scopes: list[str] | None,
) -> OAuthGrant:
    """Record a credential's developer key (its secret sealed); not yet authorised."""
    row = models.OAuthGrant(
        credential_id=credential_id,
        developer_key_id=developer_key_id,
        secret_ciphertext=secret.ciphertext,
        secret_key_id=secret.key_id,
        key_scopes=key_scopes,
    )
    session.add(row)
    await session.flush()
    return _grant(row)


async def set_key_scopes(session: AsyncSession, credential_id: str, scopes: list[str]) -> None:
    """Record the developer key's scope list anew."""
    await session.execute(
        update(models.OAuthGrant)
        .where(models.OAuthGrant.credential_id == credential_id)
        .values(key_scopes=scopes)
    )


async def find(session: AsyncSession, credential_id: str) -> OAuthGrant | None:
    """The credential's grant metadata, if it is an OAuth credential."""
    row = await session.get(models.OAuthGrant, credential_id)
    return None if row is None else _grant(row)


async def all_grants(session: AsyncSession) -> dict[str, OAuthGrant]:
    """Every OAuth credential's grant metadata, by credential id."""
    rows = await session.scalars(select(models.OAuthGrant))
    return {row.credential_id: _grant(row) for row in rows}


async def sealed(session: AsyncSession, credential_id: str) -> SealedGrant | None:
    """The sealed developer-key secret and refresh token of an OAuth credential."""
    found = (
        await session.execute(
            select(models.OAuthGrant, models.WorkerCredential)
            .join(
                models.WorkerCredential,
                models.WorkerCredential.id == models.OAuthGrant.credential_id,
            )
            .where(models.OAuthGrant.credential_id == credential_id)
        )
    ).first()
    if found is None:
        return None
    grant, credential = found
    refresh = (
        None
        if grant.refresh_ciphertext is None or grant.refresh_key_id is None
        else SealedToken(grant.refresh_key_id, grant.refresh_ciphertext)
    )
    return SealedGrant(
        credential_id=grant.credential_id,
        developer_key_id=grant.developer_key_id,
        secret=SealedToken(grant.secret_key_id, grant.secret_ciphertext),
        refresh=refresh,
        upstream_id=credential.upstream_id,
        token_expires_at=credential.token_expires_at,
    )


def _usable() -> object:
    return and_(
        models.WorkerCredential.enabled.is_(True),
        models.WorkerCredential.unavailable_reason.is_(None),
        models.OAuthGrant.refresh_ciphertext.is_not(None),
    )


async def next_refresh(session: AsyncSession) -> datetime | None:
    """The earliest time a usable OAuth credential's access token is due to be renewed."""
    due: datetime | None = await session.scalar(
        select(models.OAuthGrant.refresh_due_at)
        .join(
            models.WorkerCredential,
            models.WorkerCredential.id == models.OAuthGrant.credential_id,
        )
        .where(_usable(), models.OAuthGrant.refresh_due_at.is_not(None))  # type: ignore[arg-type]
        .order_by(models.OAuthGrant.refresh_due_at)
        .limit(1)
    )
    return due


async def due(session: AsyncSession, now: datetime) -> list[str]:
    """The usable OAuth credentials whose access token is due for renewal at ``now``."""
    rows = await session.scalars(
        select(models.OAuthGrant.credential_id)
        .join(
            models.WorkerCredential,
            models.WorkerCredential.id == models.OAuthGrant.credential_id,
        )
        .where(_usable(), models.OAuthGrant.refresh_due_at <= now)  # type: ignore[arg-type]
    )
    return list(rows)


REFRESH_LEASE = Lease(
    key=models.OAuthGrant.credential_id,
    holder=models.OAuthGrant.lease_holder,
    until=models.OAuthGrant.lease_until,
    due=models.OAuthGrant.refresh_due_at,
)
"""An OAuth credential's refresh lease: ``take`` it before refreshing."""


async def store_tokens(
    session: AsyncSession,
    credential_id: str,
    *,
    access: SealedToken,
    last4: str,
    token_expires_at: datetime | None,
    refresh_due_at: datetime | None,
    refresh: SealedToken | None,
    canvas_user: tuple[str, str | None] | None,
    at: datetime,
    authorized: bool,
) -> None:
    """Store a new access token (and refresh token, when Canvas issued one); release the lease.

    The credential becomes usable again (``unavailable_reason`` cleared).
    """
    values: dict[str, object] = {
        "refreshed_at": at,
        "refresh_due_at": refresh_due_at,
        "refresh_error": None,
        "lease_holder": None,
        "lease_until": None,
    }
    if refresh is not None:
        values |= {"refresh_ciphertext": refresh.ciphertext, "refresh_key_id": refresh.key_id}
    if authorized:
        values["authorized_at"] = at
    await session.execute(
        update(models.OAuthGrant)
        .where(models.OAuthGrant.credential_id == credential_id)
        .values(**values)
    )
    credential: dict[str, object] = {
        "token_ciphertext": access.ciphertext,
        "token_key_id": access.key_id,
        "token_last4": last4,
        "token_expires_at": token_expires_at,
        "unavailable_reason": None,
        "rotated_at": at,
        "updated_at": at,
    }
    if canvas_user is not None:
        credential["canvas_user_id"], credential["canvas_user_name"] = canvas_user
    await session.execute(
        update(models.WorkerCredential)
        .where(models.WorkerCredential.id == credential_id)
        .values(**credential)
    )


async def record_failure(
    session: AsyncSession,
    credential_id: str,
    *,
    problem: str,
    unavailable_reason: str | None,
    retry_at: datetime | None,
    at: datetime,
) -> None:
    """Record a failed refresh and release the lease.

    With ``unavailable_reason`` (Canvas refused: the key was disabled or access revoked) the
    credential is unusable until re-authorised; otherwise it is tried again at ``retry_at``.
    """
    values: dict[str, object] = {
        "refresh_error": problem[:255],
        "lease_holder": None,
        "lease_until": None,
    }
    if retry_at is not None:
        values["refresh_due_at"] = retry_at
    await session.execute(
        update(models.OAuthGrant)
        .where(models.OAuthGrant.credential_id == credential_id)
        .values(**values)
    )
    if unavailable_reason is not None:
        await session.execute(
            update(models.WorkerCredential)
            .where(models.WorkerCredential.id == credential_id)
            .values(unavailable_reason=unavailable_reason, updated_at=at)
        )


async def add_state(
    session: AsyncSession,
    state_hash: str,
    *,
    credential_id: str,
    verifier: SealedToken,
    redirect_uri: str,
    created_by: str | None,
    at: datetime,
    expires_at: datetime,
) -> None:
    """Record an authorisation in progress under its ``state``'s keyed hash."""
    session.add(
        models.OAuthState(
            state_hash=state_hash,
            credential_id=credential_id,
            verifier_ciphertext=verifier.ciphertext,
            verifier_key_id=verifier.key_id,
            redirect_uri=redirect_uri,
            created_by=created_by,
            created_at=at,
            expires_at=expires_at,
        )
    )
    await session.flush()


async def take_state(
    session: AsyncSession, state_hash: str, *, now: datetime
) -> PendingAuthorization | str:
    """Use up a ``state`` once: its authorisation, or why not (unknown, replayed, expired).

    The UPDATE that marks it used is conditional on it being unused, so two callbacks with
    one state cannot both succeed.
    """
    row = await session.get(models.OAuthState, state_hash)
    if row is None:
        return "unknown"
    if row.used_at is not None:
        return "replayed"
    if row.expires_at <= now:
        return "expired"
    result = await session.execute(
        update(models.OAuthState)
        .where(models.OAuthState.state_hash == state_hash, models.OAuthState.used_at.is_(None))
        .values(used_at=now)
    )
    if getattr(result, "rowcount", 0) != 1:
        return "replayed"
    return PendingAuthorization(
        credential_id=row.credential_id,
        verifier=SealedToken(row.verifier_key_id, row.verifier_ciphertext),
        redirect_uri=row.redirect_uri,
        created_by=row.created_by,
    )


async def sealed_not_under(
    session: AsyncSession, key_id: str
) -> dict[str, tuple[SealedToken, SealedToken | None]]:
    """Developer-key secrets and refresh tokens not both sealed under ``key_id``, by credential."""
    grant = models.OAuthGrant
    rows = await session.scalars(
        select(grant).where(
            or_(
                grant.secret_key_id != key_id,
                and_(grant.refresh_key_id.is_not(None), grant.refresh_key_id != key_id),
            )
        )
    )
    return {
        row.credential_id: (
            SealedToken(row.secret_key_id, row.secret_ciphertext),
            None
            if row.refresh_key_id is None or row.refresh_ciphertext is None
            else SealedToken(row.refresh_key_id, row.refresh_ciphertext),
        )
        for row in rows
    }


async def reseal(
    session: AsyncSession,
    credential_id: str,
    secret: SealedToken,
    refresh: SealedToken | None,
) -> None:
    """Store the same developer-key secret and refresh token sealed anew (key rotation)."""
    values: dict[str, object] = {
        "secret_key_id": secret.key_id,
        "secret_ciphertext": secret.ciphertext,
    }
    if refresh is not None:
        values |= {"refresh_key_id": refresh.key_id, "refresh_ciphertext": refresh.ciphertext}
    await session.execute(
        update(models.OAuthGrant)
        .where(models.OAuthGrant.credential_id == credential_id)
        .values(**values)
    )
