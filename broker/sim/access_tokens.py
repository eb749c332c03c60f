"""Canvas's Access Tokens API: show, create, update (regenerate) and delete a user's tokens.

Follows canvas-lms `app/controllers/tokens_controller.rb` (parameters, errors, the lookup by id
or token hint, regeneration), `app/models/access_token.rb` (the permission policy: a user
manages its own tokens; `regenerate`; `visible_token`) and `lib/api/v1/token.rb` (the JSON).

Plain tokens from `SimState.tokens` are given manual-token records for user 1 on first use of
this API, so they can be shown, regenerated and deleted like any other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from broker.sim.credentials import DEFAULT_KEY_NAME, HINT_LENGTH, AccessToken
from broker.sim.responses import error_response, json_response

if TYPE_CHECKING:
    from starlette.responses import Response

    from broker.sim.app import ApiCall
    from broker.sim.data import User
    from broker.sim.state import SimState

NOT_FOUND: Final = "The specified resource does not exist."
UNAUTHORIZED_BODY: Final = {
    "status": "unauthorized",
    "errors": [{"message": "user not authorized to perform that action"}],
}
EXPIRED_REGENERATE: Final = "cannot regenerate an expired token without a new expiration date"
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


class _ExpiryError(ValueError):
    pass


def _is_true(value: object) -> bool:
    """`Canvas::Plugin.value_to_boolean` for the values a form or JSON body carries."""
    return value is True or (isinstance(value, str) and value.strip().lower() in _TRUE_WORDS)


def _parse_expiry(value: object) -> datetime | None:
    """`token[expires_at]` as Rails's `Time.zone.parse` would read it (UTC when no zone)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _ExpiryError
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise _ExpiryError from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class AccessTokensApi:
    """The `/api/v1/users/:user_id/tokens` endpoints, as `_CanvasApi` handlers."""

    def __init__(self, state: SimState) -> None:
        self.state = state

    # --- lookups -----------------------------------------------------------------------------

    def _context(self, call: ApiCall) -> User | None:
        ref = call.path_param("user_id")
        return call.user if ref == "self" else self.state.data.find_user(ref)

    def _find(self, context: User, ref: str) -> AccessToken | None:
        """`find_token`: by token hint when `ref` has the hint's length, else by database id."""
        self.state.sync_plain_tokens()
        mine = [t for t in self.state.access_tokens.values() if t.user_id == context.id]
        if len(ref) == HINT_LENGTH:
            by_hint = next((t for t in mine if t.token_hint == ref), None)
            if by_hint is not None:
                return by_hint
        return next((t for t in mine if ref.isdigit() and t.id == int(ref)), None)

    def _app_name(self, token: AccessToken) -> str:
        if token.developer_key_id is None:
            return DEFAULT_KEY_NAME
        key = self.state.developer_keys.get(token.developer_key_id)
        return key.name if key is not None else "No App"

    def _render(self, call: ApiCall, token: AccessToken, *, reveal: bool = False) -> Response:
        payload = token.to_json(self.state.utcnow(), self._app_name(token), reveal=reveal)
        return json_response(call.request.headers, payload)

    def _located(self, call: ApiCall) -> AccessToken | Response:
        context = self._context(call)
        token = None if context is None else self._find(context, call.path_param("token_id"))
        if token is None:
            return error_response(call.request.headers, 404, NOT_FOUND)
        return token

    # --- endpoints ---------------------------------------------------------------------------

    def show(self, call: ApiCall) -> Response:
        """GET /api/v1/users/:user_id/tokens/:id (`:id` a database id or a token hint)."""
        token = self._located(call)
        if not isinstance(token, AccessToken):
            return token
        if token.user_id != call.user.id:
            return json_response(call.request.headers, UNAUTHORIZED_BODY, 401)
        return self._render(call, token)

    def create(self, call: ApiCall) -> Response:
        """POST /api/v1/users/:user_id/tokens: returns the full token once, in `visible_token`."""
        headers = call.request.headers
        fields = call.params.get("token")
        if not isinstance(fields, dict):
            return error_response(headers, 400, "token is missing")
        if "purpose" not in fields:
            return json_response(headers, [{"message": "token[purpose] is missing"}], 400)
        context = self._context(call)
        if context is None:
            return error_response(headers, 404, NOT_FOUND)
        if context.id != call.user.id:
            return json_response(headers, UNAUTHORIZED_BODY, 401)
        try:
            expires_at = _parse_expiry(fields.get("expires_at"))
        except _ExpiryError:
            return json_response(headers, [{"message": "Invalid expiration date format"}], 400)
        token = self.state.add_manual_token(
            purpose=str(fields["purpose"]),
            expires_at=expires_at,
            user_id=context.id,
            scopes=_scopes(fields),
        )
        return self._render(call, token, reveal=True)

    def update(self, call: ApiCall) -> Response:
        """PUT /api/v1/users/:user_id/tokens/:id: purpose, expiry, scopes, `regenerate`."""
        headers = call.request.headers
        token = self._located(call)
        if not isinstance(token, AccessToken):
            return token
        if token.user_id != call.user.id:
            return error_response(headers, 404, NOT_FOUND)
        fields = call.params.get("token")
        if not isinstance(fields, dict):
            return error_response(headers, 400, "token is missing")
        try:
            expires_at = _parse_expiry(fields.get("expires_at"))
        except _ExpiryError:
            return json_response(headers, [{"message": "Invalid expiration date format"}], 400)
        regenerate = _is_true(fields.get("regenerate")) and token.manually_created
        if regenerate and token.expired(self.state.utcnow()) and "expires_at" not in fields:
            return json_response(headers, {"errors": {"message": EXPIRED_REGENERATE}}, 400)
        if regenerate:
            self.state.regenerate(token)
        if "purpose" in fields:
            token.purpose = str(fields["purpose"])
        if "expires_at" in fields:
            token.permanent_expires_at = expires_at
        if "scopes" in fields:
            token.scopes = _scopes(fields)
        token.updated_at = self.state.utcnow()
        return self._render(call, token, reveal=regenerate)

    def delete(self, call: ApiCall) -> Response:
        """DELETE /api/v1/users/:user_id/tokens/:id: the token stops working at once."""
        token = self._located(call)
        if not isinstance(token, AccessToken):
            return token
        if token.user_id != call.user.id:
            return error_response(call.request.headers, 404, NOT_FOUND)
        self.state.delete_token(token)
        return self._render(call, token)


def _scopes(fields: dict[str, Any]) -> list[str]:
    scopes = fields.get("scopes")
    if scopes is None or scopes == "":
        return []
    return [str(s) for s in (scopes if isinstance(scopes, list) else [scopes])]
