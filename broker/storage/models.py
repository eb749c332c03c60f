"""SQLAlchemy 2.0 models. Alembic migrations in ``migrations/`` must match these exactly."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(
        self,
        value: datetime | None,
        dialect: Dialect,  # noqa: ARG002 - part of the TypeDecorator interface
    ) -> datetime | None:
        """Store naive UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(
        self,
        value: datetime | None,
        dialect: Dialect,  # noqa: ARG002 - part of the TypeDecorator interface
    ) -> datetime | None:
        """Return aware UTC."""
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)


# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
SeqType = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base with a naming convention Alembic can reproduce."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: dict[Any, Any] = {datetime: UTCDateTime()}  # noqa: RUF012


class Upstream(Base):
    """A Canvas instance the broker forwards to."""

    __tablename__ = "upstreams"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    base_url: Mapped[str] = mapped_column(String(500))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


# Kinds of worker credential.
MANUAL = "manual"
OAUTH = "oauth"


class WorkerCredential(Base):
    """A Canvas access token of a restricted worker user, encrypted at rest."""

    __tablename__ = "credentials"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    upstream_id: Mapped[str] = mapped_column(ForeignKey("upstreams.id"), index=True)
    token_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    token_key_id: Mapped[str] = mapped_column(String(40))
    token_last4: Mapped[str] = mapped_column(String(4))
    canvas_user_id: Mapped[str | None] = mapped_column(String(100))
    # Recorded from Canvas's GET /api/v1/users/self when the token was verified.
    canvas_user_name: Mapped[str | None] = mapped_column(String(255))
    notes: Mapped[str | None] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    rotated_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    # "manual" (an admin stored the token) or "oauth" (a developer key's grant: the token
    # above is then Canvas's current short-lived access token, renewed by the broker).
    kind: Mapped[str] = mapped_column(String(16), default=MANUAL, server_default=MANUAL)
    # When the stored token itself stops working at Canvas (an OAuth access token's expiry).
    token_expires_at: Mapped[datetime | None]
    # Set when the credential cannot be used until an admin acts (not yet authorised, or
    # Canvas refused a refresh): calls are refused with 503 credential_unavailable.
    unavailable_reason: Mapped[str | None] = mapped_column(String(64))
    # A manual token's record in Canvas's Access Tokens API, read when it was stored
    # (docs/interfaces.md#manual-tokens-with-a-lifecycle): its purpose and its id, by which
    # the broker regenerates it.
    token_purpose: Mapped[str | None] = mapped_column(String(255))
    canvas_token_id: Mapped[str | None] = mapped_column(String(40))
    # An optional rotation schedule (seconds between regenerations) and when the next is due;
    # the lease makes a scheduled regeneration happen once across processes and replicas.
    rotate_every: Mapped[int | None] = mapped_column(Integer)
    rotate_due_at: Mapped[datetime | None]
    rotate_error: Mapped[str | None] = mapped_column(String(255))
    rotate_lease_holder: Mapped[str | None] = mapped_column(String(64))
    rotate_lease_until: Mapped[datetime | None]


class OAuthGrant(Base):
    """An OAuth worker credential's developer key and refresh token, both encrypted.

    ``lease_holder``/``lease_until`` make a refresh happen once across every process and
    replica: a refresher takes the lease with one conditional UPDATE, talks to Canvas, and
    stores the new access token (docs/interfaces.md#oauth-worker-credentials).
    """

    __tablename__ = "credential_oauth"

    credential_id: Mapped[str] = mapped_column(ForeignKey("credentials.id"), primary_key=True)
    developer_key_id: Mapped[str] = mapped_column(String(100))
    secret_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    secret_key_id: Mapped[str] = mapped_column(String(40))
    refresh_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    refresh_key_id: Mapped[str | None] = mapped_column(String(40))
    # The developer key's scope list as the admin recorded it (JSON list), or null.
    key_scopes: Mapped[list[str] | None] = mapped_column(JSON)
    authorized_at: Mapped[datetime | None]
    refreshed_at: Mapped[datetime | None]
    # When the current access token should be renewed (a margin before it expires).
    refresh_due_at: Mapped[datetime | None]
    refresh_error: Mapped[str | None] = mapped_column(String(255))
    lease_holder: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]


class OAuthState(Base):
    """One authorisation in progress: its ``state`` (keyed hash) and PKCE verifier (sealed)."""

    __tablename__ = "oauth_states"

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    credential_id: Mapped[str] = mapped_column(ForeignKey("credentials.id"), index=True)
    verifier_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    verifier_key_id: Mapped[str] = mapped_column(String(40))
    redirect_uri: Mapped[str] = mapped_column(String(500))
    created_by: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


# How a client authenticates at the token endpoint.
CLIENT_SECRET = "client_secret"  # noqa: S105 - a method name, not a secret
PRIVATE_KEY_JWT = "private_key_jwt"
WORKLOAD_IDENTITY = "workload_identity"  # no secret: tokens only by exchange (trust policies)


class Client(Base):
    """One automation job's identity and grant."""

    __tablename__ = "clients"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    credential_id: Mapped[str] = mapped_column(ForeignKey("credentials.id"), index=True)
    # Null for private_key_jwt clients, which hold no shared secret.
    secret_hash: Mapped[str | None] = mapped_column(String(64))
    auth_method: Mapped[str] = mapped_column(
        String(32), default=CLIENT_SECRET, server_default=CLIENT_SECRET
    )
    # Public JWK Set verifying private_key_jwt assertions.
    jwks: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Workload identities whose platform tokens this client accepts in exchange
    # (core.workload.check_policies); null or empty: none.
    trust_policies: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    constraints: Mapped[dict[str, list[str]]] = mapped_column(JSON)
    token_ttl: Mapped[int] = mapped_column(Integer)
    max_token_ttl: Mapped[int] = mapped_column(Integer)
    allow_masquerade: Mapped[bool] = mapped_column(Boolean, default=False)
    # Whether calls may pass include[] other than uuid (Canvas's allow_includes on a key).
    allow_includes: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    allowed_cidrs: Mapped[list[str]] = mapped_column(JSON)
    # Requests per second and bucket size; both null when the client is not rate limited.
    rate_limit: Mapped[float | None]
    rate_burst: Mapped[int | None] = mapped_column(Integer)
    # The client's weight in its credential's fair share of Canvas's rate limit.
    canvas_weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    description: Mapped[str | None] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    grant_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    secret_rotated_at: Mapped[datetime | None]


class ProxyToken(Base):
    """A short-lived bearer token minted for a client; only its keyed hash is stored."""

    __tablename__ = "proxy_tokens"
    __table_args__ = (Index("ix_proxy_tokens_client_live", "client_id", "expires_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id"))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    revoked_by: Mapped[str | None] = mapped_column(String(100))
    source_ip: Mapped[str | None] = mapped_column(String(64))


class RateBucket(Base):
    """A client's token bucket, shared by every replica (docs/storage-and-keys.md).

    ``tokens`` is what was left after the last allowed call at ``updated_at`` (epoch
    seconds); the bucket refills at the client's ``rate_limit`` up to ``rate_burst``.
    """

    __tablename__ = "rate_buckets"

    client_id: Mapped[str] = mapped_column(
        ForeignKey("clients.id", ondelete="CASCADE"), primary_key=True
    )
    tokens: Mapped[float]
    updated_at: Mapped[float]


class AdminKey(Base):
    """A management API key with role ``admin`` or ``auditor``."""

    __tablename__ = "admin_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(20))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    created_by: Mapped[str | None] = mapped_column(String(40))


class AuditEventRow(Base):
    """One record per proxied call, refusal, token event or admin action (docs/audit.md).

    A forwarded call is written ``pending`` and committed before it is sent upstream; its
    outcome is a second event whose ``completes`` names the first. A pending event with no
    completion marks a call whose outcome was never recorded (for example a crash), never a
    silent gap. Events are never updated: each is a link of the MAC chain
    (``broker.core.audit_chain``), and ``seq`` is assigned by the chain's writer.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        # Completion events are reached through what they complete, never by time or client:
        # the indexes that review filters use leave them out (cheaper appends).
        Index(
            "ix_audit_events_time",
            "time",
            sqlite_where=text("completes IS NULL"),
            postgresql_where=text("completes IS NULL"),
        ),
        Index(
            "ix_audit_events_client_seq",
            "client_id",
            "seq",
            sqlite_where=text("client_id IS NOT NULL"),
            postgresql_where=text("client_id IS NOT NULL"),
        ),
        # The console and review follow one request id to its events (bench/README.md).
        Index(
            "ix_audit_events_request_id",
            "request_id",
            sqlite_where=text("completes IS NULL"),
            postgresql_where=text("completes IS NULL"),
        ),
        # Only completion events have ``completes``: index just those (cheaper appends).
        Index(
            "ix_audit_events_completes",
            "completes",
            sqlite_where=text("completes IS NOT NULL"),
            postgresql_where=text("completes IS NOT NULL"),
        ),
    )

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    time: Mapped[datetime]
    request_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    decision: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str | None] = mapped_column(String(64))
    client_id: Mapped[str | None] = mapped_column(String(40))
    token_id: Mapped[str | None] = mapped_column(String(40))
    credential_id: Mapped[str | None] = mapped_column(String(40))
    upstream: Mapped[str | None] = mapped_column(String(100))
    actor_key_id: Mapped[str | None] = mapped_column(String(40))
    source_ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(500))
    method: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str | None] = mapped_column(Text)
    query: Mapped[str | None] = mapped_column(Text)
    scope: Mapped[str | None] = mapped_column(Text)
    status: Mapped[int | None] = mapped_column(Integer)
    upstream_status: Mapped[int | None] = mapped_column(Integer)
    response_bytes: Mapped[int | None] = mapped_column(BigInteger)
    duration_ms: Mapped[float | None]
    canvas_context_id: Mapped[str | None] = mapped_column(String(100))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    completed_at: Mapped[datetime | None]
    # The pending event this one completes (completion events only).
    completes: Mapped[int | None] = mapped_column(BigInteger)
    # The chain: predecessor's MAC, this event's MAC, and the keyring id of the MAC key.
    prev_mac: Mapped[str | None] = mapped_column(String(64))
    mac: Mapped[str | None] = mapped_column(String(64))
    mac_key: Mapped[str | None] = mapped_column(String(40))


class AuditHead(Base):
    """The one row recording the newest event of the audit chain, signed (docs/audit.md).

    Writers lock it to append, so every process extends one chain; its MAC makes events cut
    off the end of the log show up in verification.
    """

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    last_mac: Mapped[str] = mapped_column(String(64))
    mac_key: Mapped[str | None] = mapped_column(String(40))
    mac: Mapped[str | None] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """Signed stand-in for audit events removed by retention (``broker audit prune``)."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    through_seq: Mapped[int] = mapped_column(BigInteger)
    through_mac: Mapped[str] = mapped_column(String(64))
    events_pruned: Mapped[int] = mapped_column(BigInteger)
    incomplete_pruned: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime]
    mac_key: Mapped[str] = mapped_column(String(40))
    mac: Mapped[str] = mapped_column(String(64))


class ConsoleSession(Base):
    """A signed-in session of the security console (docs/interfaces.md#security-console).

    Stored as the keyed hash of its id, never the id itself; the admin key it was opened with
    decides its role on every request, so revoking the key ends the session.
    """

    __tablename__ = "console_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    admin_key_id: Mapped[str] = mapped_column(ForeignKey("admin_keys.id"), index=True)
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    source_ip: Mapped[str | None] = mapped_column(String(64))


class RevocationEpoch(Base):
    """A counter bumped by every change that can make a cached proxy token unusable.

    Replicas poll it to drop their token caches: revocation reaches every replica within 1 s
    (docs/storage-and-keys.md#revocation).
    """

    __tablename__ = "revocation_epoch"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    epoch: Mapped[int] = mapped_column(BigInteger)


class UsedAssertion(Base):
    """A ``private_key_jwt`` assertion id already accepted, kept until it expires (replay)."""

    __tablename__ = "used_assertions"

    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id"), primary_key=True)
    jti: Mapped[str] = mapped_column(String(200), primary_key=True)
    expires_at: Mapped[datetime]


class TrustedIssuer(Base):
    """An issuer of workload identity tokens that trust policies may name (admins only)."""

    __tablename__ = "trusted_issuers"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    issuer: Mapped[str] = mapped_column(String(500), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    created_by: Mapped[str | None] = mapped_column(String(40))


class UsedSubjectToken(Base):
    """A platform token's ``jti`` already exchanged, kept until the token expires (replay).

    Keyed by a hash of issuer and ``jti``, so one token is exchanged once whichever client
    it is presented for, on every replica.
    """

    __tablename__ = "used_subject_tokens"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class CanvasDemand(Base):
    """One process's demand on a worker credential's Canvas bucket, per client.

    Each process of each replica (``holder``) rewrites its rows twice a second and reads the
    others' fresh ones (docs/proxy-rules.md#canvas-capacity). Times are epoch seconds.
    No foreign keys: a row outlives neither a few seconds nor its process, and a client or
    credential deleted meanwhile must not make a publication fail.
    """

    __tablename__ = "canvas_demand"

    holder: Mapped[str] = mapped_column(String(64), primary_key=True)
    credential_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    weight: Mapped[float]
    asked: Mapped[float]
    spent: Mapped[float]
    spent_total: Mapped[float]
    in_flight: Mapped[int]
    asking: Mapped[bool]
    remaining: Mapped[float | None]
    seen_at: Mapped[float | None]
    ceiling: Mapped[float | None]
    updated_at: Mapped[float] = mapped_column(index=True)
