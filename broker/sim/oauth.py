"""Canvas's OAuth2 provider: `/login/oauth2/auth`, the consent page, `/login/oauth2/token`.

Follows canvas-lms `app/controllers/oauth2_provider_controller.rb` (auth, accept, deny, token,
destroy), `lib/canvas/oauth/provider.rb` (key, redirect and scope checks; the final redirect),
`lib/canvas/oauth/grant_types/*.rb` (authorization_code, its PKCE variant, refresh_token),
`lib/canvas/oauth/request_error.rb` and `invalid_scope_error.rb` (error bodies),
`lib/canvas/oauth/pkce.rb` (S256 only) and `lib/canvas/oauth/token.rb` (the token JSON).

Canvas logs the user in and keeps the request in its session; the simulator shows a consent
page with a "Log in as" field instead and keeps the validated request server-side under an
opaque `request_id`. No secret or token value is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import secrets
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode

from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from broker.sim.auth import Refused, authenticate
from broker.sim.credentials import (
    CODE_LIFETIME,
    GLOBAL_ID_BASE,
    AccessToken,
    AuthorizationCode,
    DeveloperKey,
    PendingAuthorization,
)
from broker.sim.responses import json_response
from broker.sim.scopes import missing_scopes, to_sentence

if TYPE_CHECKING:
    from starlette.datastructures import Headers

    from broker.sim.state import SimState

OOB_URI: Final = "urn:ietf:wg:oauth:2.0:oob"
"""`Canvas::OAuth::Provider::OAUTH2_OOB_URI`."""

PKCE_METHODS: Final = frozenset({"S256"})
"""`Canvas::OAuth::PKCE::SUPPORTED_METHODS`."""

OAUTH_CHALLENGE: Final = {"WWW-Authenticate": "Canvas OAuth 2.0"}
"""What `oauth_error` adds to a 401 from the provider."""

# Canvas::OAuth::RequestError::ERROR_MAP: (error, error_description, status).
ERRORS: Final[dict[str, tuple[str, str, int]]] = {
    "invalid_client_id": ("invalid_client", "unknown client", 401),
    "invalid_client_secret": ("invalid_client", "invalid client", 401),
    "invalid_redirect": ("invalid_request", "redirect_uri does not match client settings", 400),
    "invalid_refresh_token": ("invalid_request", "refresh_token not found", 400),
    "invalid_authorization_code": ("invalid_grant", "authorization_code not found", 400),
    "incorrect_client": ("invalid_grant", "incorrect client", 400),
    "authorization_code_not_supplied": (
        "invalid_request",
        "You must provide the code parameter when using the authorization_code grant type",
        400,
    ),
    "refresh_token_not_supplied": (
        "invalid_request",
        "You must provide the refresh_token parameter when using the refresh_token grant type",
        400,
    ),
    "unsupported_grant_type": (
        "unsupported_grant_type",
        "The grant_type you requested is not currently supported",
        400,
    ),
    # Raised by the PKCE grant; its description is the simulator's (not verified).
    "invalid_grant": ("invalid_grant", "The provided authorization grant is invalid", 400),
}

INVALID_SCOPE_TEXT: Final = (
    "A requested scope is invalid, unknown, malformed, or exceeds the scope granted by the "
    "resource owner. The following scopes were requested, but not granted: "
)
NO_SESSION_TEXT: Final = "Invalid or missing session for oauth"
LOGOUT_WITHOUT_OAUTH_TEXT: Final = (
    "can't delete OAuth access token when not using an OAuth access token"
)


class OAuthError(Exception):
    """A `Canvas::OAuth::RequestError`, by its ERROR_MAP name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.error, self.description, self.status_code = ERRORS[name]


def oauth_error_response(headers: Headers, exc: OAuthError) -> Response:
    """`oauth_error`: the JSON error, with `WWW-Authenticate: Canvas OAuth 2.0` on a 401."""
    body = {"error": exc.error, "error_description": exc.description}
    extra = OAUTH_CHALLENGE if exc.status_code == 401 else None  # noqa: PLR2004
    return json_response(headers, body, exc.status_code, extra)


def final_redirect(redirect_uri: str, params: dict[str, str | None]) -> str:
    """`Provider.final_redirect`: the redirect URI plus the sorted, escaped `to_query`."""
    present = sorted((k, v) for k, v in params.items() if v is not None)
    if redirect_uri == OOB_URI:
        return f"/login/oauth2/auth?{urlencode(present)}"
    joiner = "&" if "?" in redirect_uri else "?"
    return f"{redirect_uri}{joiner}{urlencode(present)}"


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: base64url(SHA-256(verifier)) without padding, as Canvas computes it."""
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _text(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    return value if isinstance(value, str) else None


def _basic_credentials(headers: Headers) -> tuple[str | None, str | None]:
    scheme, _, encoded = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    user, _, password = decoded.partition(":")
    return user, password


class OAuthProvider:
    """The OAuth2 endpoints over one `SimState`; handlers take Rails-merged params."""

    def __init__(self, state: SimState) -> None:
        self.state = state

    # --- keys ----------------------------------------------------------------------------------

    def _usable_key(self, client_id: str | None) -> DeveloperKey:
        """`has_valid_key?`: an integer client id naming an active key."""
        if not client_id or not client_id.isdigit():
            raise OAuthError("invalid_client_id")
        key = self.state.developer_keys.get(client_id)
        if key is None or not key.active:
            raise OAuthError("invalid_client_id")
        return key

    def _requesting_key(self, client_id: str | None, redirect_uri: str) -> DeveloperKey:
        """`has_valid_key?`, then `has_valid_redirect?`: the OOB URI or a registered URI."""
        key = self._usable_key(client_id)
        if redirect_uri != OOB_URI and (not redirect_uri or redirect_uri not in key.redirect_uris):
            raise OAuthError("invalid_redirect")
        return key

    # --- GET /login/oauth2/auth -----------------------------------------------------------

    def auth(self, headers: Headers, params: dict[str, Any]) -> Response:
        """Validate the request as Canvas does, then show the simulated consent page."""
        if "code" in params or "error" in params:
            return HTMLResponse("<!doctype html><title>Canvas</title><p>Done.</p>")
        raw_scope = _text(params, "scope") or _text(params, "scopes") or ""
        scopes = tuple(raw_scope.split())
        redirect_uri = _text(params, "redirect_uri") or ""
        state = _text(params, "state")
        try:
            key = self._requesting_key(_text(params, "client_id"), redirect_uri)
        except OAuthError as exc:
            return oauth_error_response(headers, exc)
        if key.require_scopes and (not scopes or missing_scopes(scopes, key.scopes)):
            return self._invalid_scope(headers, redirect_uri, missing_scopes(scopes, key.scopes))
        if _text(params, "response_type") != "code":
            return self._redirect(
                redirect_uri,
                error="unsupported_response_type",
                error_description="Only response_type=code is permitted",
                state=state,
            )
        pending = PendingAuthorization(
            client_id=key.client_id,
            redirect_uri=redirect_uri,
            scopes=scopes,
            state=state,
            purpose=_text(params, "purpose"),
            code_challenge=self._challenge(params),
        )
        request_id = secrets.token_urlsafe(24)
        self.state.pending_authorizations[request_id] = pending
        return HTMLResponse(consent_page(request_id, key, pending))

    @staticmethod
    def _challenge(params: dict[str, Any]) -> str | None:
        """`PKCE.use_pkce_in_authorization?`: both parameters, and the method S256."""
        challenge = _text(params, "code_challenge")
        method = _text(params, "code_challenge_method")
        return challenge if challenge and method in PKCE_METHODS else None

    def _invalid_scope(self, headers: Headers, redirect_uri: str, missing: list[str]) -> Response:
        """`InvalidScopeError`: a redirect with the error (a 400 JSON body for the OOB URI)."""
        description = INVALID_SCOPE_TEXT + to_sentence(missing)
        if redirect_uri == OOB_URI:
            body = {"error": "invalid_scope", "error_description": description}
            return json_response(headers, body, 400)
        return self._redirect(redirect_uri, error="invalid_scope", error_description=description)

    @staticmethod
    def _redirect(redirect_uri: str, **params: str | None) -> Response:
        return RedirectResponse(final_redirect(redirect_uri, params), 302)

    # --- POST /login/oauth2/accept (the consent form) -----------------------------------------

    def accept(self, params: dict[str, Any]) -> Response:
        """Authorize (302 with `code` and `state`) or cancel (302 with `error=access_denied`)."""
        pending = self.state.pending_authorizations.pop(_text(params, "request_id") or "", None)
        if pending is None:
            return PlainTextResponse(NO_SESSION_TEXT, 400)
        if "cancel" in params:
            return self._redirect(pending.redirect_uri, error="access_denied", state=pending.state)
        user = self.state.data.find_user(_text(params, "user_id") or "1")
        if user is None:
            return PlainTextResponse("Log in as: no such simulator user", 400)
        code = secrets.token_hex(64)  # Canvas: SecureRandom.hex(64)
        self.state.codes[code] = AuthorizationCode(
            client_id=pending.client_id,
            user_id=user.id,
            scopes=pending.scopes,
            purpose=pending.purpose,
            expires_at=self.state.clock() + CODE_LIFETIME,
            code_challenge=pending.code_challenge,
        )
        return self._redirect(pending.redirect_uri, code=code, state=pending.state)

    # --- POST /login/oauth2/token ----------------------------------------------------------

    def token(self, headers: Headers, params: dict[str, Any]) -> Response:
        """The token endpoint: `authorization_code` and `refresh_token` grants."""
        basic_user, basic_password = _basic_credentials(headers)
        client_id = _text(params, "client_id") or basic_user
        secret = _text(params, "client_secret") or basic_password
        grant_type = _text(params, "grant_type")
        if grant_type is None and "code" in params:
            grant_type = "authorization_code"
        try:
            payload = self._grant(grant_type, client_id, secret, params)
        except OAuthError as exc:
            return oauth_error_response(headers, exc)
        return json_response(headers, payload)

    def _grant(
        self,
        grant_type: str | None,
        client_id: str | None,
        secret: str | None,
        params: dict[str, Any],
    ) -> dict[str, Any]:
        if grant_type == "authorization_code":
            return self._code_grant(self._client(client_id, secret), params)
        if grant_type == "refresh_token":
            return self._refresh_grant(self._client(client_id, secret), params)
        raise OAuthError("unsupported_grant_type")

    def _client(self, client_id: str | None, secret: str | None) -> DeveloperKey:
        """`validate_client_id_and_secret`: an active key, and its secret."""
        key = self._usable_key(client_id)
        if not secret or not secrets.compare_digest(secret, key.secret):
            raise OAuthError("invalid_client_secret")
        return key

    def _take_code(self, key: DeveloperKey, params: dict[str, Any]) -> AuthorizationCode:
        """`AuthorizationCode(WithPKCE)#validate_type`, then expire the code (single use)."""
        code = _text(params, "code")
        stored = self.state.codes.get(code) if code else None
        if "code_verifier" in params or (stored is not None and stored.code_challenge):
            # The PKCE grant checks the verifier first; the stored challenge is consumed either way.
            verifier = _text(params, "code_verifier")
            challenge = stored.code_challenge if stored is not None else None
            if stored is not None and code is not None:
                self.state.codes[code] = _without_challenge(stored)
            if not verifier or challenge is None or pkce_challenge(verifier) != challenge:
                raise OAuthError("invalid_grant")
        if not code:
            raise OAuthError("authorization_code_not_supplied")
        if stored is None or stored.expires_at <= self.state.clock():
            self.state.codes.pop(code, None)
            raise OAuthError("invalid_authorization_code")
        if stored.client_id != key.client_id:
            raise OAuthError("incorrect_client")
        del self.state.codes[code]
        return stored

    def _code_grant(self, key: DeveloperKey, params: dict[str, Any]) -> dict[str, Any]:
        grant = self._take_code(key, params)
        record = self.state.issue_oauth_token(key, grant.user_id, grant.scopes, grant.purpose)
        return self._token_json(record, include_refresh=True)

    def _refresh_grant(self, key: DeveloperKey, params: dict[str, Any]) -> dict[str, Any]:
        """Regenerate the access token; the refresh token stays the same and is not returned."""
        refresh = _text(params, "refresh_token")
        if not refresh:
            raise OAuthError("refresh_token_not_supplied")
        record = self.state.find_refresh_token(refresh)
        if record is None or not self._refreshable(record):
            raise OAuthError("invalid_refresh_token")
        if record.developer_key_id != key.client_id:
            raise OAuthError("incorrect_client")
        self.state.regenerate(record)
        key.refresh_count += 1
        return self._token_json(record, include_refresh=False)

    def _refreshable(self, record: AccessToken) -> bool:
        """`usable?(:crypted_refresh_token)`: not expired, its key active (age does not count)."""
        if record.expired(self.state.utcnow()) or record.developer_key_id is None:
            return False
        owner = self.state.developer_keys.get(record.developer_key_id)
        return owner is not None and owner.active

    def _token_json(self, record: AccessToken, *, include_refresh: bool) -> dict[str, Any]:
        """`Canvas::OAuth::Token#as_json`."""
        user = self.state.data.users[record.user_id]
        payload: dict[str, Any] = {
            "access_token": record.value,
            "token_type": "Bearer",
            "user": {
                "id": user.id,
                "name": user.name,
                "global_id": str(GLOBAL_ID_BASE + user.id),
                "effective_locale": "en",
            },
        }
        if include_refresh and record.refresh_token is not None:
            payload["refresh_token"] = record.refresh_token
        if record.expires_at is not None:
            payload["expires_in"] = round(record.expires_at - self.state.clock())
        return payload

    # --- DELETE /login/oauth2/token ------------------------------------------------------------

    def logout(self, headers: Headers, token: str | None) -> Response:
        """`destroy`: delete the calling token (and so its refresh token)."""
        if not token:
            return json_response(headers, {"message": LOGOUT_WITHOUT_OAUTH_TEXT}, 400)
        self.state.sync_plain_tokens()
        auth = authenticate(self.state, token)
        if isinstance(auth, Refused):
            return json_response(headers, auth.body, auth.status_code, auth.headers)
        record = auth.record or self.state.find_token(token)
        if record is not None:
            self.state.delete_token(record)
        return json_response(headers, {})


def _without_challenge(code: AuthorizationCode) -> AuthorizationCode:
    return AuthorizationCode(
        client_id=code.client_id,
        user_id=code.user_id,
        scopes=code.scopes,
        purpose=code.purpose,
        expires_at=code.expires_at,
    )


def consent_page(request_id: str, key: DeveloperKey, pending: PendingAuthorization) -> str:
    """The simulated login-and-consent page: plain HTML, no JavaScript."""
    escape = html.escape
    scopes = "".join(f"<li><code>{escape(s)}</code></li>" for s in pending.scopes) or (
        "<li>all of your account (no scopes requested)</li>"
    )
    return f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Authorize {escape(key.name)} | Canvas simulator</title></head>
<body>
<h1>{escape(key.name)} is requesting access to your account</h1>
<p>Redirects to <code>{escape(pending.redirect_uri)}</code>.</p>
<ul id="scopes">{scopes}</ul>
<form method="post" action="/login/oauth2/accept">
<input type="hidden" name="request_id" value="{escape(request_id)}">
<label for="user_id">Log in as (Canvas user id)</label>
<input type="text" id="user_id" name="user_id" value="1">
<button type="submit" id="authorize" name="authorize" value="1">Authorize</button>
<button type="submit" id="cancel" name="cancel" value="1">Cancel</button>
</form>
</body>
</html>
"""
