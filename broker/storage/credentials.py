"""Worker credentials in the database. Flushes, never commits.

Lookups return metadata (``domain.WorkerCredential``); the sealed token leaves storage only
through ``sealed_not_under``, for re-encryption under a new key, and ``sealed_sample``, for
the readiness check that the keyring can decrypt what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final

from sqlalchemy import func, or_, select, update

from broker.domain import WorkerCredential
from broker.storage import models
from broker.storage.leases import Lease
from broker.storage.lookup import apply, row_by_ref, rows_by_name

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy import ColumnElement
    from sqlalchemy.ext.asyncio import AsyncSession

UPDATABLE: Final = frozenset(
    {
        "notes",
        "expires_at",
        "canvas_user_id",
        "canvas_user_name",
        "enabled",
        "updated_at",
        "rotate_every",
        "rotate_due_at",
    }
)
_LIFECYCLE: Final = (
    "token_purpose",
    "canvas_token_id",
    "rotate_every",
    "rotate_due_at",
    "rotate_error",
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
        **{name: getattr(row, name) for name in _LIFECYCLE},
    )


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What Canvas's Access Tokens API says of a manual token: its id, expiry and purpose.

    All None when Canvas did not say (the token stored unverified, or the API not answering).
    """

    canvas_token_id: str | None = None
    expires_at: datetime | None = None
    purpose: str | None = None


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
        **{name: getattr(credential, name) for name in _LIFECYCLE},
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
    canvas_record: TokenRecord | None = None,
) -> WorkerCredential:
    """Store a new worker token (a rotation in Canvas): sealed, its last four, rotated ``at``.

    ``canvas_user`` (id, name), when the new token was verified, replaces the recorded user.
    ``canvas_record`` is the new token's record in Canvas (unknown if None): the old token's
    expiry, purpose and id no longer apply. The next scheduled rotation is due
    ``rotate_every`` after ``at``, and a rotation lease held is released.
    """
    row = await row_by_ref(session, models.WorkerCredential, ref, "credential")
    row.token_key_id, row.token_ciphertext = token.key_id, token.ciphertext
    row.token_last4 = last4
    if canvas_user is not None:
        row.canvas_user_id, row.canvas_user_name = canvas_user
    facts = canvas_record or TokenRecord()
    row.canvas_token_id = facts.canvas_token_id
    row.token_expires_at = facts.expires_at
    row.token_purpose = facts.purpose
    every = row.rotate_every
    row.rotate_due_at = None if every is None else at + timedelta(seconds=every)
    row.rotate_error = None
    row.rotate_lease_holder = row.rotate_lease_until = None
    row.rotated_at = row.updated_at = at
    await session.flush()
    return record(row)


async def unavailable(session: AsyncSession, now: datetime) -> list[tuple[str, str]]:
    """(name, reason) of every enabled credential whose calls are refused until an admin acts."""
    credential = models.WorkerCredential
    rows = await session.execute(
        select(credential.name, credential.unavailable_reason, credential.kind)
        .where(
            credential.enabled.is_(True),
            or_(credential.unavailable_reason.is_not(None), credential.token_expires_at <= now),
        )
        .order_by(credential.name)
    )
    # A manual token past its expiry at Canvas is refused as credential_expired.
    expired = {models.MANUAL: "credential_expired"}
    return [
        (row.name, row.unavailable_reason or expired.get(row.kind, "token_expired")) for row in rows
    ]


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


# Scheduled rotation of manual tokens (services.manual_tokens) ----------------------------------


def _schedulable() -> list[ColumnElement[bool]]:
    credential = models.WorkerCredential
    return [
        credential.enabled.is_(True),
        credential.kind == models.MANUAL,
        credential.rotate_every.is_not(None),
        credential.rotate_due_at.is_not(None),
    ]


async def rotation_due(session: AsyncSession, now: datetime) -> list[str]:
    """Enabled manual credentials whose scheduled rotation is due at ``now``, by id."""
    rows = await session.scalars(
        select(models.WorkerCredential.id).where(
            *_schedulable(), models.WorkerCredential.rotate_due_at <= now
        )
    )
    return list(rows)


async def next_rotation(session: AsyncSession) -> datetime | None:
    """The earliest scheduled rotation of an enabled manual credential."""
    due: datetime | None = await session.scalar(
        select(func.min(models.WorkerCredential.rotate_due_at)).where(*_schedulable())
    )
    return due


ROTATION_LEASE = Lease(
    key=models.WorkerCredential.id,
    holder=models.WorkerCredential.rotate_lease_holder,
    until=models.WorkerCredential.rotate_lease_until,
    due=models.WorkerCredential.rotate_due_at,
)
"""A manual token's regeneration lease: ``take`` it before asking Canvas."""


async def release_rotation(
    session: AsyncSession,
    credential_id: str,
    *,
    holder: str,
    error: str | None,
    retry_at: datetime | None,
) -> None:
    """Give the lease up without a new token: the rotation failed (``error``), try at ``retry_at``.

    A ``retry_at`` of None keeps the due time as it is.
    """
    values: dict[str, object] = {
        "rotate_lease_holder": None,
        "rotate_lease_until": None,
        "rotate_error": None if error is None else error[:255],
    }
    if retry_at is not None:
        values["rotate_due_at"] = retry_at
    await session.execute(
        update(models.WorkerCredential)
        .where(
            models.WorkerCredential.id == credential_id,
            models.WorkerCredential.rotate_lease_holder == holder,
        )
        .values(**values)
    )
