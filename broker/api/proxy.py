"""The proxy's ASGI adapter: Canvas paths at the root (docs/interfaces.md#proxy).

It turns the ASGI scope into a :class:`~broker.core.admission.ProxyRequest`, reads the body
within its limit, streams the response and shapes the answers in Canvas's error form, so
Canvas clients raise their usual exceptions. Every decision is the use case's
(``broker.services.proxy``) and the rules' (``broker.core``). It is deliberately not a
FastAPI route: the hot path skips routing and request objects.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Final

from broker.access_log import ANSWER_KEY, CLIENT_KEY
from broker.core import admission
from broker.core.admission import ProxyRequest
from broker.errors import Refusal, UpstreamError
from broker.services.proxy import Refused

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from broker.services.proxy import Call, ProxyService, Relay

logger = logging.getLogger(__name__)

REALM: Final = b'Bearer realm="canvas-token-broker", error="invalid_token"'


class ProxyApp:
    """ASGI app forwarding granted Canvas calls through :class:`ProxyService`."""

    def __init__(self, service: ProxyService) -> None:
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one HTTP request."""
        service = self.service
        call = service.start(request_of(scope))
        try:
            await self._handle(call, receive, send)
        except Exception:
            # A bug, not a refusal: answer if nothing was sent yet; the request id ties the
            # log line (no request data in it) to the audit event.
            logger.exception("the proxy failed on request %s", call.request_id)
            if not call.answered:
                call.answered, call.status = True, 500
                await send_error(
                    send, call.request_id, 500, "internal_error", "the broker failed this call"
                )
        finally:
            service.end(call)
            # For the access line BrokerApp writes (broker/access_log.py).
            scope[CLIENT_KEY] = call.event.client_id
            scope[ANSWER_KEY] = (call.request_id, call.status)

    async def _handle(self, call: Call, receive: Receive, send: Send) -> None:
        service = self.service
        refused = await service.admit(call)
        if refused is not None:
            await send_refusal(send, call, refused)
            return
        body = await read_body(receive, service.max_body)
        if isinstance(body, Refusal):
            await send_refusal(send, call, await service.refuse(call, body))
            return
        refused = await service.admit_body(call, body)
        if refused is not None:
            await send_refusal(send, call, refused)
            return
        outcome = await service.forward(call, body)
        if isinstance(outcome, Refused):
            await send_refusal(send, call, outcome)
            return
        await relay_response(service, call, outcome, send)


def request_of(scope: Scope) -> ProxyRequest:
    """The request as the client sent it (``raw_path`` is the target's own bytes)."""
    # Some ASGI servers and test transports include the query in raw_path.
    raw_path = (scope.get("raw_path") or scope["path"].encode()).split(b"?", 1)[0]
    peer = scope.get("client")
    server = scope.get("server") or ("localhost", None)
    return ProxyRequest(
        method=scope["method"],
        raw_path=raw_path,
        query=scope.get("query_string", b""),
        headers=scope["headers"],
        peer=peer[0] if peer else None,
        scheme=scope.get("scheme", "http"),
        server=(server[0], server[1]),
    )


async def read_body(receive: Receive, limit: int) -> bytes | Refusal:
    """The whole request body, or the refusal for one over ``limit`` or never finished."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return Refusal(400, "client_disconnected", "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return admission.body_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def relay_response(service: ProxyService, call: Call, relay: Relay, send: Send) -> None:
    """Send Canvas's answer on, then record the outcome (whatever happened on the way)."""
    sent: int | None = None
    reason: str | None = None
    call.answered, call.status = True, relay.status
    try:
        await send(
            {"type": "http.response.start", "status": relay.status, "headers": relay.headers}
        )
        sent = 0
        if relay.body is not None:
            await send({"type": "http.response.body", "body": relay.body})
            sent = len(relay.body)
            return
        stream = relay.stream
        if stream is None:  # pragma: no cover - a relay has a body or a stream
            return
        try:
            async for chunk in stream.body():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
        except UpstreamError:
            logger.warning("upstream failed mid-body for request %s", call.request_id)
            reason = "upstream_body_failed"
            return
        await send({"type": "http.response.body", "body": b""})
    finally:
        service.finish(call, relay, sent=sent, reason=reason)


async def send_refusal(send: Send, call: Call, refused: Refused) -> None:
    """Answer a refusal in Canvas's error shape."""
    call.answered, call.status = True, refused.status
    await send_error(
        send,
        refused.request_id,
        refused.status,
        refused.error,
        refused.message,
        extra_headers=refused.headers,
    )


async def send_error(
    send: Send,
    request_id: str,
    status: int,
    error: str,
    message: str,
    *,
    extra_headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """Answer with a Canvas-shaped error: ``{"errors": [{"message"}], "error", "request_id"}``."""
    body = json.dumps(
        {"errors": [{"message": message}], "error": error, "request_id": request_id}
    ).encode()
    headers = [
        (b"content-type", b"application/json; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"cache-control", b"no-store"),
        *extra_headers,
    ]
    if status == 401:  # noqa: PLR2004
        headers.append((b"www-authenticate", REALM))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
