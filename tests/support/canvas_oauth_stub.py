"""An independent stub of Canvas's OAuth2 provider and one API route, for OAuth credential tests.

Deliberately not the project's simulator (``broker.sim``): the broker's OAuth credentials are
checked against a second, minimal reading of Canvas's endpoints written from Canvas's docs
and sources (canvas-lms doc/api/oauth_endpoints.md; lib/canvas/oauth/pkce.rb for S256;
lib/canvas/oauth/grant_types/refresh_token.rb: a refresh regenerates the access token in
place, so the previous one stops working at once; lib/canvas/oauth/token.rb for the JSON).

- ``GET /login/oauth2/auth`` consents at once (no page) and redirects with a code and state;
- ``POST /login/oauth2/token``: ``authorization_code`` (secret, redirect URI, S256 verifier)
  and ``refresh_token``; a disabled key is ``401 invalid_client``, an unknown refresh token
  ``400 invalid_grant``;
- ``GET /api/v1/<anything>`` answers 200 to a live access token, else Canvas's 401 with
  ``WWW-Authenticate``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlencode

from broker.serving import BackgroundServer

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send


@dataclass
class StubState:
    """The stub's developer key, grants and what it received."""

    client_id: str = "10000000000042"
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    user: dict[str, object] = field(default_factory=lambda: {"id": 77, "name": "Worker Bot"})
    expires_in: int = 3600
    enabled: bool = True
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # refresh → live access
    live: set[str] = field(default_factory=set)
    expiry: dict[str, float] = field(default_factory=dict)
    refreshes: int = 0
    api_calls: list[str] = field(default_factory=list)  # the bearer of each API call
    token_requests: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def issued(self) -> set[str]:
        """Every secret the stub ever issued (none may show in the broker's output)."""
        with self.lock:
            return {*self.refresh_tokens, *self.expiry, self.client_secret}

    def _issue(self) -> str:
        access = secrets.token_urlsafe(32)
        self.live.add(access)
        self.expiry[access] = time.monotonic() + self.expires_in
        return access


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(
    send: Send, status: int, body: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _one(query: dict[str, list[str]], name: str) -> str:
    return (query.get(name) or [""])[0]


class CanvasOAuthStub:
    """The ASGI app over a ``StubState``."""

    def __init__(self, state: StubState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        query = parse_qs(scope.get("query_string", b"").decode())
        if path == "/login/oauth2/auth" and method == "GET":
            await self._authorize(query, send)
        elif path == "/login/oauth2/token" and method == "POST":
            form = parse_qs((await _body(receive)).decode())
            await self._token({k: v[0] for k, v in form.items()}, send)
        elif path.startswith("/api/v1/"):
            await self._api(scope, send)
        else:
            await _answer(send, 404, {"errors": [{"message": "not here"}]})

    async def _authorize(self, query: dict[str, list[str]], send: Send) -> None:
        state = self.state
        if _one(query, "client_id") != state.client_id or not state.enabled:
            await _answer(send, 400, {"error": "invalid_client"})
            return
        code = secrets.token_hex(16)
        with state.lock:
            state.codes[code] = {
                "challenge": _one(query, "code_challenge"),
                "method": _one(query, "code_challenge_method"),
                "redirect_uri": _one(query, "redirect_uri"),
                "scope": _one(query, "scope"),
            }
        location = (
            _one(query, "redirect_uri")
            + "?"
            + urlencode({"code": code, "state": _one(query, "state")})
        )
        await send(
            {
                "type": "http.response.start",
                "status": 302,
                "headers": [(b"location", location.encode())],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async def _token(self, form: dict[str, str], send: Send) -> None:
        state = self.state
        body: dict[str, object]
        with state.lock:
            state.token_requests.append({k: v for k, v in form.items() if k == "grant_type"})
            if (
                form.get("client_id") != state.client_id
                or form.get("client_secret") != state.client_secret
                or not state.enabled
            ):
                status, body = 401, {"error": "invalid_client", "error_description": "no"}
            elif form.get("grant_type") == "authorization_code":
                status, body = self._exchange(form)
            elif form.get("grant_type") == "refresh_token":
                status, body = self._refresh(form)
            else:
                status, body = 400, {"error": "unsupported_grant_type"}
        await _answer(send, status, body)

    def _exchange(self, form: dict[str, str]) -> tuple[int, dict[str, object]]:
        state = self.state
        granted = state.codes.pop(form.get("code", ""), None)
        if granted is None or granted["redirect_uri"] != form.get("redirect_uri"):
            return 400, {"error": "invalid_grant"}
        verifier = form.get("code_verifier", "")
        digest = hashlib.sha256(verifier.encode()).digest()
        if granted["method"] != "S256" or (
            base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != granted["challenge"]
        ):
            return 400, {"error": "invalid_grant", "error_description": "pkce"}
        access, refresh = state._issue(), secrets.token_urlsafe(48)
        state.refresh_tokens[refresh] = access
        return 200, {
            "access_token": access,
            "token_type": "Bearer",
            "user": state.user,
            "refresh_token": refresh,
            "expires_in": state.expires_in,
        }

    def _refresh(self, form: dict[str, str]) -> tuple[int, dict[str, object]]:
        state = self.state
        refresh = form.get("refresh_token", "")
        old = state.refresh_tokens.get(refresh)
        if old is None:
            return 400, {"error": "invalid_grant"}
        state.live.discard(old)  # regenerated in place
        access = state._issue()
        state.refresh_tokens[refresh] = access
        state.refreshes += 1
        return 200, {
            "access_token": access,
            "token_type": "Bearer",
            "user": state.user,
            "expires_in": state.expires_in,
        }

    async def _api(self, scope: Scope, send: Send) -> None:
        state = self.state
        headers = dict(scope["headers"])
        bearer = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
        with state.lock:
            state.api_calls.append(bearer)
            ok = (
                state.enabled
                and bearer in state.live
                and time.monotonic() < state.expiry.get(bearer, 0.0)
            )
        if not ok:
            await _answer(
                send,
                401,
                {"errors": [{"message": "Invalid access token."}]},
                [(b"www-authenticate", b'Bearer realm="canvas-lms"')],
            )
            return
        await _answer(send, 200, {"id": 1, "path": scope["path"]})


class StubServer(BackgroundServer):
    """The stub under uvicorn in a background thread, on an ephemeral loopback port."""

    def __init__(self, state: StubState) -> None:
        super().__init__(
            CanvasOAuthStub(state),
            host="127.0.0.1",
            lifespan="off",
            startup_timeout=10.0,
            shutdown_timeout=10.0,
            name="canvas-oauth-stub",
        )
        self.state = state
