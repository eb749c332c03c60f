"""The proxied call as one use case: admit, audit, forward, finish (docs/proxy-rules.md).

``ProxyService`` owns a call from the moment its head arrives to its completion event; the
ASGI adapter (``broker.api.proxy``) only turns the ASGI scope into a
:class:`~broker.core.admission.ProxyRequest`, reads the body within its limit, streams the
response and shapes the answers. The order of the rules is ``broker.core.admission``'s; this
module runs them, interleaving what needs the database:

1. :meth:`ProxyService.admit`: the target and head (400/414), the bearer token (401), the
   source address (403), the rate limit (429/503), headers and query (403/400/415), the
   grant (403).
2. The adapter reads the body, refusing it past the limit (:meth:`ProxyService.refuse`).
3. :meth:`ProxyService.admit_body`: the body (415/400/403), then Canvas's capacity for the
   worker credential (429 ``canvas_capacity`` beyond the client's share while it is low;
   ``broker.core.capacity``), then the pending audit event, committed before anything is
   sent (503 and nothing forwarded if it cannot be).
4. :meth:`ProxyService.forward`: the call goes to Canvas with the worker token; the answer
   is a :class:`Relay` (headers as relayed, and the body whole or to stream) or, if Canvas
   cannot be reached or its headers carry the worker token, a :class:`Refused`.
5. :meth:`ProxyService.finish`: the completion event (with Canvas's ``X-Request-Cost``), the
   metrics, and what Canvas said of its capacity.

Every refusal is audited before it is answered; if its event cannot be committed the answer is
``503 audit_unavailable``. Nothing here raises for a refusal: outcomes are typed values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple, TypeVar

from broker.core import admission, capacity, rules
from broker.core.audit_chain import AuditEvent
from broker.core.net import client_address
from broker.core.rewrite import (
    Rewriter,
    header,
    public_base,
    relayed_headers,
    rewritable_json,
    rewrite_json,
)
from broker.errors import (
    AuditUnavailableError,
    BrokerError,
    Refusal,
    UnavailableError,
    UpstreamError,
)
from broker.metrics import UNAUTHENTICATED
from broker.requestid import new_request_id
from broker.storage.models import utcnow

if TYPE_CHECKING:
    from collections.abc import Awaitable, Sequence

    from broker.context import ProcessContext
    from broker.core.admission import ProxyRequest
    from broker.core.capacity import Decision
    from broker.metrics import Metrics
    from broker.services.audit import AuditService, Begun
    from broker.services.canvas_capacity import CanvasCapacity
    from broker.services.manual_tokens import ManualTokenService
    from broker.services.ratelimit import RateLimitService
    from broker.services.tokens import Authorized, TokenService
    from broker.services.worker_oauth import WorkerOAuthService
    from broker.upstream import UpstreamResponse

logger = logging.getLogger(__name__)
T = TypeVar("T")

_REWRITER_CACHE_SIZE: Final = 256
_USER_AGENT_LIMIT: Final = 500
_METHOD_LIMIT: Final = 16
_CONTEXT_ID_LIMIT: Final = 100
CLIENT_WENT_AWAY: Final = 499
"""The status recorded for a call whose client left before its answer was complete."""


@dataclass(frozen=True, slots=True)
class Refused:
    """A call answered with a refusal; its audit event is committed (or the refusal is 503)."""

    request_id: str
    status: int
    error: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


class Relay(NamedTuple):
    """Canvas's answer as it goes to the client.

    ``body`` is the whole body when the broker read it (a JSON list whose pagination URLs it
    rewrote, or left as it was); otherwise ``stream`` is Canvas's response, to stream byte for
    byte.
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    stream: UpstreamResponse | None
    upstream: UpstreamResponse


@dataclass(slots=True)
class Call:
    """One proxied call on its way through the use case."""

    request: ProxyRequest
    request_id: str
    started: float
    event: AuditEvent
    path: str = ""
    authorized: Authorized | None = None
    begun: Begun | None = None
    capacity: Decision | None = None  # admitted against Canvas's capacity, not yet settled
    answered: bool = False  # the response has started: no other answer can follow
    status: int | None = None  # the status of the answer's head, once it is being sent
    finished: bool = False  # the outcome is recorded

    def elapsed_ms(self) -> float:
        """Milliseconds since the request arrived."""
        return round((time.perf_counter() - self.started) * 1000, 3)

    @property
    def client(self) -> str:
        """The ``client`` metric label: the client's id, or ``-`` when no token named one."""
        return self.event.client_id or UNAUTHENTICATED


class ProxyService:
    """Runs proxied calls: the rules, the audit trail and the upstream, in order."""

    def __init__(
        self,
        context: ProcessContext,
        tokens: TokenService,
        audit: AuditService,
        rate_limits: RateLimitService,
        metrics: Metrics,
        *,
        canvas: CanvasCapacity,
        oauth: WorkerOAuthService | None = None,
        manual: ManualTokenService | None = None,
    ) -> None:
        self._context = context
        self._oauth = oauth
        self._manual = manual
        self._settings = context.settings
        self._tokens = tokens
        self._audit = audit
        self._rate_limits = rate_limits
        self._metrics = metrics
        self._canvas = canvas
        self.max_body = context.settings.max_body_bytes
        self._rewriters: dict[tuple[str, str], Rewriter] = {}
        self._active = 0  # calls begun and not yet ended, in this process

    # A call's life ----------------------------------------------------------------------------

    def start(self, request: ProxyRequest) -> Call:
        """Begin a call: its request id and the audit facts of what the client sent."""
        self._active += 1
        request_id = new_request_id()
        settings = self._settings
        trusted = settings.trusted_networks
        forwarded = (
            [v.decode("latin-1") for k, v in request.headers if k == b"x-forwarded-for"]
            if trusted
            else []
        )
        user_agent = request.header(b"user-agent")
        event = AuditEvent(
            time=utcnow(),
            request_id=request_id,
            kind="proxy",
            action="proxy",
            method=request.method[:_METHOD_LIMIT],
            path=admission.audit_text(request.raw_path, rules.MAX_PATH_BYTES),
            query=admission.audit_text(
                rules.redact_query(
                    request.query, self._context.keyring.audit_hmac, settings.sensitive_query_keys
                ).encode()
            )
            if request.query
            else None,
            source_ip=client_address(request.peer, forwarded, trusted),
            user_agent=admission.audit_text(user_agent, _USER_AGENT_LIMIT) if user_agent else None,
        )
        return Call(
            request=request, request_id=request_id, started=time.perf_counter(), event=event
        )

    def end(self, call: Call) -> None:
        """The call is over (answered, failed or abandoned): it no longer counts as active."""
        self._settle_capacity(call, None)  # if a failure left it unsettled
        self._active -= 1

    async def admit(self, call: Call) -> Refused | None:
        """Run every rule up to the body; None if the call may go on, else the refusal sent."""
        try:
            await self._admit(call)
        except BrokerError as exc:
            return await self._refused(call, exc)
        return None

    async def _admit(self, call: Call) -> None:
        request = call.request
        try:
            call.path = admission.admit_target(request)
        except Refusal:
            # 400 whatever the token, but a good token still names the caller in the audit
            # log: a traversal attempt is worth attributing.
            with contextlib.suppress(BrokerError):
                await self._authenticate(call)
            raise
        authorized = await self._authenticate(call)
        admission.check_source(call.event.source_ip, authorized.allowed_networks)
        if authorized.rate_limit is not None:
            taken = await self._rate_limits.take(
                authorized.client_id, authorized.rate_limit, authorized.rate_burst
            )
            if not taken.allowed:
                raise admission.rate_limited(taken.retry_after)
        admission.admit_head(request, authorized.policy)
        decision = admission.check_grant(authorized.policy, request.method, call.path)
        call.event.scope = decision.scope
        if not decision.allowed:
            raise decision.refusal()
        admission.check_declared_length(request, self.max_body)

    async def _authenticate(self, call: Call) -> Authorized:
        token = admission.bearer_token(call.request)
        try:
            authorized = await self._tokens.resolve(token)
        except Refusal as exc:
            if exc.attribution is not None:
                who = exc.attribution
                call.event.client_id = who.client_id
                call.event.token_id = who.token_id
                call.event.credential_id = who.credential_id
                call.event.upstream = who.upstream
            raise
        call.authorized = authorized
        call.event.client_id = authorized.client_id
        call.event.token_id = authorized.token_id
        call.event.credential_id = authorized.credential_id
        call.event.upstream = authorized.upstream_name
        return authorized

    async def refuse(self, call: Call, refusal: Refusal) -> Refused:
        """Refuse a call the adapter could not read (body over the limit, client gone)."""
        return await self._refused(call, refusal)

    async def admit_body(self, call: Call, body: bytes) -> Refused | None:
        """Check the body, then commit the pending event; None once the call may be sent."""
        authorized = call.authorized
        if authorized is None:  # pragma: no cover - admit() ran first
            raise RuntimeError("the call was not admitted")
        try:
            admission.admit_body(call.request, authorized.policy, body)
            call.capacity = self._canvas.admit(
                authorized.credential_id, authorized.client_id, authorized.canvas_weight
            )
        except Refusal as exc:
            return await self._refused(call, exc)
        try:
            call.begun = await self._committed(self._audit.begin(call.event, alone=self._alone))
        except AuditUnavailableError as exc:
            self._settle_capacity(call, None)
            self._metrics.count(call.client, exc.error)
            return Refused(call.request_id, exc.status, exc.error, exc.message)
        return None

    async def forward(self, call: Call, body: bytes) -> Relay | Refused:
        """Send the admitted call to Canvas; its answer as relayed, or why there is none."""
        authorized = call.authorized
        if authorized is None or call.begun is None:  # pragma: no cover - admitted first
            raise RuntimeError("forwarding a call that was not admitted")
        request = call.request
        target = authorized.upstream_url + request.raw_path.decode("ascii")
        if request.query:
            target += "?" + request.query.decode("latin-1")
        headers = rules.forward_request_headers(request.headers)
        headers.append((b"authorization", authorized.bearer))
        sent_at = time.perf_counter()
        try:
            response = await self._context.forwarder.send(request.method, target, headers, body)
            if authorized.renewed and rules.canvas_rejected_credential(
                response.status, response.headers
            ):
                response = await self._after_rejection(call, target, headers, body, response)
                authorized = call.authorized or authorized
        except UpstreamError as exc:
            return self._failed(call, exc, upstream_status=None)
        self._metrics.upstream_latency.observe(time.perf_counter() - sent_at)
        rewriter = self._rewriter(call)
        relayed = relayed_headers(rewriter, response.headers)
        leaked = rules.header_carrying(relayed, authorized.worker_token_bytes)
        if leaked is not None:
            return self._exposed(call, response, leaked)
        relayed.append((b"x-request-id", call.request_id.encode()))
        if not rewritable_json(response.headers):
            return Relay(response.status, relayed, None, response, response)
        try:
            payload = await response.read()
        except UpstreamError as exc:
            # Nothing has been sent yet, so the client can still get a proper answer.
            response.release()
            return self._failed(call, exc, upstream_status=response.status)
        rewritten = rewrite_json(rewriter, payload, header(response.headers, b"content-encoding"))
        if rewritten is not None:
            payload = rewritten
            relayed = [(k, v) for k, v in relayed if k != b"content-length"]
            relayed.append((b"content-length", str(len(payload)).encode()))
        return Relay(response.status, relayed, payload, None, response)

    async def _after_rejection(
        self,
        call: Call,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        rejected: UpstreamResponse,
    ) -> UpstreamResponse:
        """Canvas refused a token the broker renews (docs/interfaces.md, OAuth; manual tokens).

        A refresh regenerates an OAuth access token in place, and a rotation a manual token,
        so the token this process cached dies the moment another process renews it, a second
        before the revocation epoch tells this one. If the stored token is newer, the call is
        sent once more with it: Canvas refused it at authentication, so it acted on nothing.
        Otherwise the token itself is refused: for an OAuth credential (the developer key
        disabled, access revoked) a refresh is started at once, which makes the credential
        unavailable if Canvas refuses that too.
        """
        authorized = call.authorized
        if authorized is None:  # pragma: no cover - admitted first
            return rejected
        if authorized.manual:
            if self._manual is None:
                return rejected
            fresh = await self._manual.renewed_token(
                authorized.credential_id, authorized.worker_token
            )
            if fresh is None:
                return rejected
        else:
            if self._oauth is None:  # pragma: no cover - the app always has one
                return rejected
            fresh = await self._oauth.renewed_token(
                authorized.credential_id, authorized.worker_token
            )
            if fresh is None:
                self._oauth.canvas_rejected(authorized.credential_id)
                return rejected
        await rejected.read()
        rejected.release()
        renewed = dataclasses.replace(authorized, worker_token=fresh)
        call.authorized = renewed
        resent = [(k, v) for k, v in headers if k != b"authorization"]
        resent.append((b"authorization", renewed.bearer))
        return await self._context.forwarder.send(call.request.method, target, resent, body)

    def finish(
        self, call: Call, relay: Relay, *, sent: int | None, reason: str | None = None
    ) -> None:
        """Record the outcome of a relayed call: its completion event and its metrics.

        ``sent`` is the body bytes that reached the client (None if the answer never
        started); ``reason`` says why it fell short, if it did.
        """
        if call.finished:
            return
        call.finished = True
        relay.upstream.release()
        status = relay.status if sent is not None else CLIENT_WENT_AWAY
        if reason is None and rules.canvas_rejected_credential(
            relay.upstream.status, relay.upstream.headers
        ):
            # Canvas refused the worker token: the broker's credential is broken, not the
            # script's proxy token; recorded apart so it is not mistaken for an allowed call.
            reason = rules.UPSTREAM_CREDENTIAL_REJECTED
            self._credential_rejected(call)
        if reason is None and capacity.canvas_throttled(
            relay.upstream.status, relay.upstream.headers
        ):
            # Relayed as Canvas sent it; recorded apart, and its remaining feeds the budget.
            reason = capacity.CANVAS_RATE_LIMITED
            if call.authorized is not None:
                self._canvas.throttled(call.authorized.credential_id, call.authorized.client_id)
        self._metrics.count(call.client, reason or "allow")
        context_id = header(relay.upstream.headers, b"x-request-context-id")
        self._complete(
            call,
            relay.upstream.headers,
            status=status,
            upstream_status=relay.upstream.status,
            response_bytes=sent,
            reason=reason,
            canvas_context_id=context_id.decode("latin-1")[:_CONTEXT_ID_LIMIT]
            if context_id
            else None,
        )

    # Refusals and failures -----------------------------------------------------------------

    def _credential_rejected(self, call: Call) -> None:
        authorized = call.authorized
        credential = authorized.credential_id if authorized else "-"
        self._metrics.upstream_credential_failures.labels(credential=credential).inc()
        logger.warning(
            "Canvas rejected worker credential %s on request %s (401 invalid token): "
            "rotate it with `broker credentials rotate`",
            credential,
            call.request_id,
        )

    async def _refused(self, call: Call, error: BrokerError) -> Refused:
        """Audit a refusal (fail closed: 503 if it cannot be) and say what to answer."""
        event = call.event
        event.decision = "deny"
        event.reason = error.error
        event.status = error.status
        event.duration_ms = call.elapsed_ms()
        if isinstance(error, UnavailableError):
            # A store did not answer within its bound, most likely the database itself:
            # waiting a second bound for this refusal's own commit would double the wait of
            # every call in an outage. It is queued instead, kept and retried as completions
            # are (see "Under faults" in docs/audit.md); nothing was forwarded either way.
            try:
                self._audit.record_later(event)
            except AuditUnavailableError:
                logger.exception(
                    "could not queue the audit event of refused call %s", call.request_id
                )
            self._metrics.count(call.client, error.error)
            return Refused(call.request_id, error.status, error.error, error.message, error.headers)
        try:
            await self._committed(self._audit.record(event, alone=self._alone))
        except AuditUnavailableError as exc:
            self._metrics.count(call.client, exc.error)
            return Refused(call.request_id, exc.status, exc.error, exc.message)
        self._metrics.count(call.client, error.error)
        return Refused(call.request_id, error.status, error.error, error.message, error.headers)

    def _failed(self, call: Call, exc: UpstreamError, *, upstream_status: int | None) -> Refused:
        """Canvas could not be reached or did not answer in time: 502 or 504, completed."""
        status, error = (504, "upstream_timeout") if exc.timeout else (502, "upstream_unreachable")
        self._metrics.count(call.client, error)
        call.finished = True
        self._complete(call, None, status=status, reason=error, upstream_status=upstream_status)
        return Refused(call.request_id, status, error, str(exc))

    def _exposed(self, call: Call, response: UpstreamResponse, leaked: bytes) -> Refused:
        """Canvas's headers carry the worker token: not relayed (502), recorded."""
        name = leaked.decode("latin-1")
        logger.warning(
            "Canvas's response to request %s carried the worker token in %r; not relayed",
            call.request_id,
            name,
        )
        response.release()
        error = "upstream_credential_exposed"
        self._metrics.count(call.client, error)
        call.finished = True
        self._complete(
            call, response.headers, status=502, reason=error, upstream_status=response.status
        )
        return Refused(
            call.request_id,
            502,
            error,
            f"Canvas's response carried the worker credential in its {name} header; "
            "the broker does not relay it",
        )

    def _complete(
        self, call: Call, canvas_headers: Sequence[tuple[bytes, bytes]] | None, **outcome: object
    ) -> None:
        cost = self._settle_capacity(call, canvas_headers)
        if cost is not None:
            outcome["details"] = {"canvas_request_cost": cost}
        if call.begun is not None:
            self._audit.complete(call.begun, duration_ms=call.elapsed_ms(), **outcome)

    def _settle_capacity(
        self, call: Call, canvas_headers: Sequence[tuple[bytes, bytes]] | None
    ) -> float | None:
        """Tell the credential's budget what Canvas said of a call admitted against it."""
        decision, authorized = call.capacity, call.authorized
        if decision is None or authorized is None:
            return None
        call.capacity = None
        return self._canvas.settle(
            authorized.credential_id, authorized.client_id, decision, canvas_headers
        )

    # Helpers -----------------------------------------------------------------------------

    @property
    def _alone(self) -> bool:
        """Whether this is the only call in progress (the audit writer may commit inline)."""
        return self._active == 1

    async def _committed(self, write: Awaitable[T]) -> T:
        """Await an audit commit, measuring it; failures are counted and re-raised."""
        started = time.perf_counter()
        try:
            result = await write
        except AuditUnavailableError:
            self._metrics.audit_failures.inc()
            raise
        self._metrics.audit_latency.observe(time.perf_counter() - started)
        return result

    def _rewriter(self, call: Call) -> Rewriter:
        """The rewriter for this call's pair of origins, built once (they are few)."""
        authorized = call.authorized
        upstream = authorized.upstream_url if authorized is not None else ""
        request = call.request
        public = self._settings.public_base or public_base(
            None, request.header(b"host"), request.scheme, request.server
        )
        key = (upstream, public)
        rewriter = self._rewriters.get(key)
        if rewriter is None:
            rewriter = Rewriter(upstream_origin=upstream, public_base=public)
            if len(self._rewriters) >= _REWRITER_CACHE_SIZE:
                self._rewriters.clear()
            self._rewriters[key] = rewriter
        return rewriter
