"""The simulator's mutable state: data, tokens and developer keys, the throttle, requests."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from broker.sim.credentials import (
    GLOBAL_ID_BASE,
    AccessToken,
    AuthorizationCode,
    DeveloperKey,
    PendingAuthorization,
    new_token_value,
)
from broker.sim.data import ADMIN_USER_ID, SimData, seed_data
from broker.sim.throttle import CanvasThrottle, Throttle

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

DEFAULT_FILE_HOST = "http://files.sim.invalid"


@dataclass(frozen=True)
class ReceivedRequest:
    """One HTTP request exactly as it reached the simulator, before anything acted on it.

    `method` is the method on the wire, before any `_method` override. `raw_path` is the
    percent-encoded path as sent; `query_string` is the raw query without the `?`. Header names
    are lower-case; values, order and duplicates are as received.
    """

    method: str
    raw_path: str
    query_string: str
    headers: list[tuple[str, str]]
    body: bytes

    def header_values(self, name: str) -> list[str]:
        """Return every value received for header `name` (case-insensitive), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key == wanted]

    def header(self, name: str) -> str | None:
        """Return the first value received for header `name`, or None if it was not sent."""
        values = self.header_values(name)
        return values[0] if values else None

    @property
    def target(self) -> str:
        """The request target: raw path plus `?query` when there was one."""
        return f"{self.raw_path}?{self.query_string}" if self.query_string else self.raw_path


@dataclass
class SimState:
    """Everything one simulator instance knows; share it with the test that drives it.

    `throttle` is Canvas's request throttle (`broker.sim.throttle.CanvasThrottle`) or the
    simpler `SimpleThrottle`, both on `clock`. `latency` is how long
    each API call takes before it is answered, so parallel calls are in flight together, as
    Canvas's up-front cost needs them to be to show. `clock` is injectable so tests need
    not sleep; wall time (`utcnow`, for token timestamps and manual-token expiry) moves with it.

    `tokens` are plain accepted tokens, all belonging to user 1, with no expiry and no scopes
    (the Access Tokens API lists them as manual tokens once it is used). `access_tokens` are
    token records by id: manual tokens (`add_manual_token`, `POST /api/v1/users/:id/tokens`)
    and OAuth tokens issued under `developer_keys` (keyed by client id).
    `oauth_access_token_lifetime` is how long an OAuth access token works before it needs a
    refresh (Canvas: one hour).
    """

    tokens: set[str] = field(default_factory=set)
    developer_keys: dict[str, DeveloperKey] = field(default_factory=dict)
    access_tokens: dict[int, AccessToken] = field(default_factory=dict)
    oauth_access_token_lifetime: float = 3600.0
    codes: dict[str, AuthorizationCode] = field(default_factory=dict, repr=False)
    pending_authorizations: dict[str, PendingAuthorization] = field(
        default_factory=dict, repr=False
    )
    data: SimData = field(default_factory=seed_data)
    file_host: str = DEFAULT_FILE_HOST
    throttle: Throttle = field(default_factory=CanvasThrottle)
    latency: float = 0.0
    max_per_page: int = 100
    clock: Callable[[], float] = time.monotonic
    received: list[ReceivedRequest] = field(default_factory=list)
    _wall_offset: float = field(init=False, repr=False, default=0.0)

    def __post_init__(self) -> None:
        """Tie wall time to `clock`, so advancing an injected clock advances both."""
        self._wall_offset = time.time() - self.clock()

    def clear(self) -> None:
        """Forget the requests received so far."""
        self.received.clear()

    def received_paths(self) -> list[str]:
        """Return the raw path of every request received so far, in order."""
        return [request.raw_path for request in self.received]

    # --- time --------------------------------------------------------------------------------

    def utcnow(self) -> datetime:
        """Wall time in UTC, moving with `clock` (token timestamps, manual-token expiry)."""
        return datetime.fromtimestamp(self.clock() + self._wall_offset, UTC)

    # --- developer keys ------------------------------------------------------------------------

    def add_developer_key(
        self,
        client_id: str | None = None,
        secret: str | None = None,
        redirect_uris: Iterable[str] = (),
        scopes: Iterable[str] = (),
        *,
        require_scopes: bool = False,
        active: bool = True,
        name: str = "Sim Developer Key",
    ) -> DeveloperKey:
        """Register a developer key; the client id defaults to the next Canvas-style global id."""
        if client_id is None:
            client_id = str(GLOBAL_ID_BASE + len(self.developer_keys) + 1)
        key = DeveloperKey(
            client_id=client_id,
            secret=secret if secret is not None else new_token_value(),
            redirect_uris=list(redirect_uris),
            scopes=list(scopes),
            require_scopes=require_scopes,
            active=active,
            name=name,
        )
        self.developer_keys[client_id] = key
        return key

    def disable_developer_key(self, client_id: str) -> None:
        """Turn a key off: its access and refresh tokens stop working at once."""
        self.developer_keys[client_id].active = False

    def enable_developer_key(self, client_id: str) -> None:
        """Turn a key back on: its unexpired tokens work again, as in Canvas."""
        self.developer_keys[client_id].active = True

    @property
    def refresh_count(self) -> int:
        """Refresh grants served so far, over all developer keys."""
        return sum(key.refresh_count for key in self.developer_keys.values())

    # --- token records ---------------------------------------------------------------------------

    def _new_token(self, user_id: int, **fields: object) -> AccessToken:
        now = self.utcnow()
        token_id = max(self.access_tokens, default=0) + 1
        record = AccessToken(
            id=token_id,
            user_id=user_id,
            value=str(fields.pop("value", None) or new_token_value()),
            created_at=now,
            updated_at=now,
        )
        for name, value in fields.items():
            setattr(record, name, value)
        self.access_tokens[token_id] = record
        return record

    def add_manual_token(
        self,
        value: str | None = None,
        purpose: str = "simulator token",
        expires_at: datetime | None = None,
        user_id: int = ADMIN_USER_ID,
        scopes: Iterable[str] = (),
    ) -> AccessToken:
        """Create a manual (user-generated) token record, as `POST /users/:id/tokens` does."""
        return self._new_token(
            user_id,
            value=value,
            purpose=purpose,
            permanent_expires_at=expires_at,
            scopes=list(scopes),
        )

    def issue_oauth_token(
        self, key: DeveloperKey, user_id: int, scopes: Iterable[str], purpose: str | None
    ) -> AccessToken:
        """Create an OAuth access token with a refresh token, expiring after the lifetime."""
        return self._new_token(
            user_id,
            developer_key_id=key.client_id,
            scopes=list(scopes),
            purpose=purpose or key.name,
            refresh_token=new_token_value(),
            expires_at=self.clock() + self.oauth_access_token_lifetime,
        )

    def regenerate(self, record: AccessToken) -> None:
        """Give a token a new value; the old one stops working at once.

        An OAuth token's one-hour clock restarts (`AccessToken#generate_token(true)`).
        """
        if record.plain:
            self.tokens.discard(record.value)
        record.value = new_token_value()
        record.plain = False
        record.updated_at = self.utcnow()
        if record.developer_key_id is not None:
            record.expires_at = self.clock() + self.oauth_access_token_lifetime

    def delete_token(self, record: AccessToken) -> None:
        """Delete (revoke) a token and, with it, its refresh token (`AccessToken#destroy`)."""
        if record.plain:
            self.tokens.discard(record.value)
        record.workflow_state = "deleted"
        record.updated_at = self.utcnow()

    def find_token(self, value: str) -> AccessToken | None:
        """The record holding access-token `value`, an undeleted one first, as Canvas orders."""
        found = [r for r in self.access_tokens.values() if secrets.compare_digest(r.value, value)]
        found.sort(key=lambda r: r.deleted)
        return found[0] if found else None

    def find_refresh_token(self, value: str) -> AccessToken | None:
        """The undeleted record holding refresh token `value` (`authenticate_refresh_token`)."""
        for record in self.access_tokens.values():
            refresh = record.refresh_token
            if (
                refresh is not None
                and not record.deleted
                and secrets.compare_digest(refresh, value)
            ):
                return record
        return None

    def sync_plain_tokens(self) -> None:
        """Give every plain token in `tokens` a manual-token record for user 1, once."""
        known = {r.value for r in self.access_tokens.values() if r.plain}
        for value in sorted(self.tokens - known):
            self._new_token(ADMIN_USER_ID, value=value, purpose="simulator token", plain=True)
