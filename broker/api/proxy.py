"""The proxy: a raw ASGI app serving Canvas paths at the root.

It is deliberately not a FastAPI route: the hot path avoids routing and request-object
overhead. Order of checks, each refused before anything is sent upstream and each audited:
canonical path, query and header syntax (400, still naming the caller when its token is good)
→ bearer token (401) → source address (403) → rate limit (429, or 503 if the limit cannot be
checked) → headers and query (403) → grant (403) → body (413/415/400/403) → pending audit
event committed (503 if not) → forward. The rate limit comes before anything costly, so a
limited caller is refused cheaply. Paths outside ``/api/v1/`` and
``/api/quiz/v1/`` need a scope naming them literally.

Contract: docs/interfaces.md#proxy, docs/proxy-rules.md.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from broker.core import rules
from broker.core.net import address_allowed, client_address
from broker.core.rewrite import Rewriter
from broker.core.scopes import Grant
from broker.errors import AuditUnavailableError
from broker.requestid import new_request_id
from broker.services.ratelimit import RateLimitService, RateLimitUnavailableError
from broker.services.tokens import Authorized, TokenRejectedError, TokenStoreUnavailableError
from broker.upstream import UpstreamError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Sequence

    from starlette.types import Message, Receive, Scope, Send

    from broker.context import ProcessContext
    from broker.metrics import Metrics
    from broker.services.audit import AuditService, Begun
    from broker.services.tokens import TokenService
    from broker.upstream import UpstreamResponse

logger = logging.getLogger(__name__)
T = TypeVar("T")

REALM = 'Bearer realm="canvas-token-broker", error="invalid_token"'
_MAX_AUDIT_PATH = rules.MAX_PATH_BYTES
_REWRITE_LIMIT = 8 * 1024 * 1024
_REWRITER_CACHE_SIZE = 256
_PRINTABLE = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")
_QUERY = re.compile(rb"[\x21-\x7e]*")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class Refusal(Exception):  # noqa: N818 - a refusal is an outcome, not an error of the broker
    """A request the proxy will not forward."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = tuple(headers)


@dataclass
class Call:
    """What the proxy knows about one request as it goes through the checks."""

    request_id: str
    started: float
    method: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    audit: dict[str, Any] = field(default_factory=dict)
    authorized: Authorized | None = None
    responded: bool = False

    def header(self, name: bytes) -> bytes | None:
        """First value of header ``name`` (lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def elapsed_ms(self) -> float:
        """Milliseconds since the request arrived."""
        return round((time.perf_counter() - self.started) * 1000, 3)


class ProxyApp:
    """ASGI app forwarding granted Canvas calls with the worker token."""

    def __init__(
        self,
        context: ProcessContext,
        tokens: TokenService,
        audit: AuditService,
        metrics: Metrics,
    ) -> None:
        self._context = context
        self._tokens = tokens
        self._audit = audit
        self._metrics = metrics
        self.rate_limits = RateLimitService(context.sessions)
        self._max_body = context.settings.max_body_bytes
        self._sensitive = context.settings.sensitive_query_keys
        self._rewriters: dict[tuple[str, str], Rewriter] = {}
        self._active = 0  # calls in progress in this process

    async def _commit_audit(self, write: Awaitable[T]) -> T:
        """Await an audit commit, measuring it; failures are counted and re-raised."""
        started = time.perf_counter()
        try:
            result = await write
        except AuditUnavailableError:
            self._metrics.audit_failures.inc()
            raise
        self._metrics.audit_latency.observe(time.perf_counter() - started)
        return result

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one HTTP request."""
        call = Call(
            request_id=new_request_id(),
            started=time.perf_counter(),
            method=scope["method"],
            # Some ASGI servers and test transports include the query in raw_path.
            raw_path=(scope.get("raw_path") or scope["path"].encode()).split(b"?", 1)[0],
            query=scope.get("query_string", b""),
            headers=list(scope["headers"]),
        )
        self._active += 1
        try:
            await self._handle(call, scope, receive, send)
        except Exception:
            # A bug, not a refusal: answer if nothing was sent yet; the request id ties the
            # log line (no request data in it) to the audit event.
            logger.exception("the proxy failed on request %s", call.request_id)
            if not call.responded:
                await _send_error(
                    send, call, 500, "internal_error", "the broker failed to handle this call"
                )
        finally:
            self._active -= 1

    async def _handle(self, call: Call, scope: Scope, receive: Receive, send: Send) -> None:
        call.audit = self._audit_base(call, scope)
        try:
            body = await self._admit(call, receive)
            begun = await self._commit_audit(
                self._audit.begin(**call.audit, decision="allow", alone=self._active == 1)
            )
        except Refusal as refusal:
            await self._refuse(call, send, refusal)
            return
        except AuditUnavailableError as exc:
            self._metrics.requests.labels(
                client=call.audit.get("client_id") or "-", outcome=exc.error
            ).inc()
            await _send_error(send, call, 503, exc.error, exc.message)
            return
        await self._forward(call, scope, body, begun, send)

    def _audit_base(self, call: Call, scope: Scope) -> dict[str, Any]:
        peer = scope.get("client")
        trusted = self._context.settings.trusted_networks
        forwarded = (
            [v.decode("latin-1") for k, v in call.headers if k == b"x-forwarded-for"]
            if trusted
            else []
        )
        user_agent = call.header(b"user-agent")
        return {
            "request_id": call.request_id,
            "kind": "proxy",
            "action": "proxy",
            "method": call.method[:16],
            "path": _escaped(call.raw_path)[:_MAX_AUDIT_PATH],
            "query": _escaped(
                rules.redact_query(
                    call.query, self._context.keyring.audit_hmac, self._sensitive
                ).encode()
            )
            if call.query
            else None,
            "source_ip": client_address(peer[0] if peer else None, forwarded, trusted),
            "user_agent": _escaped(user_agent)[:500] if user_agent else None,
        }

    async def _admit(self, call: Call, receive: Receive) -> bytes:
        """Run every check; return the request body to forward or raise ``Refusal``."""
        try:
            path = rules.check_path(call.raw_path)
            _check_syntax(call)
        except rules.RuleViolation as exc:
            # The answer is 400 whatever the token, but a good token still names the caller in
            # the audit log: a traversal attempt is worth attributing.
            with contextlib.suppress(Refusal):
                await self._authenticate(call)
            raise Refusal(exc.status, exc.error, exc.message) from exc
        authorized = await self._authenticate(call)
        if not address_allowed(call.audit.get("source_ip"), authorized.allowed_networks):
            raise Refusal(403, "source_not_allowed", "this client may not call from this address")
        await self._check_rate(authorized)
        try:
            rules.check_headers(call.headers)
            rules.check_query(
                call.query,
                allow_masquerade=authorized.allow_masquerade,
                allow_includes=authorized.allow_includes,
            )
        except rules.RuleViolation as exc:
            raise Refusal(exc.status, exc.error, exc.message) from exc
        self._check_grant(call, authorized.grant, path)
        body = await self._read_body(call, receive)
        content_type = call.header(b"content-type")
        try:
            rules.check_body(
                content_type.decode("latin-1") if content_type else None,
                body,
                allow_masquerade=authorized.allow_masquerade,
                allow_includes=authorized.allow_includes,
            )
        except rules.RuleViolation as exc:
            raise Refusal(exc.status, exc.error, exc.message) from exc
        return body

    @staticmethod
    def _check_grant(call: Call, grant: Grant, path: str) -> None:
        # Rule 2 (paths outside the Canvas API, exact-only endpoints) is part of the grant's
        # own decision, which the policy check API reaches through the same function.
        decision = grant.check(call.method, path)
        call.audit["scope"] = decision.scope
        if not decision.allowed:
            raise Refusal(403, decision.reason or "scope_not_granted", decision.detail)

    async def _check_rate(self, authorized: Authorized) -> None:
        """Spend one of the client's rate-limit tokens, or refuse (429; 503 fails closed)."""
        if authorized.rate_limit is None:
            return
        try:
            decision = await self.rate_limits.take(
                authorized.client_id, authorized.rate_limit, authorized.rate_burst
            )
        except RateLimitUnavailableError as exc:
            raise Refusal(exc.status, exc.error, exc.message) from exc
        if not decision.allowed:
            raise Refusal(
                429,
                "rate_limited",
                f"this client's rate limit is exhausted; retry in {decision.retry_after} s",
                headers=[(b"retry-after", str(decision.retry_after).encode())],
            )

    async def _authenticate(self, call: Call) -> Authorized:
        """Resolve the bearer token and name its client in the audit event, or refuse (401)."""
        values = [v for k, v in call.headers if k == b"authorization"]
        if not values:
            raise Refusal(401, "missing_token", "send Authorization: Bearer <proxy token>")
        scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
        if len(values) > 1 or scheme.lower() != "bearer" or not token.strip():
            raise Refusal(401, "malformed_token", "send exactly one Authorization: Bearer header")
        try:
            authorized = await self._tokens.resolve(token.strip())
        except TokenStoreUnavailableError as exc:
            raise Refusal(exc.status, exc.error, exc.message) from exc
        except TokenRejectedError as exc:
            if exc.record is not None:
                call.audit.update(
                    client_id=exc.record.client.id,
                    token_id=exc.record.token.id,
                    credential_id=exc.record.credential.id,
                    upstream=exc.record.upstream.name,
                )
            raise Refusal(401, exc.reason, exc.message) from exc
        call.authorized = authorized
        call.audit.update(
            client_id=authorized.client_id,
            token_id=authorized.token_id,
            credential_id=authorized.credential_id,
            upstream=authorized.upstream_name,
        )
        return authorized

    async def _read_body(self, call: Call, receive: Receive) -> bytes:
        declared = call.header(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Refusal(400, "malformed_request", "Content-Length is not a number")
            if int(declared) > self._max_body:
                raise Refusal(
                    413, "body_too_large", f"bodies are limited to {self._max_body} bytes"
                )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refusal(400, "client_disconnected", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise Refusal(
                    413, "body_too_large", f"bodies are limited to {self._max_body} bytes"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, call: Call, send: Send, refusal: Refusal) -> None:
        try:
            await self._commit_audit(
                self._audit.record(
                    **call.audit,
                    decision="deny",
                    reason=refusal.error,
                    status=refusal.status,
                    duration_ms=call.elapsed_ms(),
                    alone=self._active == 1,
                )
            )
        except AuditUnavailableError as exc:
            self._metrics.requests.labels(
                client=call.audit.get("client_id") or "-", outcome=exc.error
            ).inc()
            await _send_error(send, call, 503, exc.error, exc.message)
            return
        self._metrics.requests.labels(
            client=call.audit.get("client_id") or "-", outcome=refusal.error
        ).inc()
        await _send_error(
            send,
            call,
            refusal.status,
            refusal.error,
            refusal.message,
            extra_headers=refusal.headers,
        )

    async def _forward(
        self, call: Call, scope: Scope, body: bytes, begun: Begun, send: Send
    ) -> None:
        authorized = call.authorized
        if authorized is None:  # pragma: no cover - _admit always sets it
            raise RuntimeError("forwarding an unauthenticated call")
        target = authorized.upstream_url + call.raw_path.decode("ascii")
        if call.query:
            target += "?" + call.query.decode("latin-1")
        headers = rules.forward_request_headers(call.headers)
        headers.append((b"authorization", b"Bearer " + authorized.worker_token.encode()))
        outcome: dict[str, Any] = {}
        sent_at = time.perf_counter()
        try:
            response = await self._context.forwarder.send(call.method, target, headers, body)
        except UpstreamError as exc:
            status, error = _failure(exc)
            self._metrics.requests.labels(
                client=call.audit.get("client_id") or "-", outcome=error
            ).inc()
            self._audit.complete(begun, status=status, reason=error, duration_ms=call.elapsed_ms())
            await _send_error(send, call, status, error, str(exc))
            return
        self._metrics.upstream_latency.observe(time.perf_counter() - sent_at)
        try:
            outcome = await self._relay(call, scope, response, send)
        finally:
            self._metrics.requests.labels(
                client=call.audit.get("client_id") or "-", outcome=outcome.get("reason") or "allow"
            ).inc()
            response.release()
            context_id = _find(response.headers, b"x-request-context-id")
            self._audit.complete(
                begun,
                status=outcome.get("status", 499),
                upstream_status=response.status,
                response_bytes=outcome.get("bytes"),
                reason=outcome.get("reason"),
                canvas_context_id=context_id.decode("latin-1")[:100] if context_id else None,
                duration_ms=call.elapsed_ms(),
            )

    async def _relay(
        self,
        call: Call,
        scope: Scope,
        response: UpstreamResponse,
        send: Send,
    ) -> dict[str, Any]:
        """Send the upstream response on, rewriting only URLs that point back at Canvas."""
        rewriter = self._rewriter(
            call.authorized.upstream_url if call.authorized else "", self._public_base(scope, call)
        )
        headers = _relayed_headers(rewriter, response.headers)
        leaked = await _refuse_exposed_credential(call, headers, send)
        if leaked is not None:
            return leaked
        headers.append((b"x-request-id", call.request_id.encode()))
        sent = 0
        if _rewritable_json(response.headers):
            try:
                payload = await response.read()
            except UpstreamError as exc:
                # Nothing has been sent yet, so the client can still get a proper answer.
                status, error = _failure(exc)
                await _send_error(send, call, status, error, str(exc))
                return {"status": status, "reason": error}
            rewritten = _rewrite_json(
                rewriter, payload, _find(response.headers, b"content-encoding")
            )
            if rewritten is not None:
                payload = rewritten
                headers = [(k, v) for k, v in headers if k != b"content-length"]
                headers.append((b"content-length", str(len(payload)).encode()))
            call.responded = True
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": payload})
            sent = len(payload)
        else:
            call.responded = True
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            try:
                async for chunk in response.body():
                    sent += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except UpstreamError:
                logger.warning("upstream failed mid-body for request %s", call.request_id)
                return {"status": response.status, "bytes": sent, "reason": "upstream_body_failed"}
            await send({"type": "http.response.body", "body": b""})
        return {"status": response.status, "bytes": sent}

    def _rewriter(self, upstream_origin: str, public_base: str) -> Rewriter:
        """The rewriter for this pair of origins, built once (they are few)."""
        key = (upstream_origin, public_base)
        rewriter = self._rewriters.get(key)
        if rewriter is None:
            rewriter = Rewriter(upstream_origin=upstream_origin, public_base=public_base)
            if len(self._rewriters) >= _REWRITER_CACHE_SIZE:
                self._rewriters.clear()
            self._rewriters[key] = rewriter
        return rewriter

    def _public_base(self, scope: Scope, call: Call) -> str:
        configured = self._context.settings.public_base
        if configured:
            return configured
        # Without BROKER_PUBLIC_URL, links point back at the address the client used; this
        # only shapes the response to that same client.
        host = call.header(b"host")
        host_text = host.decode("latin-1") if host else ""
        if not host_text or not all(c.isalnum() or c in ".-:[]" for c in host_text):
            server = scope.get("server") or ("localhost", None)
            host_text = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
        return f"{scope.get('scheme', 'http')}://{host_text}"


def _check_syntax(call: Call) -> None:
    """Refuse a query or header that no HTTP server would pass on (400 ``malformed_request``).

    The proxy forwards the query and headers as received, so a raw space, CR/LF or NUL
    would otherwise reach Canvas's request line or headers intact.
    """
    if not _QUERY.fullmatch(call.query):
        raise rules.RuleViolation(
            400, "malformed_request", "the query string must be percent-encoded printable ASCII"
        )
    for name, value in call.headers:
        if not _HEADER_NAME.fullmatch(name) or _HEADER_VALUE_BAD.search(value):
            raise rules.RuleViolation(
                400, "malformed_request", f"header {name[:100]!r} is not valid HTTP"
            )


def _relayed_headers(
    rewriter: Rewriter, upstream: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """Canvas's response headers as relayed: rules 9 and 10, links pointed at the broker."""
    headers: list[tuple[bytes, bytes]] = []
    for name, value in rules.forward_response_headers(upstream):
        if name == b"x-request-id":
            # The broker's own id replaces Canvas's (X-Request-Context-Id still names it).
            continue
        if name == b"link":
            value = rewriter.link_header(value.decode("latin-1")).encode("latin-1")  # noqa: PLW2901
        elif name == b"location":
            value = rewriter.location(value.decode("latin-1")).encode("latin-1")  # noqa: PLW2901
        headers.append((name, value))
    return headers


async def _refuse_exposed_credential(
    call: Call, headers: list[tuple[bytes, bytes]], send: Send
) -> dict[str, Any] | None:
    """Answer 502 instead of relaying a response whose headers carry the worker token.

    Bodies pass byte for byte (docs/proxy-rules.md): Canvas never echoes a bearer token in an
    API body, but a header such as ``Location`` can carry one as a parameter.
    """
    if call.authorized is None:  # pragma: no cover - only forwarded calls are relayed
        return None
    leaked = rules.header_carrying(headers, call.authorized.worker_token.encode())
    if leaked is None:
        return None
    name = leaked.decode("latin-1")
    logger.warning(
        "Canvas's response to request %s carried the worker token in %r; not relayed",
        call.request_id,
        name,
    )
    await _send_error(
        send,
        call,
        502,
        "upstream_credential_exposed",
        f"Canvas's response carried the worker credential in its {name} header; "
        "the broker does not relay it",
    )
    return {"status": 502, "reason": "upstream_credential_exposed"}


def _escaped(raw: bytes) -> str:
    r"""Text for the audit log: printable ASCII as is, any other byte (and ``\``) as ``\xNN``.

    The log shows unambiguously what the client sent, and no byte can break the store
    (PostgreSQL refuses NUL in text) or a reader of an export.
    """
    if _PRINTABLE.fullmatch(raw):
        return raw.decode("ascii")
    return "".join(
        chr(byte) if _PRINTABLE.fullmatch(byte.to_bytes()) else f"\\x{byte:02x}" for byte in raw
    )


def _failure(exc: UpstreamError) -> tuple[int, str]:
    """The status and error code for an upstream that failed or timed out."""
    return (504, "upstream_timeout") if exc.timeout else (502, "upstream_unreachable")


def _find(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _rewritable_json(headers: list[tuple[bytes, bytes]]) -> bool:
    content_type = _find(headers, b"content-type") or b""
    encoding = _find(headers, b"content-encoding")
    if b"json" not in content_type.lower() or (encoding is not None and not _gzip(encoding)):
        return False
    length = _find(headers, b"content-length")
    return length is not None and length.isdigit() and int(length) <= _REWRITE_LIMIT


def _gzip(encoding: bytes) -> bool:
    return encoding.strip().lower() in {b"gzip", b"x-gzip"}


def _rewrite_json(rewriter: Rewriter, payload: bytes, encoding: bytes | None) -> bytes | None:
    """Return the body with its ``meta.pagination`` URLs rewritten, or None to pass it on as is.

    Canvas gzips JSON for every client that accepts it (``requests`` and so canvasapi do), so
    a gzipped body is decompressed, bounded, to look for pagination URLs. Only a body that
    actually changes is compressed again; every other body keeps its exact bytes.
    """
    if encoding is None:
        return rewriter.json_body(payload) if b'"pagination"' in payload else None
    plain = _gunzip(payload, _REWRITE_LIMIT)
    if plain is None or b'"pagination"' not in plain:
        return None
    rewritten = rewriter.json_body(plain)
    return None if rewritten is None else gzip.compress(rewritten, compresslevel=6, mtime=0)


def _gunzip(payload: bytes, limit: int) -> bytes | None:
    """Decompress a single-member gzip body of at most ``limit`` bytes, else None."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(payload, limit + 1)
    except zlib.error:
        return None
    if len(plain) > limit or not inflater.eof or inflater.unused_data:
        return None
    return plain


async def _send_error(
    send: Send,
    call: Call,
    status: int,
    error: str,
    message: str,
    *,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with a Canvas-shaped error, so Canvas clients raise their usual exceptions."""
    body = json.dumps(
        {"errors": [{"message": message}], "error": error, "request_id": call.request_id}
    ).encode()
    headers = [
        (b"content-type", b"application/json; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", call.request_id.encode()),
        (b"cache-control", b"no-store"),
        *extra_headers,
    ]
    if status == 401:  # noqa: PLR2004
        headers.append((b"www-authenticate", REALM.encode()))
    call.responded = True
    message_start: Message = {"type": "http.response.start", "status": status, "headers": headers}
    await send(message_start)
    await send({"type": "http.response.body", "body": body})
