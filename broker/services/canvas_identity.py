"""Who a Canvas token belongs to: ``GET /api/v1/users/self`` through the token itself.

Used before a worker token is stored (docs/interfaces.md#worker-credentials), so a token
Canvas rejects is refused at ``credentials create``/``rotate`` instead of surfacing later as
Canvas's own 401 to every script. ``self`` is the user the token authenticates as; the User
object carries ``id`` and ``name`` (canvas-lms app/controllers/users_controller.rb, ``api_show``,
rendering ``user_json`` from lib/api/v1/user.rb).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from broker.errors import BrokerError, UpstreamError
from broker.upstream import Forwarder, HttpForwarder

if TYPE_CHECKING:
    from broker.config import Settings

SELF_PATH = "/api/v1/users/self"
_MAX_NAME = 255


class CanvasRejectedTokenError(BrokerError):
    """Canvas answered 401 to the token: it is wrong, expired or revoked."""

    status = 422
    error = "canvas_rejected_token"


class CanvasUnverifiableError(BrokerError):
    """Canvas could not be asked, or answered something other than a user."""

    status = 502
    error = "canvas_unreachable"


@dataclass(frozen=True, slots=True)
class CanvasUser:
    """The Canvas user a token authenticates as."""

    id: str
    name: str | None


def _parse_user(body: bytes) -> CanvasUser | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    user_id, name = payload.get("id"), payload.get("name")
    if isinstance(user_id, bool) or not isinstance(user_id, int | str) or user_id == "":
        return None
    return CanvasUser(str(user_id), name[:_MAX_NAME] if isinstance(name, str) else None)


async def whoami(forwarder: Forwarder, base_url: str, token: str) -> CanvasUser:
    """The user ``token`` authenticates as on the Canvas at ``base_url``.

    Raises ``CanvasRejectedTokenError`` on a 401 and ``CanvasUnverifiableError`` when Canvas
    cannot be reached or does not answer with a user; neither message contains the token.
    """
    headers = [
        (b"Authorization", b"Bearer " + token.encode("ascii")),
        (b"Accept", b"application/json"),
    ]
    offline = "; check the upstream's base_url, or store it unverified with --no-verify"
    try:
        response = await forwarder.send("GET", base_url + SELF_PATH, headers, b"")
        try:
            body = await response.read()
        finally:
            response.release()
    except UpstreamError as exc:
        raise CanvasUnverifiableError(
            f"could not verify the token: Canvas at {base_url} did not answer ({exc}){offline}"
        ) from exc
    if response.status == HTTPStatus.UNAUTHORIZED:
        raise CanvasRejectedTokenError(
            f"Canvas rejected this token (401 from {base_url}{SELF_PATH}): it is wrong, expired "
            "or revoked; nothing was stored"
        )
    user = _parse_user(body) if response.status == HTTPStatus.OK else None
    if user is None:
        raise CanvasUnverifiableError(
            f"could not verify the token: {base_url}{SELF_PATH} answered {response.status} "
            f"without a Canvas user{offline}"
        )
    return user


def verifying_forwarder(settings: Settings) -> HttpForwarder:
    """A one-off upstream client for verification outside a running app (CLI, demo)."""
    return HttpForwarder(
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_timeout,
        pool_size=1,
    )
