"""Request and response bodies of the management API (the OpenAPI schema is built from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr, field_validator


class Input(BaseModel):
    """Request bodies: strict about what they accept.

    Unknown fields are refused so typos are not silently ignored, and NUL characters because
    PostgreSQL text cannot hold them.
    """

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:  # noqa: ANN401 - any field's value
        if _holds_nul(value):
            raise ValueError("must not contain NUL characters")
        return value


def _holds_nul(value: object) -> bool:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


class Output(BaseModel):
    """Response bodies read attributes from ``broker.domain`` records (or keys of dicts)."""

    model_config = ConfigDict(from_attributes=True)


class ErrorOut(BaseModel):
    """Every error of the management API."""

    error: str = Field(description="machine-readable code")
    message: str
    request_id: str | None = None


class OAuthErrorOut(BaseModel):
    """An error of the OAuth endpoints (RFC 6749 §5.2)."""

    error: str = Field(description="RFC 6749 error code, e.g. invalid_client")
    error_description: str


class UpstreamCreate(Input):
    """Register a Canvas instance."""

    name: str = Field(examples=["production"])
    base_url: str = Field(examples=["https://school.instructure.com"])


class UpstreamUpdate(Input):
    """Change an upstream."""

    name: str | None = None
    base_url: str | None = None
    enabled: bool | None = None


class UpstreamOut(Output):
    """An upstream."""

    id: str
    name: str
    base_url: str
    enabled: bool
    created_at: datetime
    updated_at: datetime


class DeveloperKeyIn(Input):
    """A Canvas developer key (API key) the broker authorises once and renews through."""

    client_id: str = Field(description="the key's Client ID in Canvas (digits)")
    client_secret: SecretStr = Field(description="the key's secret; never returned")
    scopes: list[str] | None = Field(
        default=None,
        description="the key's scope list as set in Canvas (when it enforces scopes): the "
        "authorisation asks for these, and client grants outside them are warned about",
    )


class CredentialCreate(Input):
    """Store a worker user's Canvas token, or a developer key to authorise (write-only).

    Exactly one of ``token`` and ``developer_key``.
    """

    upstream: str = Field(description="upstream id or name")
    name: str
    token: SecretStr | None = Field(
        default=None, description="the worker user's Canvas access token; never returned"
    )
    developer_key: DeveloperKeyIn | None = Field(
        default=None,
        description="an OAuth credential: usable once the worker user authorises it "
        "(POST /credentials/{ref}/authorize)",
    )
    canvas_user_id: str | None = None
    expires_at: AwareDatetime | None = None
    notes: str | None = Field(default=None, max_length=2000)
    verify: bool = Field(
        default=True,
        description="ask Canvas (GET /api/v1/users/self) before storing; false for offline setup",
    )
    rotate_every: int | str | None = Field(
        default=None,
        description="a manual token: regenerate it at Canvas on this schedule (seconds, 30d, "
        "12h or ISO 8601 such as P30D; at least an hour)",
        examples=["30d"],
    )


class CredentialUpdate(Input):
    """Change a credential's metadata."""

    canvas_user_id: str | None = None
    expires_at: AwareDatetime | None = None
    notes: str | None = Field(default=None, max_length=2000)
    key_scopes: list[str] | None = Field(
        default=None,
        description="an OAuth credential's developer-key scopes as now set in Canvas",
    )
    rotate_every: int | str | None = Field(
        default=None,
        description="regenerate the manual token on this schedule; null removes the schedule",
    )


class CredentialRotate(Input):
    """Replace the stored Canvas token, or have Canvas regenerate it."""

    token: SecretStr | None = Field(
        default=None, description="the new Canvas token; leave out with regenerate"
    )
    verify: bool = Field(
        default=True,
        description="ask Canvas (GET /api/v1/users/self) before storing; false for offline setup",
    )
    regenerate: bool = Field(
        default=False,
        description="have Canvas regenerate the stored manual token (its Access Tokens API) "
        "and store the new value; nothing changes if Canvas refuses",
    )


class CredentialOut(Output):
    """A credential's metadata; the token itself is never returned."""

    id: str
    name: str
    upstream_id: str
    upstream: str | None = None
    token_last4: str
    canvas_user_id: str | None
    canvas_user_name: str | None = Field(description="from Canvas when the token was verified")
    notes: str | None
    enabled: bool
    expires_at: datetime | None
    created_at: datetime
    rotated_at: datetime | None
    kind: str = Field(description="manual (a stored token) or oauth (a developer key's grant)")
    token_expires_at: datetime | None = Field(
        description="when the stored token stops working at Canvas (an OAuth access token, "
        "or a manual token's expiry read from Canvas's Access Tokens API)"
    )
    token_purpose: str | None = Field(
        default=None, description="a manual token's purpose, as Canvas records it"
    )
    canvas_token_id: str | None = Field(
        default=None, description="the manual token's id in Canvas's Access Tokens API"
    )
    rotate_every: int | None = Field(
        default=None, description="seconds between scheduled regenerations, or null"
    )
    rotate_due_at: datetime | None = Field(
        default=None, description="when the next scheduled regeneration is due"
    )
    rotate_error: str | None = Field(
        default=None, description="why the last scheduled regeneration failed, or null"
    )
    unavailable_reason: str | None = Field(
        description="why calls are refused with 503 credential_unavailable "
        "(not_authorized, refresh_refused), or null"
    )
    oauth: OAuthGrantOut | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="what needs an admin: a manual token expiring within 14 days, or one whose "
        "expiry Canvas did not tell",
    )


class OAuthGrantOut(Output):
    """An OAuth credential's developer key and grant state (never a secret)."""

    developer_key_id: str
    key_scopes: list[str] | None
    authorized: bool
    authorized_at: datetime | None
    refreshed_at: datetime | None
    refresh_error: str | None


class AuthorizationOut(Output):
    """An authorisation to complete once in a browser, as the worker user."""

    authorization_url: str = Field(description="open this once, signed in as the worker user")
    redirect_uri: str = Field(description="must be a redirect URI of the developer key")
    expires_at: datetime
    credential: CredentialOut


class ClaimPattern(Input):
    """A claim rule by regular expression: the whole value must match (never a prefix)."""

    pattern: str = Field(examples=["refs/heads/release/[0-9.]+"])


class TrustPolicy(Input):
    """A workload identity whose platform tokens the client accepts (docs/grants.md)."""

    issuer: str = Field(
        examples=["https://token.actions.githubusercontent.com"],
        description="the token's iss exactly; must be on the trusted-issuers list",
    )
    audience: str = Field(
        examples=["https://broker.example.edu"],
        description="a value the token's aud must hold (the audience the job asks for)",
    )
    claims: dict[str, str | ClaimPattern] = Field(
        examples=[{"sub": "repo:org/repo:ref:refs/heads/main", "environment": "production"}],
        description="claim rules, all of which must hold: an exact value, or "
        '{"pattern": …}; nested claims as "kubernetes.io/namespace"; one rule must pin an '
        "identity claim (sub, repository, project_path, kubernetes.io/serviceaccount/name…)",
    )


class TrustPolicyOut(Output):
    """A stored trust policy."""

    issuer: str
    audience: str
    claims: dict[str, str | dict[str, str]]


class ClientCreate(Input):
    """Create a client with a grant."""

    name: str
    credential: str = Field(description="credential id or name")
    scopes: list[str] = Field(
        examples=[["url:GET|/api/v1/courses/:course_id/assignments"]],
        description="Canvas scope strings, exactly as on a developer key",
    )
    constraints: dict[str, list[str]] = Field(
        default_factory=dict, examples=[{"course_id": ["1201"]}]
    )
    token_ttl: int = 900
    max_token_ttl: int = 3600
    allow_masquerade: bool = False
    allow_includes: bool = Field(
        default=False,
        description="may calls pass include[] / includes[] other than uuid (as Canvas's "
        "allow_includes on a developer key); refused with include_not_allowed otherwise",
    )
    allowed_cidrs: list[str] = Field(default_factory=list)
    rate_limit: float | None = Field(
        default=None, description="requests per second; null for no limit", examples=[5]
    )
    rate_burst: int | None = Field(
        default=None,
        description="calls allowed at once; defaults to max(1, ceil(rate_limit)), needs rate_limit",
        examples=[10],
    )
    canvas_weight: float = Field(
        default=1.0,
        description="weight in the credential's fair share of Canvas's rate limit, once its "
        "remaining capacity is under BROKER_CANVAS_RESERVE (docs/proxy-rules.md#canvas-capacity)",
        examples=[1.0],
    )
    auth_method: Literal["client_secret", "private_key_jwt", "workload_identity"] = Field(
        default="client_secret",
        description="client_secret (a secret is issued), private_key_jwt (RFC 7523: the "
        "script signs assertions with its own key; no secret exists) or workload_identity "
        "(no secret: tokens only in exchange for a platform's token, under trust_policies)",
    )
    jwks: dict[str, Any] | None = Field(
        default=None, description="public JWK Set verifying assertions; private_key_jwt only"
    )
    trust_policies: list[TrustPolicy] = Field(
        default_factory=list,
        description="workload identities whose platform tokens this client accepts in "
        "exchange for a proxy token (docs/interfaces.md#workload-identity-token-exchange)",
    )
    verify: bool = Field(
        default=True,
        description="fetch each trust policy's issuer's discovery document now; false for "
        "offline setup",
    )
    description: str | None = Field(default=None, max_length=2000)


class ClientUpdate(Input):
    """Change a client's grant or settings."""

    name: str | None = None
    scopes: list[str] | None = None
    constraints: dict[str, list[str]] | None = Field(
        default=None,
        description="replaces the constraints; left out, they are kept (and must fit new "
        "scopes); {} clears them",
    )
    token_ttl: int | None = None
    max_token_ttl: int | None = None
    allow_masquerade: bool | None = None
    allow_includes: bool | None = None
    allowed_cidrs: list[str] | None = None
    rate_limit: float | None = Field(
        default=None, description="requests per second; null removes the limit"
    )
    rate_burst: int | None = Field(
        default=None,
        description="calls allowed at once; a new rate_limit keeps the client's burst, or "
        "gets max(1, ceil(rate_limit)) if it had none",
    )
    canvas_weight: float | None = Field(
        default=None, description="weight in the credential's share of Canvas's rate limit"
    )
    jwks: dict[str, Any] | None = Field(
        default=None, description="replace the public JWK Set (private_key_jwt clients)"
    )
    trust_policies: list[TrustPolicy] | None = Field(
        default=None, description="replace the trust policies; [] removes them all"
    )
    verify: bool = Field(
        default=True,
        description="fetch the discovery document of each issuer a new trust policy names; "
        "false for offline setup",
    )
    description: str | None = Field(default=None, max_length=2000)


class CanvasShareOut(Output):
    """A client's part of its worker credential's Canvas rate limit (docs/proxy-rules.md)."""

    weight: float
    share: float = Field(
        description="fraction of the outflow while capacity is shared, among the clients "
        "asking in every process and replica"
    )
    asking: bool = Field(description="called within the sharing window, in any process")
    spent_per_second: float = Field(description="Canvas cost per second, averaged, everywhere")
    spent_total: float = Field(
        description="Canvas cost, summed over the processes serving the client now (each "
        "since it started)"
    )
    credential_remaining: float | None = Field(
        description="Canvas's remaining capacity for the credential, estimated now"
    )


class ClientOut(Output):
    """A client (never its secret)."""

    id: str
    client_id: str
    name: str
    credential_id: str
    scopes: list[str]
    constraints: dict[str, list[str]]
    token_ttl: int
    max_token_ttl: int
    allow_masquerade: bool
    allow_includes: bool
    allowed_cidrs: list[str]
    rate_limit: float | None
    rate_burst: int | None
    canvas_weight: float
    canvas_share: CanvasShareOut | None = Field(
        default=None,
        description="the client's share of its credential's Canvas capacity, as the answering "
        "process sees it (GET /clients/{id} only)",
    )
    auth_method: str
    jwks: dict[str, Any] | None
    trust_policies: list[TrustPolicyOut] = Field(
        default_factory=list, description="workload identities accepted in exchange"
    )
    description: str | None
    enabled: bool
    created_at: datetime
    updated_at: datetime
    secret_rotated_at: datetime | None


class ClientSaved(ClientOut):
    """A client just created or changed, with warnings about its grant."""

    warnings: list[str] = Field(
        default_factory=list,
        description="scopes that name no endpoint in Canvas's scope list (likely typos)",
    )


class FieldChange(BaseModel):
    """One field's value before and after a change."""

    old: Any
    new: Any


class ClientUpdated(ClientSaved):
    """A client just changed, and what changed."""

    changes: dict[str, FieldChange] = Field(
        description="each field whose value changed, old and new (empty when nothing did); "
        "a key set is shown as key_ids",
        examples=[{"token_ttl": {"old": 900, "new": 600}}],
    )
    tokens_revoked: int = Field(
        default=0,
        description="live tokens revoked because the change disabled the client; enabling it "
        "again revives none",
    )


class ClientWithSecret(ClientSaved):
    """A client with its secret: returned once, at creation or rotation."""

    client_secret: str | None = Field(
        description="null for private_key_jwt and workload_identity clients"
    )


class SecretRotate(Input):
    """Rotate a client secret."""

    revoke_tokens: bool = Field(default=False, description="also revoke every live token")


class PolicyCheck(Input):
    """A call to test against a client's grant."""

    method: str = Field(examples=["GET"])
    path: str = Field(examples=["/api/v1/courses/1201/assignments"])


class PolicyDecision(BaseModel):
    """Whether the call would be allowed, and the rule that decided."""

    allowed: bool
    rule: str = Field(description="the matching scope, or the refusal reason")
    scope: str | None
    reason: str | None
    detail: str


class TokenOut(Output):
    """A proxy token's metadata (never its value)."""

    id: str
    client_id: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None
    source_ip: str | None


class TokenValue(Input):
    """A proxy token's value, to act on the token without knowing its id."""

    token: SecretStr = Field(description="the token value (cbt_...); never echoed or recorded")


class RevokedCount(BaseModel):
    """How many tokens a bulk revocation revoked."""

    revoked: int


class AdminKeyCreate(Input):
    """Create a management key."""

    name: str
    role: Literal["admin", "auditor"]


class AdminKeyOut(Output):
    """A management key's metadata (never its value)."""

    id: str
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    created_by: str | None


class AdminKeyCreated(AdminKeyOut):
    """A new management key with its value: shown once."""

    key: str


class AuditEventOut(Output):
    """One audit event."""

    seq: int
    time: datetime
    request_id: str
    kind: str
    action: str
    state: str
    decision: str
    reason: str | None
    client_id: str | None
    token_id: str | None
    credential_id: str | None
    upstream: str | None
    actor_key_id: str | None
    source_ip: str | None
    user_agent: str | None
    method: str | None
    path: str | None
    query: str | None
    scope: str | None
    status: int | None
    upstream_status: int | None
    response_bytes: int | None
    duration_ms: float | None
    canvas_context_id: str | None
    details: dict[str, Any] | None
    completed_at: datetime | None
    completion_seq: int | None = Field(
        default=None,
        description="seq of the event that recorded the call's outcome; null while pending",
    )


class AuditPage(BaseModel):
    """A newest-first page of audit events."""

    events: list[AuditEventOut]
    next_cursor: str | None


class ChainHeadOut(BaseModel):
    """The signed head of the audit chain: keep a copy outside the broker."""

    seq: int
    mac: str


class CheckpointOut(BaseModel):
    """The signed stand-in for events removed by retention."""

    through_seq: int
    events_pruned: int
    incomplete_pruned: int
    created_at: datetime
    key: str | None


class IncompleteOut(BaseModel):
    """Calls committed as pending whose outcome was never recorded."""

    count: int
    oldest: list[int] = Field(description="seqs of the oldest ones (at most 10)")


class ChainProblemOut(BaseModel):
    """The first place where the log is not what the broker wrote."""

    seq: int
    kind: Literal["modified", "inserted", "missing", "reordered", "unknown_key"]
    detail: str


class EarlierHeadOut(BaseModel):
    """The earlier head given to verify, and whether the log still holds its event."""

    seq: int
    mac: str
    found: Literal["in_chain", "pruned"] | None = Field(
        description="in_chain: the same event (or the checkpoint ending at it); pruned: "
        "removed by retention since, not comparable; null when the check failed"
    )


class AuditVerification(BaseModel):
    """The result of verifying the audit chain; ``ok`` false names the first ``problem``."""

    ok: bool
    checked: int = Field(description="events whose MAC and link were checked")
    first_seq: int | None
    last_seq: int | None
    head: ChainHeadOut | None
    checkpoint: CheckpointOut | None
    incomplete: IncompleteOut
    problem: ChainProblemOut | None
    keys: list[str] = Field(description="ids of the keyring keys that signed the events checked")
    earlier_head: EarlierHeadOut | None = None


class AuditHashRequest(Input):
    """A value to look for in the audit log (for example a leaked token)."""

    value: SecretStr = Field(min_length=1, max_length=8192)


class AuditHashes(BaseModel):
    """The value's keyed HMAC under every key, by key id, as the log would show it."""

    hashes: dict[str, str]


class AuditPruneRequest(Input):
    """Retention: remove events older than ``before``."""

    before: AwareDatetime
    dry_run: bool = Field(
        default=False, description="say what would be pruned and verify it; change nothing"
    )


class AuditPruneOut(BaseModel):
    """What a prune removed, and the checkpoint that now stands in for it."""

    before: datetime
    pruned: int
    through_seq: int
    incomplete_pruned: int
    checkpoint: CheckpointOut | None
    seq: int | None = Field(
        description="seq of the admin event recording this prune (null for a dry run)"
    )
    dry_run: bool = Field(default=False, description="true: nothing was changed")


class IssuerCreate(Input):
    """Put a workload identity issuer on the allowlist."""

    issuer: str = Field(
        examples=["https://token.actions.githubusercontent.com"],
        description="the issuer URL exactly as its tokens' iss names it (https)",
    )
    description: str | None = Field(default=None, max_length=2000)
    verify: bool = Field(
        default=True,
        description="fetch its discovery document and keys now; false for offline setup",
    )


class IssuerOut(Output):
    """An issuer on the allowlist."""

    id: str
    issuer: str
    description: str | None
    created_at: datetime
    created_by: str | None = Field(description="the admin key that added it")


class IssuerRemoved(IssuerOut):
    """An issuer taken off the allowlist, and the clients whose policies name it."""

    clients: list[str] = Field(
        description="clients with a trust policy for this issuer: refused until it is back"
    )
