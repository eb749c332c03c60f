"""Authenticating an API call's access token, and enforcing a scoped developer key.

Follows Canvas's `lib/authentication_methods.rb` (`load_pseudonym_from_access_token`,
`validate_scopes`), `app/models/access_token.rb` (`usable?`: not expired, not pending, the
developer key usable, an OAuth token not past its `expires_at`) and the error bodies of
`app/controllers/application_controller.rb#api_error_json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from broker.sim.credentials import canvas_time
from broker.sim.data import ADMIN_USER_ID
from broker.sim.scopes import scopes_allow

if TYPE_CHECKING:
    from broker.sim.credentials import AccessToken, DeveloperKey
    from broker.sim.state import SimState

INVALID_TOKEN: Final = "Invalid access token."  # noqa: S105 - a message, not a secret
EXPIRED_TOKEN: Final = "Expired access token."  # noqa: S105
REVOKED_TOKEN: Final = "Revoked access token."  # noqa: S105
INSUFFICIENT_SCOPES: Final = "Insufficient scopes on access token."
BEARER_CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="canvas-lms"'}


@dataclass(frozen=True)
class Authenticated:
    """A usable token: whose it is, its record (None for a plain token) and its key."""

    user_id: int
    record: AccessToken | None = None
    key: DeveloperKey | None = None


@dataclass(frozen=True)
class Refused:
    """Canvas's answer to an unusable token or a call outside its scopes."""

    status_code: int
    body: dict[str, Any]
    challenge: bool
    """Whether Canvas adds `WWW-Authenticate: Bearer realm="canvas-lms"` (not for scopes)."""

    @property
    def headers(self) -> dict[str, str]:
        """The response headers this refusal carries."""
        return dict(BEARER_CHALLENGE) if self.challenge else {}


def _refused(message: str, **extra: str | None) -> Refused:
    return Refused(401, {"errors": [{"message": message, **extra}]}, challenge=True)


def _check_record(state: SimState, record: AccessToken) -> Authenticated | Refused:
    now = state.utcnow()
    if record.deleted:
        return _refused(REVOKED_TOKEN)
    if record.plain and record.value not in state.tokens:
        return _refused(INVALID_TOKEN)  # taken out of `SimState.tokens` by a test
    if record.expired(now):
        return _refused(EXPIRED_TOKEN, expired_at=canvas_time(record.permanent_expires_at))
    key = None
    if record.developer_key_id is not None:
        key = state.developer_keys.get(record.developer_key_id)
        if key is None or not key.active or record.needs_refresh(state.clock()):
            return _refused(INVALID_TOKEN)
    record.last_used_at = now
    return Authenticated(record.user_id, record, key)


def authenticate(state: SimState, value: str | None) -> Authenticated | Refused:
    """Authenticate access-token `value` as Canvas does for an API call."""
    if not value:
        return _refused(INVALID_TOKEN)
    record = state.find_token(value)
    if record is not None:
        return _check_record(state, record)
    if value in state.tokens:
        return Authenticated(ADMIN_USER_ID)
    return _refused(INVALID_TOKEN)


def check_scopes(auth: Authenticated, method: str, raw_path: str) -> Refused | None:
    """`validate_scopes`: refuse a call outside the token's scopes when its key enforces them."""
    if auth.key is None or not auth.key.require_scopes or auth.record is None:
        return None
    if scopes_allow(auth.record.scopes, method, raw_path):
        return None
    body = {"errors": [{"message": INSUFFICIENT_SCOPES}]}
    return Refused(401, body, challenge=False)
