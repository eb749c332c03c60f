"""OAuth worker credentials, the pure part: PKCE, the authorisation URL, Canvas's answers.

Contract: docs/interfaces.md#oauth-worker-credentials. Canvas's OAuth2 provider follows RFC
6749's authorization-code grant with refresh tokens (canvas-lms doc/api/oauth.md and
doc/api/oauth_endpoints.md): ``GET /login/oauth2/auth`` with ``client_id``,
``response_type=code``, ``redirect_uri``, ``state`` and ``scope`` (space-separated), then
``POST /login/oauth2/token``. Canvas supports PKCE with ``S256`` only (canvas-lms
lib/canvas/oauth/pkce.rb, ``SUPPORTED_METHODS``), checking the verifier at the token endpoint.
A refresh regenerates the access token in place, so the previous access token stops working
at once (lib/canvas/oauth/grant_types/refresh_token.rb, ``regenerate_access_token``); Canvas
answers ``expires_in`` (seconds) with each access token (lib/canvas/oauth/token.rb,
``as_json``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final
from urllib.parse import urlencode

AUTHORIZE_PATH: Final = "/login/oauth2/auth"
TOKEN_PATH: Final = "/login/oauth2/token"  # noqa: S105 - an endpoint path
CALLBACK_PATH: Final = "/broker/v1/oauth/callback"

STATE_TTL: Final = timedelta(minutes=10)
"""How long an authorisation URL can be completed: Canvas keeps a code as long (token.rb)."""

REFRESH_MARGIN: Final = timedelta(minutes=5)
"""Refresh this long before the access token expires (at most half its life)."""

LEASE: Final = timedelta(seconds=30)
"""How long a refresher may hold a credential's lease before another may take it over."""

MAX_TOKEN_LENGTH: Final = 4096
_SCOPE_SEPARATOR: Final = " "


def new_state() -> str:
    """An unguessable ``state`` for one authorisation (256 bits)."""
    return secrets.token_urlsafe(32)


def new_verifier() -> str:
    """A PKCE code verifier: 86 unreserved characters (RFC 7636 section 4.1 allows 43-128)."""
    return secrets.token_urlsafe(64)


def challenge_of(verifier: str) -> str:
    """The ``S256`` code challenge of ``verifier`` (RFC 7636 section 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(
    base_url: str,
    *,
    developer_key_id: str,
    redirect_uri: str,
    state: str,
    verifier: str,
    scopes: tuple[str, ...] | None,
) -> str:
    """The Canvas URL the worker user opens once to grant the developer key access.

    With ``scopes`` (the key's recorded list) the grant asks for exactly those; without, for
    whatever the key gives (Canvas: a key that does not enforce scopes issues unscoped tokens).
    """
    query = {
        "client_id": developer_key_id,
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "state": state,
        "code_challenge": challenge_of(verifier),
        "code_challenge_method": "S256",
    }
    if scopes:
        query["scope"] = _SCOPE_SEPARATOR.join(scopes)
    return f"{base_url}{AUTHORIZE_PATH}?{urlencode(query)}"


@dataclass(frozen=True, slots=True)
class CanvasGrant:
    """What Canvas's token endpoint issued: an access token and, first time, a refresh token."""

    access_token: str
    expires_in: int | None
    refresh_token: str | None
    user_id: str | None
    user_name: str | None

    def __repr__(self) -> str:
        return f"CanvasGrant(expires_in={self.expires_in}, user_id={self.user_id!r})"


@dataclass(frozen=True, slots=True)
class CanvasRefusal:
    """Canvas refused the grant (RFC 6749 section 5.2): the credential needs an admin."""

    status: int
    error: str
    description: str | None


_ERROR_TEXT: Final = 100


def _text(value: object, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def read_token_response(status: int, body: bytes) -> CanvasGrant | CanvasRefusal | None:  # noqa: PLR0911
    """Canvas's token endpoint answer: a grant, a refusal, or None (not an OAuth answer).

    A refusal is a 4xx with an OAuth ``error`` (``invalid_grant`` for a revoked or unknown
    refresh token or code, ``invalid_client`` for a disabled key or wrong secret); anything
    else unexpected (5xx, HTML, a body without a token) is None: a fault to retry, not a
    verdict on the credential.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    if 400 <= status < 500:  # noqa: PLR2004 - the client-error class
        error = _text(payload.get("error"), _ERROR_TEXT)
        if error is None:
            return None
        return CanvasRefusal(status, error, _text(payload.get("error_description"), 255))
    if status != 200:  # noqa: PLR2004
        return None
    access = payload.get("access_token")
    if not isinstance(access, str) or not 0 < len(access) <= MAX_TOKEN_LENGTH:
        return None
    refresh = payload.get("refresh_token")
    expires_in = payload.get("expires_in")
    user = payload.get("user")
    user_id = user.get("id") if isinstance(user, dict) else None
    user_name = user.get("name") if isinstance(user, dict) else None
    return CanvasGrant(
        access_token=access,
        expires_in=expires_in
        if isinstance(expires_in, int) and not isinstance(expires_in, bool) and expires_in > 0
        else None,
        refresh_token=refresh
        if isinstance(refresh, str) and 0 < len(refresh) <= MAX_TOKEN_LENGTH
        else None,
        user_id=None if isinstance(user_id, bool) or user_id in (None, "") else str(user_id),
        user_name=_text(user_name, 255),
    )


def refresh_at(expires_at: datetime, lifetime: timedelta) -> datetime:
    """When to refresh an access token living ``lifetime`` that expires at ``expires_at``."""
    margin = min(REFRESH_MARGIN, lifetime / 2)
    return expires_at - margin
