"""Clients in the database. Flushes, never commits.

Lookups return ``domain.Client``, without the secret hash; only ``with_secret_hash`` (client
authentication) reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from broker.domain import Client
from broker.storage import models
from broker.storage.lookup import apply, row_by_ref, rows_by_name

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession

SETTINGS: Final = (
    "name",
    "scopes",
    "constraints",
    "token_ttl",
    "max_token_ttl",
    "allow_masquerade",
    "allow_includes",
    "allowed_cidrs",
    "rate_limit",
    "rate_burst",
    "canvas_weight",
    "jwks",
    "trust_policies",
    "description",
    "enabled",
)
"""The client fields an admin may change, in the order changes are reported."""

UPDATABLE: Final = frozenset({*SETTINGS, "grant_version", "updated_at"})
_LISTS: Final = frozenset({"scopes", "allowed_cidrs"})


def record(row: models.Client) -> Client:
    """The client a row holds."""
    return Client(
        id=row.id,
        name=row.name,
        credential_id=row.credential_id,
        auth_method=row.auth_method,
        jwks=row.jwks,
        scopes=tuple(row.scopes),
        constraints={name: tuple(values) for name, values in row.constraints.items()},
        token_ttl=row.token_ttl,
        max_token_ttl=row.max_token_ttl,
        allow_masquerade=row.allow_masquerade,
        allow_includes=row.allow_includes,
        allowed_cidrs=tuple(row.allowed_cidrs),
        rate_limit=row.rate_limit,
        rate_burst=row.rate_burst,
        canvas_weight=row.canvas_weight,
        description=row.description,
        enabled=row.enabled,
        grant_version=row.grant_version,
        created_at=row.created_at,
        updated_at=row.updated_at,
        secret_rotated_at=row.secret_rotated_at,
        trust_policies=tuple(row.trust_policies or ()),
    )


def _json(column: str, value: Any) -> Any:  # noqa: ANN401 - a column's value
    """``value`` as its JSON column stores it (lists, not tuples)."""
    if column in _LISTS:
        return list(value)
    if column == "constraints":
        return {name: list(values) for name, values in value.items()}
    if column == "jwks" and value is not None:
        return dict(value)
    if column == "trust_policies":
        return [dict(policy) for policy in value] or None
    return value


async def get(session: AsyncSession, ref: str) -> Client:
    """The client with this id or name, or ``NotFoundError``."""
    return record(await row_by_ref(session, models.Client, ref, "client"))


async def find(session: AsyncSession, client_id: str) -> Client | None:
    """The client with this id, if any (names are not looked at)."""
    row = await session.get(models.Client, client_id)
    return None if row is None else record(row)


async def with_secret_hash(
    session: AsyncSession, client_id: str
) -> tuple[Client, str | None] | None:
    """The client with this id and its secret hash (None if it has no secret), if any.

    For client authentication only, which compares the hash and drops it.
    """
    row = await session.get(models.Client, client_id)
    return None if row is None else (record(row), row.secret_hash)


async def all_by_name(session: AsyncSession) -> list[Client]:
    """Every client, by name."""
    return [record(row) for row in await rows_by_name(session, models.Client)]


async def add(session: AsyncSession, client: Client, *, secret_hash: str | None) -> Client:
    """Insert a new client (a taken name raises ``IntegrityError`` here)."""
    row = models.Client(
        id=client.id,
        name=client.name,
        credential_id=client.credential_id,
        secret_hash=secret_hash,
        auth_method=client.auth_method,
        jwks=_json("jwks", client.jwks),
        trust_policies=_json("trust_policies", client.trust_policies),
        scopes=_json("scopes", client.scopes),
        constraints=_json("constraints", client.constraints),
        token_ttl=client.token_ttl,
        max_token_ttl=client.max_token_ttl,
        allow_masquerade=client.allow_masquerade,
        allow_includes=client.allow_includes,
        allowed_cidrs=_json("allowed_cidrs", client.allowed_cidrs),
        rate_limit=client.rate_limit,
        rate_burst=client.rate_burst,
        canvas_weight=client.canvas_weight,
        description=client.description,
        enabled=client.enabled,
        grant_version=client.grant_version,
        created_at=client.created_at,
        updated_at=client.updated_at,
        secret_rotated_at=client.secret_rotated_at,
    )
    session.add(row)
    await session.flush()
    return record(row)


async def change(
    session: AsyncSession,
    client_id: str,
    changes: Mapping[str, Any],
    *,
    new_grant: bool = False,
) -> Client:
    """Change the columns ``changes`` names (of ``UPDATABLE``); returns the client now.

    ``new_grant`` moves ``grant_version`` on by one in the database itself
    (``grant_version + 1``), so two concurrent changes never end at the same version and a
    grant compiled for one is never cached as the other's.
    """
    row = await row_by_ref(session, models.Client, client_id, "client")
    apply(row, {k: _json(k, v) for k, v in changes.items()}, UPDATABLE)
    if new_grant:
        row.grant_version = models.Client.grant_version + 1
    await session.flush()
    if new_grant:
        await session.refresh(row, ["grant_version"])
    return record(row)


async def replace_secret_hash(
    session: AsyncSession, client_id: str, secret_hash: str, *, at: datetime
) -> Client:
    """Store a new client secret's hash, rotated ``at``."""
    row = await row_by_ref(session, models.Client, client_id, "client")
    row.secret_hash = secret_hash
    row.secret_rotated_at = row.updated_at = at
    await session.flush()
    return record(row)
