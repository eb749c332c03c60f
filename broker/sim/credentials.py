"""Developer keys, access tokens and authorization codes, as Canvas keeps them.

A simulator keeps token values in memory in the clear (Canvas stores HMACs); nothing here is ever
logged or rendered except where Canvas itself returns a value (the token endpoint, and a manual
token's `visible_token` right after it was created or regenerated).

Canvas sources followed: `app/models/access_token.rb` (the record, `usable?`, `needs_refresh?`,
`expired?`, `visible_token`, `can_manually_regenerate?`, `HINT_LENGTH`), `lib/api/v1/token.rb`
(the Token JSON) and `lib/canvas/oauth/token.rb` (authorization codes).
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from datetime import datetime

TOKEN_SIZE: Final = 64
"""`AccessToken::TOKEN_SIZE`: access and refresh tokens are 64 characters."""

HINT_LENGTH: Final = 5
"""`AccessToken::HINT_LENGTH`: the token hint is the token's first five characters."""

CODE_LIFETIME: Final = 600.0
"""Seconds an authorization code lives: Canvas's `oath_token_request_timeout` (10 minutes)."""

GLOBAL_ID_BASE: Final = 10_000_000_000_000
"""Shard 1's global-id offset: Canvas's global ids (and developer-key client ids) look like this."""

DEFAULT_KEY_NAME: Final = "User-Generated"
"""The name Canvas gives the default developer key manual tokens hang off (not verified)."""

_SLUG_ALPHABET = string.ascii_letters + string.digits


def new_token_value() -> str:
    """A fresh random token string of Canvas's size (`CanvasSlug.generate(nil, 64)`)."""
    return "".join(secrets.choice(_SLUG_ALPHABET) for _ in range(TOKEN_SIZE))


def canvas_time(moment: datetime | None) -> str | None:
    """Render a UTC datetime as Canvas does in JSON (`2025-01-06T09:00:00Z`), or None."""
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class DeveloperKey:
    """A Canvas API developer key (Admin > Developer Keys).

    `require_scopes` is Canvas's "Enforce Scopes" toggle; `active` is its on/off state. Tokens
    issued under an inactive key stop working at once (`DeveloperKey#usable?` is checked by
    `AccessToken#usable?` on every request and every refresh).
    """

    client_id: str
    secret: str = field(repr=False)
    redirect_uris: list[str] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)
    require_scopes: bool = False
    active: bool = True
    name: str = "Sim Developer Key"
    refresh_count: int = 0
    """How many `refresh_token` grants this key has served (simulator bookkeeping)."""


@dataclass
class AccessToken:
    """One Canvas `AccessToken` row: a manual token, or one issued through OAuth.

    `permanent_expires_at` (wall time) is the expiry a user sets on a manual token; `expires_at`
    (on `SimState.clock`) is the one-hour lifetime of an OAuth access token, after which it needs
    a refresh. `developer_key_id` is the client id, or None for a manual token (Canvas's default
    developer key). `plain` marks a record made for a value in `SimState.tokens`.
    """

    id: int
    user_id: int
    value: str = field(repr=False)
    created_at: datetime
    updated_at: datetime
    purpose: str | None = None
    scopes: list[str] = field(default_factory=list)
    permanent_expires_at: datetime | None = None
    developer_key_id: str | None = None
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None
    workflow_state: str = "active"
    real_user_id: int | None = None
    remember_access: bool | None = None
    last_used_at: datetime | None = None
    plain: bool = False

    @property
    def token_hint(self) -> str:
        """The first `HINT_LENGTH` characters of the token, which the tokens API accepts as id."""
        return self.value[:HINT_LENGTH]

    @property
    def manually_created(self) -> bool:
        """Whether this is a manual token (issued under the default developer key)."""
        return self.developer_key_id is None

    @property
    def deleted(self) -> bool:
        """Whether the token was deleted (revoked); Canvas keeps the row as `deleted`."""
        return self.workflow_state == "deleted"

    def expired(self, now: datetime) -> bool:
        """`AccessToken#expired?`: past its permanent expiry."""
        return self.permanent_expires_at is not None and self.permanent_expires_at < now

    def needs_refresh(self, clock_now: float) -> bool:
        """`AccessToken#needs_refresh?`: an OAuth token past its one-hour `expires_at`."""
        return self.expires_at is not None and self.expires_at < clock_now

    def to_json(self, now: datetime, app_name: str, *, reveal: bool = False) -> dict[str, Any]:
        """Canvas's Token JSON (`Api::V1::Token#token_json`).

        The full token appears only as `visible_token`, and only when `reveal` (just created or
        regenerated); otherwise a manual token shows `hint...` and an OAuth token null.
        """
        visible: str | None = None
        if self.manually_created:
            visible = self.value if reveal else f"{self.token_hint}..."
        return {
            "id": self.id,
            "created_at": canvas_time(self.created_at),
            "purpose": self.purpose,
            "real_user_id": self.real_user_id,
            "remember_access": self.remember_access,
            "scopes": list(self.scopes),
            "updated_at": canvas_time(self.updated_at),
            "user_id": self.user_id,
            "workflow_state": self.workflow_state,
            "app_name": app_name,
            "visible_token": visible,
            "expires_at": canvas_time(self.permanent_expires_at),
            "can_manually_regenerate": self.manually_created and not self.expired(now),
        }


@dataclass(frozen=True)
class AuthorizationCode:
    """An authorization code waiting for the token endpoint (Canvas keeps these in Redis).

    `code_challenge` is the PKCE S256 challenge stored with the code, if the request had one.
    """

    client_id: str
    user_id: int
    scopes: tuple[str, ...]
    purpose: str | None
    expires_at: float
    code_challenge: str | None = None


@dataclass(frozen=True)
class PendingAuthorization:
    """A validated `/login/oauth2/auth` request shown on the consent page (Canvas's session)."""

    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str | None
    purpose: str | None
    code_challenge: str | None
