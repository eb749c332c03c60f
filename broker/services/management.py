"""Management use cases for admins: upstreams, worker credentials, clients, tokens, admin keys.

Every mutation writes its audit event in the same transaction as the change, naming the actor
key and what changed, never a secret.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from sqlalchemy.exc import IntegrityError

from broker.core import rules
from broker.core.assertions import public_key_set
from broker.core.catalogue import unfamiliar_scopes
from broker.core.scopes import Decision, Grant
from broker.core.tokens import SecretKind, check_secret, generate_secret, new_id
from broker.core.workload import PolicyError, check_issuer_url, check_policies, issuers_of
from broker.domain import (
    AdminKey,
    Client,
    OAuthGrant,
    ProxyToken,
    TrustedIssuer,
    Upstream,
    WorkerCredential,
)
from broker.errors import (
    ConflictError,
    InvalidKeySetError,
    MalformedSecretError,
    NotFoundError,
    Refusal,
    ScopeError,
    ValidationFailedError,
)
from broker.requestid import current_request_facts, current_request_id
from broker.services.audit import add_events, admin_event
from broker.services.canvas_identity import CanvasUser, verifying_forwarder, whoami
from broker.services.issuer_keys import IssuerKeys, IssuerUnavailableError
from broker.services.manual_tokens import lookup_warning, parse_rotate_every, read_record
from broker.services.ratelimit import default_burst
from broker.services.revocation import CacheEpoch, bump_revocation_epoch
from broker.services.tokens import WORKER_TOKEN_PURPOSE
from broker.services.worker_oauth import DEVELOPER_KEY_PURPOSE
from broker.storage import (
    admin_keys,
    clients,
    credentials,
    oauth_grants,
    proxy_tokens,
    rate_buckets,
    trusted_issuers,
    upstreams,
)
from broker.storage.credentials import SealedToken, TokenRecord
from broker.storage.models import (
    CLIENT_SECRET,
    OAUTH,
    PRIVATE_KEY_JWT,
    WORKLOAD_IDENTITY,
    utcnow,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.config import Settings
    from broker.keyring import Keyring
    from broker.services.manual_tokens import ManualTokenService
    from broker.upstream import Forwarder

ROLES = ("admin", "auditor")
DEFAULT_TOKEN_TTL = 900
DEFAULT_MAX_TOKEN_TTL = 3600
MIN_TOKEN_TTL = 60
MIN_WORKER_TOKEN_LENGTH = 16
MAX_WORKER_TOKEN_LENGTH = 4096
MAX_RATE_LIMIT = 100_000.0
MAX_RATE_BURST = 1_000_000
# Host names, IPv4 and (bracket-less, as urlsplit returns them) IPv6 addresses.
_HOST = re.compile(r"[A-Za-z0-9.:-]+")
_DEVELOPER_KEY_ID = re.compile(r"[0-9]{1,50}(~[0-9]{1,49})?")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_UNSET: Any = object()


@dataclass(frozen=True)
class Actor:
    """Who performs a management action: an admin key, or the local CLI (``key_id`` None)."""

    key_id: str | None
    role: str

    @property
    def label(self) -> str:
        """How the actor appears in ``revoked_by`` fields."""
        return f"admin-key:{self.key_id}" if self.key_id else "local-cli"


def check_name(name: str) -> str:
    """Names are short identifiers usable in URLs and CLI arguments."""
    if not _NAME.match(name):
        raise ValidationFailedError(
            "name", "use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_base_url(url: str) -> str:
    """An upstream base URL: http(s) origin, no path, query, fragment or credentials."""
    parts = urlsplit(url.strip())
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValidationFailedError("base_url", "must be an absolute http(s) URL")
    if not _HOST.fullmatch(parts.hostname):
        raise ValidationFailedError("base_url", "has a host name with characters URLs do not allow")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValidationFailedError("base_url", "has a port that is not 0-65535") from exc
    if parts.username or parts.password:
        raise ValidationFailedError("base_url", "must not contain credentials")
    if parts.path not in {"", "/"} or parts.query or parts.fragment:
        raise ValidationFailedError("base_url", "must be the Canvas origin, without a path")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def check_worker_token(token: str, field: str = "token") -> str:
    """A Canvas access token (or developer-key secret): printable, no whitespace, bounded."""
    # Canvas tokens are far longer; a short one would be all but shown by ``token_last4``.
    if not MIN_WORKER_TOKEN_LENGTH <= len(token) <= MAX_WORKER_TOKEN_LENGTH:
        raise ValidationFailedError(
            field,
            f"must be {MIN_WORKER_TOKEN_LENGTH} to {MAX_WORKER_TOKEN_LENGTH} characters long",
        )
    if not token.isascii() or not token.isprintable():
        raise ValidationFailedError(field, "must be printable ASCII, as Canvas issues it")
    if any(ch.isspace() for ch in token):
        raise ValidationFailedError(field, "must not contain whitespace")
    return token


def check_grant(
    scopes: Sequence[str],
    constraints: Mapping[str, Sequence[str]],
    *,
    kept_constraints: bool = False,
) -> Grant:
    """Compile the grant, naming the offending scope string or constraint.

    A scope that does not parse, or could never match (docs/grants.md: inert scopes), is
    refused; so is a constraint naming a parameter that no scope has, which would constrain
    nothing (docs/grants.md#constraints). ``kept_constraints`` says the constraints are the
    client's existing ones, kept while its scopes change: the refusal then says how to
    replace or clear them.
    """
    if not scopes:
        raise ValidationFailedError("scopes", "grant at least one scope")
    try:
        parsed = Grant.compile(scopes)
    except ScopeError as exc:
        raise ValidationFailedError("scopes", str(exc)) from exc
    for raw, why in parsed.inert_scopes():
        raise ValidationFailedError("scopes", f"scope {raw!r} {why}")
    try:
        grant = Grant.compile(scopes, constraints)
    except ScopeError as exc:
        raise ValidationFailedError("constraints", str(exc)) from exc
    unknown = grant.unknown_constraints()
    if unknown:
        raise ValidationFailedError(
            "constraints", _unknown_constraint(grant, unknown[0], kept_constraints)
        )
    return grant


def _unknown_constraint(grant: Grant, name: str, kept: bool) -> str:
    have = grant.parameters()
    listed = (
        "they have " + ", ".join(have)
        if have
        else "they have no parameters, so the grant takes no constraints"
    )
    if kept:
        return (
            f"the client's constraint {name!r} names no parameter of the new scopes ({listed}); "
            'pass "constraints" with the scopes (CLI: --constraint), or clear them with '
            '"constraints": {} (CLI: --clear-constraints)'
        )
    return (
        f"constraint {name!r} names no parameter of the grant's scopes ({listed}); "
        "a constraint applies only to scopes with its parameter, so it would constrain nothing"
    )


def scope_warnings(scopes: Sequence[str]) -> list[str]:
    """Warnings for a saved grant's scopes that Canvas's scope catalogue does not list."""
    return unfamiliar_scopes(Grant.compile(scopes))


def grant_warnings(client: Client) -> list[str]:
    """:func:`scope_warnings`, and each constraint naming no parameter of the scopes.

    Saving such a constraint is refused now; one saved before constrains nothing.
    """
    grant = Grant.compile(client.scopes, client.constraints)
    return [
        *unfamiliar_scopes(grant),
        *(
            f"constraint {name!r} names no parameter of the grant's scopes, so it constrains "
            "nothing; replace it (broker clients grant --constraint) or clear it"
            for name in grant.unknown_constraints()
        ),
    ]


def _key_scopes(key_scopes: Sequence[str]) -> list[str]:
    """A developer key's scope list: Canvas scope strings, sorted, each once."""
    try:
        return sorted(set(Grant.compile(list(key_scopes)).scope_strings()))
    except ScopeError as exc:
        raise ValidationFailedError("key_scopes", str(exc)) from exc


def check_cidrs(cidrs: Sequence[str]) -> list[str]:
    """Normalised CIDR strings."""
    result = []
    for cidr in cidrs:
        try:
            result.append(str(ipaddress.ip_network(cidr.strip(), strict=False)))
        except ValueError as exc:
            raise ValidationFailedError("allowed_cidrs", f"{cidr!r} is not an IP network") from exc
    return result


DEFAULT_CANVAS_WEIGHT: Final = 1.0
MAX_CANVAS_WEIGHT: Final = 1000.0


def check_canvas_weight(weight: float) -> None:
    """A client's weight in its credential's share of Canvas's capacity (docs/grants.md)."""
    if not (0 < weight <= MAX_CANVAS_WEIGHT):
        raise ValidationFailedError(
            "canvas_weight", f"must be more than 0 and at most {MAX_CANVAS_WEIGHT:g}"
        )


def check_rate(rate_limit: float | None, rate_burst: int | None) -> tuple[float | None, int | None]:
    """The stored ``(rate_limit, rate_burst)``: both null (unlimited), or a rate and a burst.

    The burst defaults to one second's worth of calls whenever a rate is given without one.
    """
    if rate_limit is None:
        if rate_burst is not None:
            raise ValidationFailedError("rate_burst", "needs a rate_limit")
        return None, None
    if not math.isfinite(rate_limit) or not 0 < rate_limit <= MAX_RATE_LIMIT:
        raise ValidationFailedError(
            "rate_limit", f"must be more than 0 and at most {MAX_RATE_LIMIT:g} requests per second"
        )
    if rate_burst is None:
        return rate_limit, default_burst(rate_limit)
    if not 1 <= rate_burst <= MAX_RATE_BURST:
        raise ValidationFailedError("rate_burst", f"must be between 1 and {MAX_RATE_BURST}")
    return rate_limit, rate_burst


def check_auth(auth_method: str, jwks: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The public key set a client authenticates with, or None for the other methods."""
    if auth_method in {CLIENT_SECRET, WORKLOAD_IDENTITY}:
        if jwks is not None:
            raise ValidationFailedError("jwks", "only private_key_jwt clients have a key set")
        return None
    if auth_method != PRIVATE_KEY_JWT:
        raise ValidationFailedError(
            "auth_method", "must be client_secret, private_key_jwt or workload_identity"
        )
    if jwks is None:
        raise ValidationFailedError("jwks", "private_key_jwt clients need a public JWK Set")
    try:
        return dict(public_key_set(jwks))
    except InvalidKeySetError as exc:
        raise ValidationFailedError("jwks", str(exc)) from exc


def _key_ids(key_set: Mapping[str, Any] | None) -> list[str] | None:
    """What the audit log says about a key set: its key ids (public, but kept short)."""
    if key_set is None:
        return None
    return [str(key.get("kid", "-")) for key in key_set["keys"]]


def check_ttls(token_ttl: int, max_token_ttl: int, ceiling: int) -> None:
    """``MIN_TOKEN_TTL <= token_ttl <= max_token_ttl <= ceiling``."""
    if not MIN_TOKEN_TTL <= max_token_ttl <= ceiling:
        raise ValidationFailedError(
            "max_token_ttl", f"must be between {MIN_TOKEN_TTL} and {ceiling} seconds"
        )
    if not MIN_TOKEN_TTL <= token_ttl <= max_token_ttl:
        raise ValidationFailedError(
            "token_ttl", f"must be between {MIN_TOKEN_TTL} seconds and max_token_ttl"
        )


@dataclass(frozen=True)
class ClientChange:
    """A client after an update, and what changed: ``{field: {"old": …, "new": …}}``.

    ``tokens_revoked`` counts the live tokens revoked when the update disabled the client.
    """

    client: Client
    changes: dict[str, dict[str, Any]]
    tokens_revoked: int = 0


def _comparable(name: str, value: Any) -> Any:  # noqa: ANN401 - a field's value
    """A client field's value as plain JSON data, so stored and requested values compare."""
    if name in {"scopes", "allowed_cidrs"}:
        return list(value)
    if name == "constraints":
        return {k: sorted(v) for k, v in sorted(value.items())}
    if name == "jwks" and value is not None:
        return dict(value)
    if name == "trust_policies":
        return [dict(policy) for policy in value]
    return value


def _field(client: Client, name: str) -> Any:  # noqa: ANN401 - a field's value
    return _comparable(name, getattr(client, name))


def client_changes(before: Client, after: Client) -> dict[str, dict[str, Any]]:
    """``{field: {"old": …, "new": …}}`` for each field that differs; a key set as its ids.

    Public key material stays out (the audit log records this): ``jwks`` is reported as
    ``key_ids``.
    """
    changes: dict[str, dict[str, Any]] = {}
    for name in clients.SETTINGS:
        old, new = _field(before, name), _field(after, name)
        if old == new:
            continue
        if name == "jwks":
            changes["key_ids"] = {"old": _key_ids(old), "new": _key_ids(new)}
        else:
            changes[name] = {"old": old, "new": new}
    return changes


_GRANT_CACHE_SIZE = 1024
_TOKEN_LIST_LIMIT = 1000


class ManagementService:
    """The management API's use cases."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        keyring: Keyring,
        settings: Settings,
        epoch: CacheEpoch | None = None,
        forwarder: Forwarder | None = None,
        *,
        manual_tokens: ManualTokenService | None = None,
        issuer_keys: IssuerKeys | None = None,
    ) -> None:
        self._sessions = sessions
        # Reads issuers' discovery documents when a policy or an allowlist entry is saved.
        self._issuer_keys = issuer_keys or IssuerKeys(settings)
        # Regenerates manual tokens at Canvas (the running app's; None in local commands).
        self._manual_tokens = manual_tokens
        self._keyring = keyring
        self._settings = settings
        self._epoch = epoch or CacheEpoch()
        # Worker tokens are verified through the app's upstream pool; without one (the CLI's
        # local commands, the demo) a one-off client is opened per verification.
        self._forwarder = forwarder
        self._grants: dict[tuple[str, int], Grant] = {}

    # Upstreams -----------------------------------------------------------------------------

    async def create_upstream(self, actor: Actor, *, name: str, base_url: str) -> Upstream:
        """Register a Canvas instance."""
        now = utcnow()
        upstream = Upstream(
            id=new_id("up"),
            name=check_name(name),
            base_url=check_base_url(base_url),
            enabled=True,
            created_at=now,
            updated_at=now,
        )
        async with self._write("upstream") as session:
            upstream = await upstreams.add(session, upstream)
            await self._event(
                session,
                actor,
                "upstream.create",
                upstream,
                name=name,
                base_url=upstream.base_url,
            )
        return upstream

    async def list_upstreams(self) -> list[Upstream]:
        """All upstreams by name."""
        async with self._sessions() as session:
            return await upstreams.all_by_name(session)

    async def get_upstream(self, ref: str) -> Upstream:
        """One upstream by id or name."""
        async with self._sessions() as session:
            return await upstreams.get(session, ref)

    async def update_upstream(
        self,
        actor: Actor,
        ref: str,
        *,
        name: str | None = None,
        base_url: str | None = None,
        enabled: bool | None = None,
    ) -> Upstream:
        """Change an upstream's name, URL or enabled flag."""
        changes: dict[str, Any] = {}
        if name is not None:
            changes["name"] = check_name(name)
        if base_url is not None:
            changes["base_url"] = check_base_url(base_url)
        if enabled is not None:
            changes["enabled"] = enabled
        async with self._write("upstream") as session:
            upstream = await upstreams.change(session, ref, changes)
            action = "upstream.update"
            if set(changes) == {"enabled"}:
                action = "upstream.enable" if enabled else "upstream.disable"
            await self._event(session, actor, action, upstream, **changes)
        return upstream

    # Worker credentials --------------------------------------------------------------------

    async def create_credential(
        self,
        actor: Actor,
        *,
        upstream: str,
        name: str,
        token: str,
        canvas_user_id: str | None = None,
        expires_at: datetime | None = None,
        notes: str | None = None,
        verify: bool = True,
        rotate_every: int | str | None = None,
        warnings: list[str] | None = None,
    ) -> WorkerCredential:
        """Store a worker user's Canvas token, encrypted; it is never shown again.

        With ``verify`` (the default) Canvas is asked who the token belongs to first, and a
        token it rejects is refused with nothing stored; the user's id and name are recorded,
        and the token's own record (its expiry, purpose and id: ``services.manual_tokens``).
        Without that record the token is stored all the same, and ``warnings`` (when given)
        gets a sentence saying so. ``rotate_every`` schedules its regeneration.
        """
        check_name(name)
        check_worker_token(token)
        every = parse_rotate_every(rotate_every)
        canvas_user_name: str | None = None
        record = TokenRecord()
        if verify:
            async with self._sessions() as session:
                base_url = (await upstreams.get(session, upstream)).base_url
            user, record = await self._verify(base_url, token, warnings)
            if canvas_user_id is not None and canvas_user_id != user.id:
                raise ValidationFailedError(
                    "canvas_user_id",
                    f"the token belongs to Canvas user {user.id}, not {canvas_user_id}; "
                    "leave canvas_user_id out to record the token's own user",
                )
            canvas_user_id, canvas_user_name = user.id, user.name
        now = utcnow()
        async with self._write("credential") as session:
            target = await upstreams.get(session, upstream)
            credential_id = new_id("cred")
            credential = WorkerCredential(
                id=credential_id,
                name=name,
                upstream_id=target.id,
                token_last4=token[-4:],
                canvas_user_id=canvas_user_id,
                canvas_user_name=canvas_user_name,
                notes=notes,
                enabled=True,
                expires_at=expires_at,
                created_at=now,
                rotated_at=None,
                updated_at=now,
                token_expires_at=record.expires_at,
                token_purpose=record.purpose,
                canvas_token_id=record.canvas_token_id,
                rotate_every=every,
                rotate_due_at=None if every is None else now + timedelta(seconds=every),
            )
            credential = await credentials.add(
                session, credential, self._seal(token, credential_id)
            )
            await self._event(
                session,
                actor,
                "credential.create",
                credential,
                name=name,
                upstream=target.name,
                token_last4=credential.token_last4,
                canvas_user_id=canvas_user_id,
                canvas_user_name=canvas_user_name,
                verified=verify,
                expires_at=expires_at.isoformat() if expires_at else None,
                token_expires_at=_iso(record.expires_at),
                token_purpose=record.purpose,
                canvas_token_id=record.canvas_token_id,
                rotate_every=every,
            )
        if every is not None and self._manual_tokens is not None:
            self._manual_tokens.wake()
        return credential

    async def create_oauth_credential(
        self,
        actor: Actor,
        *,
        upstream: str,
        name: str,
        developer_key_id: str,
        developer_key_secret: str,
        key_scopes: Sequence[str] | None = None,
        canvas_user_id: str | None = None,
        expires_at: datetime | None = None,
        notes: str | None = None,
    ) -> WorkerCredential:
        """Store a Canvas developer key (its secret encrypted) as a worker credential.

        It is unusable (``503 credential_unavailable``) until the worker user authorises it
        once in a browser (``services.worker_oauth``, docs/interfaces.md#oauth-worker-credentials).
        ``key_scopes``, the key's scope list as set in Canvas, is checked now and makes client
        grants outside it a warning when they are saved.
        """
        check_name(name)
        if not _DEVELOPER_KEY_ID.fullmatch(developer_key_id):
            raise ValidationFailedError(
                "developer_key_id",
                "is the developer key's Client ID as Canvas shows it: digits (and '~' "
                "between a shard and a local id), at most 100 characters",
            )
        check_worker_token(developer_key_secret, "developer_key_secret")
        scopes = None if key_scopes is None else _key_scopes(key_scopes)
        now = utcnow()
        async with self._write("credential") as session:
            target = await upstreams.get(session, upstream)
            credential_id = new_id("cred")
            credential = WorkerCredential(
                id=credential_id,
                name=name,
                upstream_id=target.id,
                token_last4="",
                canvas_user_id=canvas_user_id,
                canvas_user_name=None,
                notes=notes,
                enabled=True,
                expires_at=expires_at,
                created_at=now,
                rotated_at=None,
                updated_at=now,
                kind=OAUTH,
                unavailable_reason="not_authorized",
            )
            # No access token yet: an empty one, sealed, until the worker user authorises.
            credential = await credentials.add(session, credential, self._seal("", credential_id))
            await oauth_grants.add(
                session,
                credential_id,
                developer_key_id=developer_key_id,
                secret=SealedToken(
                    *self._keyring.encrypt(
                        developer_key_secret.encode(),
                        purpose=DEVELOPER_KEY_PURPOSE,
                        record_id=credential_id,
                    )
                ),
                key_scopes=scopes,
            )
            await self._event(
                session,
                actor,
                "credential.create",
                credential,
                name=name,
                upstream=target.name,
                kind=OAUTH,
                developer_key_id=developer_key_id,
                key_scopes=scopes,
                canvas_user_id=canvas_user_id,
                expires_at=expires_at.isoformat() if expires_at else None,
            )
        return credential

    async def set_key_scopes(
        self, actor: Actor, ref: str, key_scopes: Sequence[str]
    ) -> WorkerCredential:
        """Record an OAuth credential's developer-key scopes anew; audited old and new."""
        scopes = _key_scopes(key_scopes)
        async with self._write("credential") as session:
            credential = await credentials.get(session, ref)
            before = await oauth_grants.find(session, credential.id)
            if before is None:
                raise ConflictError(
                    f"credential {credential.name!r} holds a manual token: it has no developer "
                    "key whose scopes could be recorded"
                )
            await oauth_grants.set_key_scopes(session, credential.id, scopes)
            old = list(before.key_scopes) if before.key_scopes is not None else None
            await self._event(
                session,
                actor,
                "credential.update",
                credential,
                key_scopes={"old": old, "new": scopes},
            )
        return credential

    async def oauth_grants(self) -> dict[str, OAuthGrant]:
        """Every OAuth credential's developer key and grant state (no secret), by id."""
        async with self._sessions() as session:
            return await oauth_grants.all_grants(session)

    async def key_scope_warnings(self, client: Client) -> list[str]:
        """The client's scopes its credential's developer key does not list (Canvas refuses).

        Only for an OAuth credential whose key's scope list was recorded.
        """
        async with self._sessions() as session:
            grant = await oauth_grants.find(session, client.credential_id)
        if grant is None or grant.key_scopes is None:
            return []
        listed = set(grant.key_scopes)
        return [
            f"scope {scope!r} is not among the scopes of developer key {grant.developer_key_id}: "
            "Canvas will refuse these calls (401) whatever the grant says; add it to the key "
            "in Canvas (then: broker credentials update --key-scope …), or drop it from the "
            "grant"
            for scope in client.scopes
            if scope not in listed
        ]

    async def _verify(
        self, base_url: str, token: str, warnings: list[str] | None
    ) -> tuple[CanvasUser, TokenRecord]:
        """Who the token is (or a refusal), and its record in Canvas's Access Tokens API.

        A Canvas that does not answer the tokens API still gets the token stored: its record
        is then unknown, and ``warnings`` says so.
        """
        if self._forwarder is not None:
            return await self._verify_with(self._forwarder, base_url, token, warnings)
        forwarder = verifying_forwarder(self._settings)
        try:
            return await self._verify_with(forwarder, base_url, token, warnings)
        finally:
            await forwarder.aclose()

    async def _verify_with(
        self, forwarder: Forwarder, base_url: str, token: str, warnings: list[str] | None
    ) -> tuple[CanvasUser, TokenRecord]:
        user = await whoami(forwarder, base_url, token)
        found = await read_record(forwarder, base_url, token)
        if isinstance(found, str):
            if warnings is not None:
                warnings.append(lookup_warning(found))
            return user, TokenRecord()
        return user, found

    def _seal(self, token: str, credential_id: str) -> SealedToken:
        return SealedToken(
            *self._keyring.encrypt(
                token.encode(), purpose=WORKER_TOKEN_PURPOSE, record_id=credential_id
            )
        )

    async def list_credentials(self) -> list[WorkerCredential]:
        """All worker credentials (metadata only)."""
        async with self._sessions() as session:
            return await credentials.all_by_name(session)

    async def get_credential(self, ref: str) -> WorkerCredential:
        """One credential by id or name."""
        async with self._sessions() as session:
            return await credentials.get(session, ref)

    async def upstream_names(self) -> dict[str, str]:
        """Upstream id → name, for presenting credentials."""
        return {u.id: u.name for u in await self.list_upstreams()}

    async def rotate_credential(
        self,
        actor: Actor,
        ref: str,
        *,
        token: str | None,
        verify: bool = True,
        regenerate: bool = False,
        warnings: list[str] | None = None,
    ) -> WorkerCredential:
        """Replace the stored Canvas token (for example after regenerating it in Canvas).

        With ``verify`` (the default) a token Canvas rejects is refused and the old one kept;
        so is a token of another Canvas user than the one recorded, since swapping the user
        would change what every client of this credential can reach.

        With ``regenerate`` (and no ``token``) Canvas itself is asked to regenerate the stored
        token (``services.manual_tokens``); if it refuses nothing changes.
        """
        if regenerate:
            if token is not None:
                raise ValidationFailedError(
                    "token", "give a token or regenerate, not both: regenerate asks Canvas"
                )
            return await self._regenerate(actor, ref)
        if token is None:
            raise ValidationFailedError(
                "token", "give the new token, or regenerate: true to have Canvas regenerate it"
            )
        check_worker_token(token)
        async with self._sessions() as session:
            if (await credentials.get(session, ref)).kind == OAUTH:
                raise ConflictError(
                    f"credential {ref!r} is renewed through its developer key: it holds no "
                    "manual token to replace; re-authorise it (broker credentials authorize)"
                )
        user: CanvasUser | None = None
        record: TokenRecord | None = None
        if verify:
            async with self._sessions() as session:
                current = await credentials.get(session, ref)
                base_url = (await upstreams.get(session, current.upstream_id)).base_url
            user, record = await self._verify(base_url, token, warnings)
            if current.canvas_user_id is not None and current.canvas_user_id != user.id:
                raise ValidationFailedError(
                    "token",
                    f"belongs to Canvas user {user.id}, but credential {current.name!r} is for "
                    f"Canvas user {current.canvas_user_id}; create a new credential for that "
                    "user instead",
                )
        async with self._write("credential") as session:
            credential = await credentials.get(session, ref)
            credential = await credentials.replace_token(
                session,
                credential.id,
                self._seal(token, credential.id),
                last4=token[-4:],
                at=utcnow(),
                canvas_user=(user.id, user.name) if user else None,
                canvas_record=record,
            )
            await self._event(
                session,
                actor,
                "credential.rotate",
                credential,
                token_last4=token[-4:],
                canvas_user_id=credential.canvas_user_id,
                canvas_user_name=credential.canvas_user_name,
                verified=verify,
                regenerated=False,
                token_expires_at=_iso(credential.token_expires_at),
                canvas_token_id=credential.canvas_token_id,
            )
        return credential

    async def _regenerate(self, actor: Actor, ref: str) -> WorkerCredential:
        if self._manual_tokens is None:
            raise ConflictError(
                "regenerating a token needs the running broker: use the management API "
                "(broker credentials rotate NAME --regenerate against the server)"
            )
        async with self._sessions() as session:
            current = await credentials.get(session, ref)
        return await self._manual_tokens.regenerate(current.id, actor_key_id=actor.key_id)

    async def update_credential(
        self,
        actor: Actor,
        ref: str,
        *,
        enabled: bool | None = None,
        notes: str | None = _UNSET,
        expires_at: datetime | None = _UNSET,
        canvas_user_id: str | None = _UNSET,
        rotate_every: int | str | None = _UNSET,
    ) -> WorkerCredential:
        """Enable/disable a credential or change its metadata.

        Disabling makes every proxy token minted through it fail on the next request.
        ``rotate_every`` (None: no schedule) schedules the manual token's regeneration, the
        first one ``rotate_every`` from now.
        """
        metadata = {"notes": notes, "expires_at": expires_at, "canvas_user_id": canvas_user_id}
        changes: dict[str, Any] = {k: v for k, v in metadata.items() if v is not _UNSET}
        if enabled is not None:
            changes["enabled"] = enabled
        if rotate_every is not _UNSET:
            every = parse_rotate_every(rotate_every)
            async with self._sessions() as session:
                if every is not None and (await credentials.get(session, ref)).kind == OAUTH:
                    raise ValidationFailedError(
                        "rotate_every", "an OAuth credential is renewed by the broker already"
                    )
            changes["rotate_every"] = every
            changes["rotate_due_at"] = (
                None if every is None else utcnow() + timedelta(seconds=every)
            )
        async with self._write("credential") as session:
            credential = await credentials.change(session, ref, {**changes, "updated_at": utcnow()})
            action = {True: "credential.enable", False: "credential.disable"}.get(
                enabled if set(changes) == {"enabled"} else None,  # type: ignore[arg-type]
                "credential.update",
            )
            await self._event(session, actor, action, credential, **_printable(changes))
        if "rotate_every" in changes and self._manual_tokens is not None:
            self._manual_tokens.wake()
        return credential

    # Clients -------------------------------------------------------------------------------

    async def create_client(
        self,
        actor: Actor,
        *,
        name: str,
        credential: str,
        scopes: Sequence[str],
        constraints: Mapping[str, Sequence[str]] | None = None,
        token_ttl: int = DEFAULT_TOKEN_TTL,
        max_token_ttl: int = DEFAULT_MAX_TOKEN_TTL,
        allow_masquerade: bool = False,
        allow_includes: bool = False,
        allowed_cidrs: Sequence[str] = (),
        rate_limit: float | None = None,
        rate_burst: int | None = None,
        canvas_weight: float = DEFAULT_CANVAS_WEIGHT,
        auth_method: str = CLIENT_SECRET,
        jwks: Mapping[str, Any] | None = None,
        trust_policies: Sequence[Mapping[str, Any]] = (),
        verify: bool = True,
        description: str | None = None,
    ) -> tuple[Client, str | None]:
        """Create a client; returns it and its secret, which is never shown again.

        A ``private_key_jwt`` client gets no secret: it proves itself with assertions signed
        by the private key whose public half is in ``jwks``; nor does a ``workload_identity``
        client, which exchanges its platform's tokens under ``trust_policies``
        (issuers reachable unless ``verify`` is false).
        """
        check_name(name)
        grant = check_grant(scopes, constraints or {})
        check_ttls(token_ttl, max_token_ttl, self._settings.max_token_ttl)
        cidrs = check_cidrs(allowed_cidrs)
        rate_limit, rate_burst = check_rate(rate_limit, rate_burst)
        check_canvas_weight(canvas_weight)
        key_set = check_auth(auth_method, jwks)
        policies = self._check_policies(auth_method, trust_policies)
        secret = generate_secret(SecretKind.CLIENT_SECRET) if auth_method == CLIENT_SECRET else None
        now = utcnow()
        scope_strings = grant.scope_strings()
        constraint_values = {k: sorted(v) for k, v in grant.constraints.items()}
        async with self._sessions() as session:
            await self._check_issuers(session, policies, verify=verify)
        async with self._write("client") as session:
            owner = await credentials.get(session, credential)
            client = Client(
                id=new_id("cli"),
                name=name,
                credential_id=owner.id,
                auth_method=auth_method,
                jwks=key_set,
                scopes=tuple(scope_strings),
                constraints={k: tuple(v) for k, v in constraint_values.items()},
                token_ttl=token_ttl,
                max_token_ttl=max_token_ttl,
                allow_masquerade=allow_masquerade,
                allow_includes=allow_includes,
                allowed_cidrs=tuple(cidrs),
                rate_limit=rate_limit,
                rate_burst=rate_burst,
                canvas_weight=canvas_weight,
                description=description,
                enabled=True,
                grant_version=1,
                created_at=now,
                updated_at=now,
                secret_rotated_at=None,
                trust_policies=tuple(policies),
            )
            client = await clients.add(
                session, client, secret_hash=self._keyring.hash_secret(secret) if secret else None
            )
            await self._event(
                session,
                actor,
                "client.create",
                client,
                name=name,
                credential=owner.name,
                scopes=scope_strings,
                constraints=constraint_values,
                token_ttl=token_ttl,
                max_token_ttl=max_token_ttl,
                allow_masquerade=allow_masquerade,
                allow_includes=allow_includes,
                allowed_cidrs=cidrs,
                rate_limit=rate_limit,
                rate_burst=rate_burst,
                canvas_weight=canvas_weight,
                auth_method=auth_method,
                key_ids=_key_ids(key_set),
                trust_policies=policies,
            )
        return client, secret

    def _check_policies(
        self, auth_method: str, value: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """Trust policies as stored, or ``ValidationFailedError`` naming the failing rule."""
        try:
            policies = check_policies(
                [dict(p) for p in value],
                allow_loopback_http=self._settings.workload_allow_loopback_http,
            )
        except PolicyError as exc:
            raise ValidationFailedError(exc.field, str(exc)) from exc
        if auth_method == WORKLOAD_IDENTITY and not policies:
            raise ValidationFailedError(
                "trust_policies", "a workload_identity client needs at least one trust policy"
            )
        return policies

    async def _check_issuers(
        self, session: AsyncSession, policies: Sequence[Mapping[str, Any]], *, verify: bool
    ) -> None:
        """Every issuer is on the allowlist and, unless ``verify`` is false, answers now."""
        for issuer in issuers_of(policies):
            if await trusted_issuers.find(session, issuer) is None:
                raise ValidationFailedError(
                    "trust_policies",
                    f"the issuer {issuer} is not on the list of trusted issuers; an admin adds "
                    "it first (broker issuers add)",
                )
            if verify:
                await self._reach_issuer(issuer, "trust_policies")

    async def _reach_issuer(self, issuer: str, field: str) -> int:
        try:
            return await self._issuer_keys.check(issuer)
        except IssuerUnavailableError as exc:
            raise ValidationFailedError(
                field, f"{exc}; fix the URL, or save with verify false (--no-verify) offline"
            ) from exc

    async def list_clients(self) -> list[Client]:
        """All clients by name."""
        async with self._sessions() as session:
            return await clients.all_by_name(session)

    async def get_client(self, ref: str) -> Client:
        """One client by id or name."""
        async with self._sessions() as session:
            return await clients.get(session, ref)

    async def update_client(self, actor: Actor, ref: str, **fields: Any) -> ClientChange:  # noqa: ANN401
        """Change a client's grant or settings; live tokens follow the new grant at once.

        Only the fields given change; ``None`` is "unchanged" except for ``rate_limit``, where
        it removes the limit (docs/interfaces.md#management-api). Constraints are kept when
        only the scopes change, and must still name a parameter of the new scopes; clearing
        them takes an explicit ``constraints={}``. A new rate keeps the client's burst (the
        default burst if it had none). Disabling revokes every live token of the client, so
        enabling it again revives none (docs/interfaces.md#changing-a-client). Returns the
        client and what changed, old and new, which the audit event records too.
        """
        rate_limit = fields.pop("rate_limit", _UNSET)
        rate_burst = fields.pop("rate_burst", None)
        verify = fields.pop("verify", True)
        if fields.get("trust_policies") is not None:
            async with self._sessions() as session:
                current = await clients.get(session, ref)
                fields["trust_policies"] = self._check_policies(
                    current.auth_method, fields["trust_policies"]
                )
                added = [p for p in fields["trust_policies"] if p not in current.trust_policies]
                await self._check_issuers(session, added, verify=verify)
        async with self._write("client") as session:
            before = await clients.get(session, ref)
            changes = self._checked_changes(before, fields, rate_limit, rate_burst)
            saved = {k: v for k, v in changes.items() if _comparable(k, v) != _field(before, k)}
            client = before
            if saved:
                if saved.get("rate_limit", before.rate_limit) is None:
                    await rate_buckets.forget(session, before.id)
                client = await clients.change(
                    session, before.id, {**saved, "updated_at": utcnow()}, new_grant=True
                )
            difference = client_changes(before, client)
            revoked = 0
            if fields.get("enabled") is False:
                revoked = await self._revoke_client_tokens(session, actor, client.id)
            action = "client.update"
            if set(fields) == {"enabled"} and rate_limit is _UNSET:
                action = "client.enable" if fields["enabled"] else "client.disable"
            extra = {"tokens_revoked": revoked} if action == "client.disable" else {}
            await self._event(session, actor, action, client, **difference, **extra)
        return ClientChange(client, difference, revoked)

    def _checked_changes(
        self,
        before: Client,
        fields: Mapping[str, Any],
        rate_limit: Any,  # noqa: ANN401 - a rate, None (no limit) or _UNSET
        rate_burst: int | None,
    ) -> dict[str, Any]:
        """The fields an update gives, validated and normalised as they would be stored."""
        changes = {k: v for k, v in fields.items() if v is not None}
        if rate_limit is not _UNSET or rate_burst is not None:
            new_rate = before.rate_limit if rate_limit is _UNSET else rate_limit
            # Removing the limit removes its burst; a new rate keeps the burst there was.
            kept_burst = None if rate_limit is None else before.rate_burst
            changes["rate_limit"], changes["rate_burst"] = check_rate(
                new_rate, rate_burst if rate_burst is not None else kept_burst
            )
        if "scopes" in changes or "constraints" in changes:
            grant = check_grant(
                changes.get("scopes", before.scopes),
                changes.get("constraints", before.constraints),
                kept_constraints="constraints" not in changes,
            )
            changes["scopes"] = grant.scope_strings()
            changes["constraints"] = {k: sorted(v) for k, v in grant.constraints.items()}
        if "token_ttl" in changes or "max_token_ttl" in changes:
            check_ttls(
                changes.get("token_ttl", before.token_ttl),
                changes.get("max_token_ttl", before.max_token_ttl),
                self._settings.max_token_ttl,
            )
        if "allowed_cidrs" in changes:
            changes["allowed_cidrs"] = check_cidrs(changes["allowed_cidrs"])
        if "name" in changes:
            check_name(changes["name"])
        if "canvas_weight" in changes:
            check_canvas_weight(changes["canvas_weight"])
        if "jwks" in changes:
            changes["jwks"] = check_auth(before.auth_method, changes["jwks"])
        return changes

    async def rotate_client_secret(
        self, actor: Actor, ref: str, *, revoke_tokens: bool
    ) -> tuple[Client, str]:
        """Issue a new client secret (shown once); optionally revoke every live token."""
        secret = generate_secret(SecretKind.CLIENT_SECRET)
        async with self._write("client") as session:
            client = await clients.get(session, ref)
            if client.auth_method == PRIVATE_KEY_JWT:
                raise ConflictError(
                    "this client authenticates with private_key_jwt and has no secret; "
                    "replace its jwks instead"
                )
            if client.auth_method != CLIENT_SECRET:
                raise ConflictError(
                    "this client exchanges its platform's tokens and has no secret; "
                    "change its trust_policies instead"
                )
            client = await clients.replace_secret_hash(
                session, client.id, self._keyring.hash_secret(secret), at=utcnow()
            )
            revoked = (
                await self._revoke_client_tokens(session, actor, client.id) if revoke_tokens else 0
            )
            await self._event(
                session,
                actor,
                "client.rotate_secret",
                client,
                revoke_tokens=revoke_tokens,
                tokens_revoked=revoked,
            )
        return client, secret

    async def check_policy(self, ref: str, method: str, path: str) -> tuple[Client, Decision]:
        """Would ``method path`` be allowed for this client? Returns the grant's decision.

        A path the proxy refuses as non-canonical is refused here too, for the same reason.
        """
        client = await self.get_client(ref)
        try:
            rules.check_path(path.encode())
        except Refusal as exc:
            return client, Decision(allowed=False, scope=None, reason=exc.error, detail=exc.message)
        return client, self._grant(client).check(method, path)

    def _grant(self, client: Client) -> Grant:
        """The client's compiled grant, built once per grant version (a large one takes ms)."""
        key = (client.id, client.grant_version)
        grant = self._grants.get(key)
        if grant is None:
            grant = Grant.compile(client.scopes, client.constraints)
            if len(self._grants) >= _GRANT_CACHE_SIZE:
                self._grants.clear()
            self._grants[key] = grant
        return grant

    # Tokens --------------------------------------------------------------------------------

    async def list_tokens(self, *, client: str | None, include_inactive: bool) -> list[ProxyToken]:
        """Proxy tokens (metadata only), newest first; live ones unless asked otherwise."""
        async with self._sessions() as session:
            owner = None if client is None else await clients.get(session, client)
            return await proxy_tokens.newest(
                session,
                client_id=None if owner is None else owner.id,
                live_at=None if include_inactive else utcnow(),
                limit=_TOKEN_LIST_LIMIT,
            )

    async def count_live_tokens(self) -> int:
        """How many proxy tokens are neither revoked nor expired (for ``/metrics``)."""
        async with self._sessions() as session:
            return await proxy_tokens.count_live(session, utcnow())

    async def revoke_token(self, actor: Actor, token_id: str) -> ProxyToken:
        """Revoke one proxy token by id; it fails on its next use."""
        async with self._sessions.begin() as session:
            token = await proxy_tokens.find(session, token_id)
            if token is None:
                raise NotFoundError(f"no token {token_id!r}")
            already = token.revoked_at is not None
            if not already:
                token = await proxy_tokens.revoke(session, token_id, at=utcnow(), by=actor.label)
            await self._event(
                session,
                actor,
                "token.revoke",
                token,
                revoked_at=token.revoked_at,
                already_revoked=already,
            )
        return token

    async def revoke_token_value(self, actor: Actor, value: str) -> ProxyToken:
        """Revoke the proxy token whose value is ``value`` (a leaked one, say).

        The value is looked up by its keyed hash and appears in no error or audit event;
        the event names the token's id, as ``revoke_token`` does.
        """
        try:
            check_secret(value, SecretKind.PROXY_TOKEN)
        except MalformedSecretError as exc:
            raise ValidationFailedError(
                "token", f"not a proxy token value (cbt_...): {exc}"
            ) from exc
        async with self._sessions() as session:
            token = await proxy_tokens.find_by_hash(
                session, self._keyring.secret_hash_candidates(value)
            )
        if token is None:
            raise NotFoundError("no proxy token has that value (it may have been pruned)")
        return await self.revoke_token(actor, token.id)

    async def revoke_client_tokens(self, actor: Actor, ref: str) -> int:
        """Revoke every live token of a client; returns how many."""
        async with self._sessions.begin() as session:
            client = await clients.get(session, ref)
            count = await self._revoke_client_tokens(session, actor, client.id)
            await self._event(session, actor, "client.revoke_tokens", client, tokens_revoked=count)
        return count

    async def _revoke_client_tokens(
        self, session: AsyncSession, actor: Actor, client_id: str
    ) -> int:
        return await proxy_tokens.revoke_of_client(session, client_id, at=utcnow(), by=actor.label)

    # Admin keys ----------------------------------------------------------------------------

    async def create_admin_key(self, actor: Actor, *, name: str, role: str) -> tuple[AdminKey, str]:
        """Create a management key; returns it and the key value, shown this once."""
        check_name(name)
        if role not in ROLES:
            raise ValidationFailedError("role", f"must be one of {', '.join(ROLES)}")
        value = generate_secret(SecretKind.ADMIN_KEY)
        key = AdminKey(
            id=new_id("key"),
            name=name,
            role=role,
            created_at=utcnow(),
            revoked_at=None,
            created_by=actor.key_id,
        )
        async with self._sessions.begin() as session:
            key = await admin_keys.add(session, key, key_hash=self._keyring.hash_secret(value))
            await self._event(session, actor, "admin_key.create", key, name=name, role=role)
        return key, value

    async def list_admin_keys(self) -> list[AdminKey]:
        """All admin keys (never their values)."""
        async with self._sessions() as session:
            return await admin_keys.oldest_first(session)

    async def revoke_admin_key(self, actor: Actor, key_id: str) -> AdminKey:
        """Revoke a management key."""
        async with self._sessions.begin() as session:
            key = await admin_keys.find(session, key_id)
            if key is None:
                raise NotFoundError(f"no admin key {key_id!r}")
            already = key.revoked_at is not None
            if not already:
                key = await admin_keys.revoke(session, key_id, at=utcnow())
            await self._event(
                session,
                actor,
                "admin_key.revoke",
                key,
                name=key.name,
                role=key.role,
                revoked_at=key.revoked_at,
                already_revoked=already,
            )
        return key

    # Trusted issuers -----------------------------------------------------------------------

    async def add_issuer(
        self, actor: Actor, *, issuer: str, description: str | None = None, verify: bool = True
    ) -> TrustedIssuer:
        """Put a workload identity issuer on the allowlist (admins only).

        The URL must be https (``BROKER_WORKLOAD_ALLOW_LOOPBACK_HTTP`` allows loopback http)
        and, unless ``verify`` is false, serve its discovery document and keys now.
        """
        try:
            url = check_issuer_url(
                issuer, allow_loopback_http=self._settings.workload_allow_loopback_http
            )
        except PolicyError as exc:
            raise ValidationFailedError("issuer", str(exc)) from exc
        keys = await self._reach_issuer(url, "issuer") if verify else None
        async with self._write("trusted issuer") as session:
            if await trusted_issuers.find(session, url) is not None:
                raise ConflictError(f"the issuer {url} is already trusted")
            entry = await trusted_issuers.add(
                session,
                TrustedIssuer(
                    id=new_id("iss"),
                    issuer=url,
                    description=description,
                    created_at=utcnow(),
                    created_by=actor.key_id,
                ),
            )
            await self._event(
                session,
                actor,
                "issuer.add",
                entry,
                issuer=url,
                description=description,
                verified=verify,
                signing_keys=keys,
            )
        return entry

    async def list_issuers(self) -> list[TrustedIssuer]:
        """The allowlist, by URL."""
        async with self._sessions() as session:
            return await trusted_issuers.all_by_issuer(session)

    async def remove_issuer(self, actor: Actor, ref: str) -> tuple[TrustedIssuer, list[str]]:
        """Take an issuer off the allowlist: its tokens are refused from the next exchange.

        Trust policies naming it stay (shown by ``clients get``) but match nothing until it
        is added again; returns the ids of the clients that have such policies.
        """
        async with self._write("trusted issuer") as session:
            entry = await trusted_issuers.get(session, ref)
            affected = [
                c.id
                for c in await clients.all_by_name(session)
                if entry.issuer in issuers_of(c.trust_policies)
            ]
            await trusted_issuers.remove(session, entry.id)
            await self._event(
                session, actor, "issuer.remove", entry, issuer=entry.issuer, clients=affected
            )
        return entry, affected

    # Helpers -------------------------------------------------------------------------------

    def _write(self, label: str) -> _WriteTransaction:
        return _WriteTransaction(self._sessions, label)

    async def _event(
        self,
        session: AsyncSession,
        actor: Actor,
        action: str,
        target: Upstream | WorkerCredential | Client | ProxyToken | AdminKey | TrustedIssuer,
        **changes: Any,  # noqa: ANN401
    ) -> None:
        """Chain the action's audit event into its transaction.

        Every management change may make a cached proxy token unusable, so each one also
        moves the revocation epoch (``services.revocation``).
        """
        await add_events(
            session,
            self._keyring,
            admin_event(
                **current_request_facts(),
                request_id=current_request_id(),
                action=action,
                actor_key_id=actor.key_id,
                details={"target": target.id, "changes": _printable(changes)},
                **_subject(target),
            ),
        )
        await bump_revocation_epoch(session, self._epoch.bump)


class _WriteTransaction:
    """A write transaction that turns unique-name violations into ``ConflictError``."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], label: str) -> None:
        self._sessions = sessions
        self._label = label
        self._context: Any = None

    async def __aenter__(self) -> AsyncSession:
        self._context = self._sessions.begin()
        session: AsyncSession = await self._context.__aenter__()
        return session

    async def __aexit__(self, *exc_info: object) -> None:
        # The violation shows at commit, or earlier if a statement in the body autoflushed.
        try:
            await self._context.__aexit__(*exc_info)
        except IntegrityError as exc:
            raise ConflictError(f"a {self._label} with that name already exists") from exc
        if isinstance(exc_info[1], IntegrityError):
            raise ConflictError(f"a {self._label} with that name already exists") from exc_info[1]


def _subject(target: object) -> dict[str, str]:
    """The audit columns naming what an admin action touched, so the review filters find it."""
    if isinstance(target, Upstream):
        return {"upstream": target.name}
    if isinstance(target, WorkerCredential):
        return {"credential_id": target.id}
    if isinstance(target, Client):
        return {"client_id": target.id, "credential_id": target.credential_id}
    if isinstance(target, ProxyToken):
        return {"token_id": target.id, "client_id": target.client_id}
    return {}


def _printable(changes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in changes.items()}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
