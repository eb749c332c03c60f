"""Worker credentials in the database. Flushes, never commits.

Lookups return metadata (``domain.WorkerCredential``); the sealed token leaves storage only
through ``sealed_not_under``, for re-encryption under a new key, and ``sealed_sample``, for
the readiness check that the keyring can decrypt what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sqlalchemy import func, or_, select, update

from broker.domain import WorkerCredential
from broker.storage import models
from broker.storage.lookup import apply, row_by_ref, rows_by_name

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession

UPDATABLE: Final = frozenset(
    {"notes", "expires_at", "canvas_user_id", "canvas_user_name", "enabled", "updated_at"}
)


@dataclass(frozen=True, slots=True)
class SealedToken:
    """A worker token as stored: encrypted under the keyring key ``key_id``."""

    key_id: str
    ciphertext: bytes


def record(row: models.WorkerCredential) -> WorkerCredential:
    """The credential's metadata a row holds."""
    return WorkerCredential(
        id=row.id,
        name=row.name,
        upstream_id=row.upstream_id,
        token_last4=row.token_last4,
        canvas_user_id=row.canvas_user_id,
        canvas_user_name=row.canvas_user_name,
        notes=row.notes,
        enabled=row.enabled,
        expires_at=row.expires_at,
        created_at=row.created_at,
        rotated_at=row.rotated_at,
        updated_at=row.updated_at,
        kind=row.kind,
        token_expires_at=row.token_expires_at,
        unavailable_reason=row.unavailable_reason,
    )


async def get(session: AsyncSession, ref: str) -> WorkerCredential:
    """The credential with this id or name, or ``NotFoundError``."""
    return record(await row_by_ref(session, models.WorkerCredential, ref, "credential"))


async def find(session: AsyncSession, credential_id: str) -> WorkerCredential | None:
    """The credential with this id, if any (names are not looked at)."""
    row = await session.get(models.WorkerCredential, credential_id)
    return None if row is None else record(row)


async def all_by_name(session: AsyncSession) -> list[WorkerCredential]:
    """Every credential, by name."""
    return [record(row) for row in await rows_by_name(session, models.WorkerCredential)]


async def add(
    session: AsyncSession, credential: WorkerCredential, token: SealedToken
) -> WorkerCredential:
    """Insert a new credential with its sealed token (a taken name raises ``IntegrityError``)."""
    row = models.WorkerCredential(
        id=credential.id,
        name=credential.name,
        upstream_id=credential.upstream_id,
        token_ciphertext=token.ciphertext,
        token_key_id=token.key_id,
        token_last4=credential.token_last4,
        canvas_user_id=credential.canvas_user_id,
        canvas_user_name=credential.canvas_user_name,
        notes=credential.notes,
        enabled=credential.enabled,
        expires_at=credential.expires_at,
        created_at=credential.created_at,
        rotated_at=credential.rotated_at,
        updated_at=credential.updated_at,
        kind=credential.kind,
        token_expires_at=credential.token_expires_at,
        unavailable_reason=credential.unavailable_reason,
    )
    session.add(row)
    await session.flush()
    return record(row)


async def change(
    session: AsyncSession, ref: str, changes: Mapping[str, object]
) -> WorkerCredential:
    """Change the columns ``changes`` names (of ``UPDATABLE``); returns the metadata now."""
    row = await row_by_ref(session, models.WorkerCredential, ref, "credential")
    apply(row, changes, UPDATABLE)
    await session.flush()
    return record(row)


async def replace_token(
    session: AsyncSession,
    ref: str,
    token: SealedToken,
    *,
    last4: str,
    at: datetime,
    canvas_user: tuple[str, str | None] | None = None,
) -> WorkerCredential:
    """Store a new worker token (a rotation in Canvas): sealed, its last four, rotated ``at``.

    ``canvas_user`` (id, name), when the new token was verified, replaces the recorded user.
    """
    row = await row_by_ref(session, models.WorkerCredential, ref, "credential")
    row.token_key_id, row.token_ciphertext = token.key_id, token.ciphertext
    row.token_last4 = last4
    if canvas_user is not None:
        row.canvas_user_id, row.canvas_user_name = canvas_user
    row.rotated_at = row.updated_at = at
    await session.flush()
    return record(row)


async def unavailable(session: AsyncSession, now: datetime) -> list[tuple[str, str]]:
    """(name, reason) of every enabled credential whose calls are refused until an admin acts."""
    credential = models.WorkerCredential
    rows = await session.execute(
        select(credential.name, credential.unavailable_reason)
        .where(
            credential.enabled.is_(True),
            or_(credential.unavailable_reason.is_not(None), credential.token_expires_at <= now),
        )
        .order_by(credential.name)
    )
    return [(row.name, row.unavailable_reason or "token_expired") for row in rows]


async def sealed_token(session: AsyncSession, credential_id: str) -> SealedToken | None:
    """The credential's sealed token as stored now (a renewed OAuth access token)."""
    row = (
        await session.execute(
            select(
                models.WorkerCredential.token_key_id, models.WorkerCredential.token_ciphertext
            ).where(models.WorkerCredential.id == credential_id)
        )
    ).first()
    return None if row is None else SealedToken(row.token_key_id, row.token_ciphertext)


async def sealed_not_under(session: AsyncSession, key_id: str) -> dict[str, SealedToken]:
    """The sealed token of every credential not encrypted under ``key_id``, by credential id."""
    rows = await session.execute(
        select(
            models.WorkerCredential.id,
            models.WorkerCredential.token_key_id,
            models.WorkerCredential.token_ciphertext,
        ).where(models.WorkerCredential.token_key_id != key_id)
    )
    return {row.id: SealedToken(row.token_key_id, row.token_ciphertext) for row in rows}


async def reseal(
    session: AsyncSession, credential_id: str, token: SealedToken, *, at: datetime
) -> None:
    """Store the same worker token sealed anew (key rotation)."""
    await session.execute(
        update(models.WorkerCredential)
        .where(models.WorkerCredential.id == credential_id)
        .values(token_key_id=token.key_id, token_ciphertext=token.ciphertext, updated_at=at)
    )


async def sealed_sample(session: AsyncSession) -> dict[str, SealedToken]:
    """One sealed token per key id in use (the credential with the lowest id), by credential id.

    Enough to tell whether the keyring has, and can use, every key the stored tokens need.
    """
    first = (
        select(func.min(models.WorkerCredential.id))
        .group_by(models.WorkerCredential.token_key_id)
        .scalar_subquery()
    )
    rows = await session.execute(
        select(
            models.WorkerCredential.id,
            models.WorkerCredential.token_key_id,
            models.WorkerCredential.token_ciphertext,
        ).where(models.WorkerCredential.id.in_(first))
    )
    return {row.id: SealedToken(row.token_key_id, row.token_ciphertext) for row in rows}
