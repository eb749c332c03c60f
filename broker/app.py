"""The ASGI application: management API, OAuth endpoints, operations endpoints and the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from broker import access_log
from broker.api import audit, management, oauth
from broker.api.console import install_console
from broker.api.deps import Services
from broker.api.proxy import ProxyApp
from broker.config import Settings
from broker.context import ProcessContext
from broker.errors import BrokerError, OAuthError
from broker.metrics import Metrics
from broker.requestid import current_request_id, new_request_id
from broker.services.admin_auth import AdminAuthenticator
from broker.services.audit import AuditService
from broker.services.canvas_capacity import CanvasCapacity
from broker.services.console import ConsoleService
from broker.services.exchange import ExchangeService
from broker.services.management import ManagementService
from broker.services.manual_tokens import ManualTokenService
from broker.services.proxy import ProxyService
from broker.services.ratelimit import RateLimitService
from broker.services.readiness import check_readiness, hub_problem
from broker.services.tokens import TokenService
from broker.services.worker_oauth import WorkerOAuthService
from broker.serving import configure_connections
from broker.storage.models import utcnow
from broker.supervision import ParentWatch, leave

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.datastructures import State
    from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

BROKER_PREFIX = "/broker/"
# Answered by the broker itself, not the proxy: operations and RFC 8414 metadata.
OPS_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/.well-known/oauth-authorization-server"}
)


def _proxied(path: str) -> bool:
    """Whether a request for ``path`` goes to the proxy (every path not the broker's own)."""
    return not path.startswith(BROKER_PREFIX) and path not in OPS_PATHS


class BrokerApp:
    """The ASGI application: Canvas paths go straight to the proxy, the rest to FastAPI.

    Every non-broker path reaches the proxy, which refuses what no scope names
    (docs/proxy-rules.md#only-canvas-api-paths), so unknown paths are audited refusals rather
    than anonymous 404s. The proxy sits in front of FastAPI rather than inside it: the hot path
    skips FastAPI's middleware stack (error handling, body limits, telemetry), and the proxy
    answers its own errors.
    """

    def __init__(self, api: FastAPI) -> None:
        self.api = api
        self._wiring: _Wiring = api.state.wiring

    @property
    def state(self) -> State:
        """The FastAPI application's state (context, services, proxy)."""
        return self.api.state

    def openapi(self) -> dict[str, Any]:
        """The management API's OpenAPI schema."""
        return self.api.openapi()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route one ASGI event; with the access log on, write its line once it is answered."""
        if scope["type"] != "http" or not self._wiring.access_log:
            await self._route(scope, receive, send)
            return
        started = time.perf_counter()
        if _proxied(scope["path"]):
            # The proxy leaves its answer's request id and status in the scope: no wrapper
            # around every message it sends.
            try:
                await self._proxy(scope, receive, send)
            finally:
                request_id, status = scope.get(access_log.ANSWER_KEY, (None, None))
                self._log(scope, request_id, status, started)
            return
        seen: dict[str, Any] = {}

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for name, value in message.get("headers", []):
                    if name == b"x-request-id":
                        seen["request_id"] = value.decode("latin-1")
            await send(message)

        try:
            await self._route(scope, receive, observed)
        finally:
            self._log(scope, seen.get("request_id"), seen.get("status"), started)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        proxy = self._wiring.proxy
        if proxy is None:
            raise RuntimeError("the broker has not started: its lifespan did not run")
        await proxy(scope, receive, send)

    def _log(
        self, scope: Scope, request_id: str | None, status: int | None, started: float
    ) -> None:
        access_log.write(
            access_log.line(
                scope,
                request_id=request_id,
                status=status,
                duration_ms=(time.perf_counter() - started) * 1000,
                sensitive=self._wiring.sensitive_query_keys,
            )
        )

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if _proxied(scope["path"]):
                await self._proxy(scope, receive, send)
                return
            request_id = new_request_id()

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"x-request-id", request_id.encode()),
                    ]
                await send(message)

            await self.api(scope, receive, send_with_id)
            return
        await self.api(scope, receive, send)


@dataclass
class _Wiring:
    """What ``BrokerApp`` reads on every request, set by ``install``.

    Plain attributes: starlette's ``State`` answers every read through ``__getattr__``, after
    a failed ordinary lookup (three per proxied call; bench/README.md, "Costs CPython hides").
    """

    proxy: ProxyApp | None = None
    access_log: bool = False
    sensitive_query_keys: frozenset[str] = frozenset()


def create_app(
    settings: Settings | None = None, *, context: ProcessContext | None = None
) -> BrokerApp:
    """Build the application. Nothing happens at import time; resources open in the lifespan.

    Pass ``context`` to share one already built (tests, the demo); otherwise it is built from
    ``settings`` (or the environment) when the app starts and closed when it stops.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = context is None
        process = context or ProcessContext.from_settings(settings or Settings())
        install(app, process)
        if owned:
            limits = configure_connections(process.settings)
            logger.info(
                "holding at most %d client connections (request heads within %g s, idle "
                "keep-alive %g s)",
                limits.max_connections,
                limits.header_timeout,
                limits.keepalive_timeout,
            )
        watch = None
        if owned and process.settings.audit_socket is not None:
            # A worker of `broker serve --workers N`: it ends with its supervisor.
            watch = ParentWatch(leave)
            watch.start()
        app.state.parent_watch = watch
        # Renews OAuth credentials' access tokens; the lease makes it once across processes.
        stopping = asyncio.Event()
        refresher = asyncio.get_running_loop().create_task(
            app.state.services.worker_oauth.run(stopping), name="credential-refresher"
        )
        # Regenerates manual tokens on their schedule, once across processes (a lease too).
        rotator = asyncio.get_running_loop().create_task(
            app.state.services.manual_tokens.run(stopping), name="token-rotator"
        )
        # Shares this process's demand on Canvas buckets with the others, twice a second.
        sharer = asyncio.get_running_loop().create_task(
            app.state.canvas_capacity.run(stopping), name="canvas-demand-sharer"
        )
        try:
            yield
        finally:
            stopping.set()
            # A refresh in flight finishes (its lease released); one stuck is cancelled.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(refresher, 5)
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(rotator, 5)
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(sharer, 5)
            if watch is not None:
                watch.stop()
            if owned:
                await process.aclose()

    app = FastAPI(
        title="Canvas Token Broker",
        version="0.1.0",
        summary="Short-lived, endpoint-scoped, audited proxy credentials for Canvas LMS",
        openapi_url="/broker/v1/openapi.json",
        # Served by ``_add_docs_routes`` from assets shipped with the package, not a CDN.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.wiring = _Wiring()
    app.include_router(oauth.router)
    app.include_router(oauth.metadata_router)
    app.include_router(management.router)
    app.include_router(audit.router)
    install_console(app)
    _add_ops_routes(app)
    _add_docs_routes(app)
    _add_error_handlers(app)
    if context is not None:
        install(app, context)
    return BrokerApp(app)


def install(app: FastAPI, context: ProcessContext) -> None:
    """Attach the process context and the services built on it."""
    metrics = Metrics()
    context.audit_writer.observe = metrics.observe_audit_batch
    metrics.watch_audit_writer(context.audit_writer)
    context.keys.observe = metrics.observe_keyring
    audit = AuditService(context.sessions, context.audit_writer, context.keyring, context.database)
    tokens = TokenService(
        context.sessions, context.keyring, context.settings, audit, context.epoch, keys=context.keys
    )
    app.state.context = context
    app.state.metrics = metrics
    if context.settings.access_log:
        access_log.enable()
    app.state.access_log = context.settings.access_log
    worker_oauth = WorkerOAuthService(
        context.sessions, context.keyring, context.epoch, context.forwarder, metrics=metrics
    )
    manual_tokens = ManualTokenService(
        context.sessions, context.keyring, context.epoch, context.forwarder
    )
    app.state.services = Services(
        management=ManagementService(
            context.sessions,
            context.keyring,
            context.settings,
            context.epoch,
            context.forwarder,
            manual_tokens=manual_tokens,
            issuer_keys=context.issuer_keys,
        ),
        tokens=tokens,
        audit=audit,
        admin_auth=AdminAuthenticator(context.sessions, context.keyring, audit),
        worker_oauth=worker_oauth,
        manual_tokens=manual_tokens,
        exchange=ExchangeService(context.sessions, tokens, context.issuer_keys),
    )
    app.state.console = ConsoleService(context.sessions, context.keyring, context.settings, audit)
    rate_limits = RateLimitService(context.sessions)
    app.state.rate_limits = rate_limits
    canvas = CanvasCapacity(context.settings, metrics, context.sessions)
    app.state.canvas_capacity = canvas
    app.state.proxy = proxy = ProxyApp(
        ProxyService(
            context,
            tokens,
            audit,
            rate_limits,
            metrics,
            canvas=canvas,
            oauth=worker_oauth,
            manual=manual_tokens,
        )
    )
    wiring: _Wiring = app.state.wiring
    wiring.proxy = proxy
    wiring.access_log = context.settings.access_log
    wiring.sensitive_query_keys = context.settings.sensitive_query_keys


def _add_ops_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["operations"], include_in_schema=True)
    async def healthz(request: Request) -> JSONResponse:
        """The process is up; a worker of ``broker serve`` also needs its supervisor's hub."""
        watch: ParentWatch | None = getattr(request.app.state, "parent_watch", None)
        if watch is not None and watch.gone:
            problem: str | None = "the supervising `broker serve` is gone; this worker exits"
        else:
            problem = await hub_problem(request.app.state.context)
        if problem is not None:
            return JSONResponse({"status": "failing", "problem": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["operations"])
    async def readyz(request: Request) -> JSONResponse:
        """The database answers at the migration head, and the keyring decrypts what it holds."""
        readiness = await check_readiness(request.app.state.context)
        body: dict[str, Any] = {
            "status": "ready" if readiness.ready else "not ready",
            **readiness.checks,
        }
        if readiness.problems:
            body["problems"] = readiness.problems
        if readiness.unavailable_credentials:
            body["unavailable_credentials"] = readiness.unavailable_credentials
        return JSONResponse(body, status_code=200 if readiness.ready else 503)

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        """Prometheus text format."""
        services: Services = request.app.state.services
        registry: Metrics = request.app.state.metrics
        registry.live_tokens.set(await services.management.count_live_tokens())
        registry.observe_credentials(await services.management.list_credentials(), utcnow())
        return PlainTextResponse(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)


DOCS_PATH = "/broker/v1/docs"
DOCS_ASSETS = f"{DOCS_PATH}/assets"


def _add_docs_routes(app: FastAPI) -> None:
    """The OpenAPI page, working offline: Swagger UI from the installed ``fastapi-offline``.

    That package ships Swagger UI's built files as package data (it is a runtime dependency,
    pinned in requirements.txt), so the page needs nothing beyond the broker itself.
    """
    assets = resources.files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "",
            title=f"{app.title} - API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": False},
        )


def _error_body(error: str, message: str, **extra: Any) -> dict[str, Any]:  # noqa: ANN401
    return {"error": error, "message": message, "request_id": current_request_id(), **extra}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OAuthError)
    async def oauth_error(_request: Request, exc: OAuthError) -> JSONResponse:
        headers = dict(oauth.NO_STORE)
        if exc.status == HTTPStatus.UNAUTHORIZED:
            # RFC 6749 §5.2: a 401 invalid_client challenges with the scheme clients should use.
            headers["WWW-Authenticate"] = 'Basic realm="canvas-token-broker"'
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return JSONResponse(
            {"error": exc.error, "error_description": exc.message},
            status_code=exc.status,
            headers=headers,
        )

    @app.exception_handler(BrokerError)
    async def broker_error(_request: Request, exc: BrokerError) -> JSONResponse:
        headers = (
            {"WWW-Authenticate": 'Bearer realm="canvas-token-broker"'}
            if exc.status == HTTPStatus.UNAUTHORIZED
            else None
        )
        return JSONResponse(
            _error_body(exc.error, exc.message), status_code=exc.status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only locations and messages: the offending input may be a secret.
        problems = [
            {
                "field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"),
                "problem": err.get("msg", ""),
            }
            for err in exc.errors()
        ]
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
        return JSONResponse(
            _error_body("invalid_request", summary or "invalid request", problems=problems),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            # RFC 9110: a 405 names every method the resource allows. Starlette names only
            # those of the first route matching the path, and each method is a route here.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(
            _error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers
        )


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route fully matches for this request's path."""
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.routes
        )
    ]
