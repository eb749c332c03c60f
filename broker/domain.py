"""What storage hands to services and services to the API: the broker's resources as values.

Frozen, typed and free of SQLAlchemy, so no database row (and no lazy load or stray write)
travels past ``broker.storage``. Records hold metadata only: a worker credential's token and
its ciphertext, a client's secret hash, a proxy token's or admin key's keyed hash stay in
storage, which returns them only to the functions that verify or decrypt them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """A Canvas instance the broker forwards to."""

    id: str
    name: str
    base_url: str
    enabled: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerCredential:
    """A worker user's Canvas access token, as metadata: never the token or its ciphertext."""

    id: str
    name: str
    upstream_id: str
    token_last4: str
    canvas_user_id: str | None
    canvas_user_name: str | None
    notes: str | None
    enabled: bool
    expires_at: datetime | None
    created_at: datetime
    rotated_at: datetime | None
    updated_at: datetime
    kind: str = "manual"
    token_expires_at: datetime | None = None
    unavailable_reason: str | None = None
    token_purpose: str | None = None
    canvas_token_id: str | None = None
    rotate_every: int | None = None
    rotate_due_at: datetime | None = None
    rotate_error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthGrant:
    """An OAuth worker credential's developer key and grant, as metadata (never a secret)."""

    credential_id: str
    developer_key_id: str
    key_scopes: tuple[str, ...] | None
    authorized: bool
    authorized_at: datetime | None
    refreshed_at: datetime | None
    refresh_error: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Client:
    """One automation job's identity and grant (never its secret hash).

    ``grant_version`` moves with every change, so what is compiled from the grant can be
    cached per version.
    """

    id: str
    name: str
    credential_id: str
    auth_method: str
    jwks: Mapping[str, Any] | None
    scopes: tuple[str, ...]
    constraints: Mapping[str, tuple[str, ...]]
    token_ttl: int
    max_token_ttl: int
    allow_masquerade: bool
    allow_includes: bool
    allowed_cidrs: tuple[str, ...]
    rate_limit: float | None
    rate_burst: int | None
    canvas_weight: float
    description: str | None
    enabled: bool
    grant_version: int
    created_at: datetime
    updated_at: datetime
    secret_rotated_at: datetime | None
    # Workload identities accepted in exchange for a proxy token (core.workload).
    trust_policies: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustedIssuer:
    """An issuer of workload identity tokens on the instance's allowlist."""

    id: str
    issuer: str
    description: str | None
    created_at: datetime
    created_by: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyToken:
    """A proxy token's metadata (never its value or keyed hash)."""

    id: str
    client_id: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None
    source_ip: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminKey:
    """A management key's metadata (never its value or keyed hash)."""

    id: str
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    created_by: str | None


@dataclass(frozen=True, slots=True)
class CanvasDemand:
    """One process's demand on a worker credential's Canvas bucket, for one of its clients.

    What the processes of a broker share (``services.canvas_capacity``): rates in units a
    second, ``remaining``/``seen_at``/``ceiling`` the process's last sight of the bucket (if
    any), times in epoch seconds.
    """

    holder: str
    credential_id: str
    client_id: str
    weight: float
    asked: float
    spent: float
    spent_total: float
    in_flight: int
    asking: bool
    remaining: float | None
    seen_at: float | None
    ceiling: float | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class RateBucket:
    """A client's token bucket: ``tokens`` left after the last allowed call at ``updated_at``.

    ``updated_at`` is in epoch seconds (``services.ratelimit``).
    """

    tokens: float
    updated_at: float
