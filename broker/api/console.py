"""The security console at ``/broker/ui/``: server-rendered pages for the security team.

Thin, as every router: each page reads through the audit, management and console services
and renders a Jinja2 template shipped in the package (``broker/ui``). Every response carries
a strict Content-Security-Policy: the pages load only the broker's own script and style, and
hold no inline script or style. Not part of the OpenAPI schema: these are pages for people,
not operations for programs (the management and audit APIs are those).

Contract: docs/interfaces.md#security-console.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import StrictUndefined
from pydantic import ValidationError

from broker.api import audit as audit_api
from broker.api.deps import Services, get_services, reject_nul, request_facts
from broker.audit_filter import ONE_OF, AuditFilter, parameter
from broker.errors import BrokerError
from broker.requestid import set_request_facts
from broker.services.console import (
    ConsoleService,
    ConsoleSession,
    SignInRefusedError,
    same_token,
)
from broker.storage.models import utcnow

if TYPE_CHECKING:
    from starlette.types import Scope

UI: Final = "/broker/ui"
COOKIE: Final = "broker_console"
SIGN_IN_COOKIE: Final = "broker_console_sign_in"
"""The sign-in form's own CSRF token (double submit), before any session exists."""
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PAGE_SIZE: Final = 50
ACTIVITY_HOURS: Final = (1, 6, 24, 168)
_HERE = Path(__file__).resolve().parent.parent / "ui"
templates = Jinja2Templates(directory=str(_HERE / "templates"))
# A name a template uses but the page did not give is a bug, not an empty string.
templates.env.undefined = StrictUndefined

# NUL in a parameter is refused up front, as by the APIs: PostgreSQL text cannot hold it.
router = APIRouter(prefix=UI, include_in_schema=False, dependencies=[Depends(reject_nul)])


class SignInNeededError(Exception):
    """No live session: the browser is sent to the sign-in page."""


class _Static(StaticFiles):
    """The console's script and style, with the console's headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        response.headers["Cache-Control"] = "no-cache"
        return response


def install_console(app: FastAPI) -> None:
    """Add the console's pages, its assets and its redirect to sign-in."""
    # The assets first: the router ends with a page for every other path under the console.
    app.mount(f"{UI}/static", _Static(directory=str(_HERE / "static")), name="console-static")
    app.include_router(router)

    @app.exception_handler(SignInNeededError)
    async def sign_in_needed(request: Request, _exc: SignInNeededError) -> Response:
        wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target = f"{UI}/sign-in?" + urlencode({"next": wanted})
        return _secured(RedirectResponse(target, status_code=HTTPStatus.SEE_OTHER))


def console_service(request: Request) -> ConsoleService:
    """The process's console service."""
    console: ConsoleService = request.app.state.console
    return console


ConsoleDep = Annotated[ConsoleService, Depends(console_service)]
ServicesDep = Annotated[Services, Depends(get_services)]


async def _signed_in(request: Request, *, touch: bool) -> ConsoleSession:
    current = await console_service(request).session(request.cookies.get(COOKIE), touch=touch)
    if current is None:
        raise SignInNeededError
    request.state.actor_key_id = current.key_id
    return current


async def require_session(request: Request) -> ConsoleSession:
    """The live console session of this browser; else off to the sign-in page."""
    return await _signed_in(request, touch=True)


async def require_session_quietly(request: Request) -> ConsoleSession:
    """As ``require_session``, without moving the idle clock (background polling)."""
    return await _signed_in(request, touch=False)


Signed = Annotated[ConsoleSession, Depends(require_session)]
Polling = Annotated[ConsoleSession, Depends(require_session_quietly)]


def _secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _https(request: Request) -> bool:
    """Whether the browser reaches the broker over TLS: its public URL says so, or the request."""
    public: str | None = request.app.state.context.settings.public_url
    if public:
        return urlsplit(public).scheme == "https"
    return request.url.scheme == "https"


def _page(
    request: Request,
    name: str,
    current: ConsoleSession | None,
    status: int = 200,
    **context: Any,  # noqa: ANN401 - template values
) -> Response:
    response = templates.TemplateResponse(
        request, name, {"session": current, "ui": UI, **context}, status_code=status
    )
    return _secured(response)


def _problem(
    request: Request, current: ConsoleSession | None, status: int, message: str
) -> Response:
    return _page(request, "problem.html", current, status=status, message=message)


# Signing in and out ------------------------------------------------------------------------


@router.get("")
async def root_without_slash() -> Response:
    """The console lives under ``/broker/ui/``."""
    return _secured(RedirectResponse(f"{UI}/", status_code=HTTPStatus.SEE_OTHER))


@router.get("/")
async def home(current: Signed) -> Response:  # noqa: ARG001 - signed in, or redirected
    """The console opens on the audit log."""
    return _secured(RedirectResponse(f"{UI}/audit", status_code=HTTPStatus.SEE_OTHER))


def _safe_next(target: str | None) -> str:
    """Only a console path: a sign-in never sends the browser anywhere else."""
    if target and target.startswith(f"{UI}/") and not target.startswith("//"):
        return target
    return f"{UI}/audit"


def _sign_in_page(
    request: Request, status: int = 200, message: str | None = None, next_url: str | None = None
) -> Response:
    """The sign-in form, with a fresh token of its own, also set as a cookie (double submit)."""
    token = secrets.token_urlsafe(24)
    response = _page(
        request,
        "sign_in.html",
        None,
        status=status,
        message=message,
        csrf=token,
        next=_safe_next(next_url),
    )
    response.set_cookie(
        SIGN_IN_COOKIE,
        token,
        path=UI,
        httponly=True,
        samesite="strict",
        secure=_https(request),
        max_age=3600,
    )
    return response


@router.get("/sign-in")
async def sign_in_form(request: Request, next: str | None = None) -> Response:  # noqa: A002
    """The sign-in page, with its form's own CSRF token."""
    return _sign_in_page(request, next_url=next)


@router.post("/sign-in")
async def sign_in(request: Request, console: ConsoleDep) -> Response:
    """Turn an admin key into a session (the key is not kept)."""
    form = await request.form()
    facts = request_facts(request)
    expected = request.cookies.get(SIGN_IN_COOKIE)
    given = str(form.get("csrf_token") or "")
    next_url = str(form.get("next") or "")
    if expected is None or not same_token(given, expected):
        await console.refuse_form(facts, None, csrf=True)
        return _sign_in_page(
            request, 403, "The form had expired; sign in again.", next_url=next_url
        )
    try:
        signed = await console.sign_in(
            str(form.get("key") or ""), facts, previous=request.cookies.get(COOKIE)
        )
    except SignInRefusedError as exc:
        response = _sign_in_page(request, exc.status, exc.message, next_url=next_url)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    response = RedirectResponse(_safe_next(next_url), status_code=HTTPStatus.SEE_OTHER)
    response.set_cookie(
        COOKIE,
        signed.cookie,
        path=UI,
        httponly=True,
        samesite="strict",
        secure=_https(request),
    )
    response.delete_cookie(SIGN_IN_COOKIE, path=UI)
    return _secured(response)


async def _checked_form(
    request: Request, current: ConsoleSession, console: ConsoleService
) -> dict[str, str] | Response:
    """The posted form if its CSRF token is this session's; else the (audited) refusal."""
    form = await request.form()
    fields = {key: str(value) for key, value in form.items()}
    if any("\x00" in value for value in fields.values()):
        return _problem(request, current, 400, "The form holds a NUL character; nothing changed.")
    if not same_token(fields.get("csrf_token"), current.csrf_token):
        await console.refuse_form(request_facts(request), current, csrf=True)
        return _problem(
            request, current, 403, "The form's CSRF token is missing or wrong; nothing changed."
        )
    return fields


@router.post("/sign-out")
async def sign_out(request: Request, current: Signed, console: ConsoleDep) -> Response:
    """End this browser's session."""
    fields = await _checked_form(request, current, console)
    if isinstance(fields, Response):
        return fields
    await console.sign_out(current, request_facts(request))
    response = RedirectResponse(f"{UI}/sign-in", status_code=HTTPStatus.SEE_OTHER)
    response.delete_cookie(COOKIE, path=UI)
    return _secured(response)


# The audit log -----------------------------------------------------------------------------

_FILTER_PARAMS: Final = {parameter(name): name for name in AuditFilter.model_fields}
_TIMES: Final = frozenset({parameter("since"), parameter("until")})


def _utc(value: str) -> str:
    """A time typed without an offset is UTC, as the page shows every time."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return value  # the filter's own validation says what is wrong
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.isoformat()


def _selection(request: Request) -> tuple[AuditFilter, dict[str, str], str | None]:
    """The filters in the query string, the form's values, and what is wrong with them."""
    given = {
        key: value.strip()
        for key, value in request.query_params.items()
        if key in _FILTER_PARAMS and value.strip()
    }
    given = {key: _utc(value) if key in _TIMES else value for key, value in given.items()}
    try:
        return AuditFilter.model_validate(given), given, None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
            for err in exc.errors()
        )
        return AuditFilter(), given, problems


def _filter_fields(given: dict[str, str]) -> list[dict[str, Any]]:
    fields = []
    for name, info in AuditFilter.model_fields.items():
        param = parameter(name)
        allowed = ONE_OF.get(name)
        fields.append(
            {
                "param": param,
                "label": param.replace("_", " "),
                "description": info.description or "",
                "value": given.get(param, ""),
                "choices": sorted(allowed.values) if allowed else None,
            }
        )
    return fields


async def _names(services: Services) -> dict[str, dict[str, str]]:
    clients = {c.id: c.name for c in await services.management.list_clients()}
    credentials = {c.id: c.name for c in await services.management.list_credentials()}
    return {"clients": clients, "credentials": credentials}


@router.get("/audit")
async def audit_log(
    request: Request,
    current: Signed,
    services: ServicesDep,
    cursor: str | None = None,
) -> Response:
    """The audit log: the review API's filters, newest first, cursor paging."""
    selection, given, problem = _selection(request)
    events: list[dict[str, Any]] = []
    next_cursor = None
    status = 200
    if problem is None:
        try:
            selection = await services.audit.resolve(selection)
            events, next_cursor = await services.audit.query(
                selection, cursor=cursor, limit=PAGE_SIZE
            )
        except BrokerError as exc:
            problem, status = exc.message, exc.status
    query = urlencode(given)
    return _page(
        request,
        "audit.html",
        current,
        status=status,
        events=events,
        fields=_filter_fields(given),
        problem=problem,
        query=query,
        next_url=(
            f"{UI}/audit?" + urlencode({**given, "cursor": next_cursor}) if next_cursor else None
        ),
        first_page=cursor is None,
        newest_seq=max((e["seq"] for e in events), default=0),
        names=await _names(services),
    )


@router.get("/audit/tail.json")
async def audit_tail(
    request: Request,
    _current: Polling,
    services: ServicesDep,
    console: ConsoleDep,
    after: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """Calls newer than ``after`` matching the filters, as table rows, newest first."""
    selection, _given, problem = _selection(request)
    if problem is not None:
        return _secured(Response(status_code=400))
    try:
        selection = await services.audit.resolve(selection)
    except BrokerError:
        return _secured(Response(status_code=400))
    events = await console.tail(selection, after)
    rows = templates.get_template("rows.html").render(
        events=list(reversed(events)), names=await _names(services), ui=UI
    )
    last = max((e["seq"] for e in events), default=after)
    return _secured(
        Response(
            content=json.dumps({"rows": rows, "last_seq": last}),
            media_type="application/json",
        )
    )


@router.get("/audit/export")
async def audit_export(
    request: Request,
    current: Signed,
    services: ServicesDep,
    export_format: Annotated[Literal["ndjson", "csv"], Query(alias="format")] = "ndjson",
) -> Response:
    """The current selection, through the audit API's own export (and audited as it is)."""
    selection, _given, problem = _selection(request)
    if problem is not None:
        return _problem(request, current, 400, problem)
    try:
        selection = await services.audit.resolve(selection)
    except BrokerError as exc:
        return _problem(request, current, exc.status, exc.message)
    response: StreamingResponse = await audit_api.export_audit(
        request, current.actor, services, selection, export_format
    )
    response.headers.update(SECURITY_HEADERS)
    return response


@router.get("/audit/events/{seq}")
async def audit_event(
    request: Request, seq: int, current: Signed, services: ServicesDep, console: ConsoleDep
) -> Response:
    """One event, merged with its call's other half, and its place in the chain."""
    found = await console.event(seq) if 0 < seq < 2**63 else None
    if found is None:
        return _problem(
            request, current, 404, f"There is no audit event {seq} (pruned, or not yet)."
        )
    return _page(request, "event.html", current, found=found, names=await _names(services))


# Integrity ---------------------------------------------------------------------------------


@router.get("/integrity")
async def integrity(request: Request, current: Signed, console: ConsoleDep) -> Response:
    """The last verification, the signed head and the retention checkpoints."""
    head, checkpoints = await console.head_and_checkpoints()
    return _page(
        request,
        "integrity.html",
        current,
        last=await console.last_verify(),
        head=head,
        checkpoints=checkpoints,
    )


@router.post("/integrity/verify")
async def verify_now(request: Request, current: Signed, console: ConsoleDep) -> Response:
    """Verify the chain now (auditors may: it changes nothing); the finding is audited."""
    fields = await _checked_form(request, current, console)
    if isinstance(fields, Response):
        return fields
    await console.verify(current, request_facts(request))
    return _secured(RedirectResponse(f"{UI}/integrity", status_code=HTTPStatus.SEE_OTHER))


# Clients, credentials and the admin's actions ----------------------------------------------


@router.get("/clients")
async def clients_page(
    request: Request, current: Signed, services: ServicesDep, console: ConsoleDep
) -> Response:
    """Every client with its grant, constraints and live tokens; recent admin actions."""
    clients = await services.management.list_clients()
    tokens = await services.management.list_tokens(client=None, include_inactive=False)
    live: dict[str, int] = {}
    for token in tokens:
        live[token.client_id] = live.get(token.client_id, 0) + 1
    recent = await console.recent(AuditFilter.model_validate({"kind": "admin"}), 20)
    return _page(
        request,
        "clients.html",
        current,
        clients=clients,
        live=live,
        recent=recent,
        names=await _names(services),
    )


@router.get("/clients/{ref}")
async def client_page(
    request: Request, ref: str, current: Signed, services: ServicesDep
) -> Response:
    """One client: its grant and its live tokens."""
    try:
        client = await services.management.get_client(ref)
    except BrokerError as exc:
        return _problem(request, current, exc.status, exc.message)
    tokens = await services.management.list_tokens(client=client.id, include_inactive=False)
    return _page(
        request,
        "client.html",
        current,
        client=client,
        tokens=tokens,
        names=await _names(services),
    )


@router.get("/credentials")
async def credentials_page(request: Request, current: Signed, services: ServicesDep) -> Response:
    """Worker credentials with their expiry and why one is unavailable."""
    return _page(
        request,
        "credentials.html",
        current,
        credentials=await services.management.list_credentials(),
        upstreams=await services.management.upstream_names(),
        now=utcnow(),
    )


ACTIONS: Final = {
    "revoke_token": "Revoke token",
    "revoke_client_tokens": "Revoke every live token of client",
    "disable_client": "Disable client (and revoke its live tokens)",
    "disable_credential": "Disable credential (every token through it stops working)",
}


@router.get("/confirm")
async def confirm(
    request: Request, current: Signed, action: str = "", target: str = ""
) -> Response:
    """The confirmation step before an admin's action."""
    if action not in ACTIONS or not target:
        return _problem(request, current, 400, "Nothing to confirm: unknown action or target.")
    return _page(
        request, "confirm.html", current, action=action, label=ACTIONS[action], target=target
    )


@router.post("/actions")
async def act(
    request: Request, current: Signed, services: ServicesDep, console: ConsoleDep
) -> Response:
    """Carry out a confirmed action as the signed-in admin, through the management service."""
    fields = await _checked_form(request, current, console)
    if isinstance(fields, Response):
        return fields
    facts = request_facts(request)
    if not current.can_change:
        await console.refuse_form(facts, current, csrf=False)
        return _problem(
            request, current, 403, "Auditor sessions are read-only: nothing was changed."
        )
    action, target = fields.get("action", ""), fields.get("target", "")
    if action not in ACTIONS or not target:
        return _problem(request, current, 400, "Unknown action or target: nothing was changed.")
    # Management events record where the change came from, as the API's do.
    set_request_facts({k: v for k, v in facts.items() if k != "request_id"})
    management = services.management
    try:
        if action == "revoke_token":
            token = await management.revoke_token(current.actor, target)
            done, back = f"Token {token.id} is revoked.", f"{UI}/clients/{token.client_id}"
        elif action == "revoke_client_tokens":
            count = await management.revoke_client_tokens(current.actor, target)
            done, back = f"{count} live token(s) revoked.", f"{UI}/clients/{target}"
        elif action == "disable_client":
            change = await management.update_client(current.actor, target, enabled=False)
            revoked = change.tokens_revoked
            done = f"Client {change.client.name} is disabled; {revoked} live token(s) revoked."
            back = f"{UI}/clients/{change.client.id}"
        else:
            credential = await management.update_credential(current.actor, target, enabled=False)
            done, back = f"Credential {credential.name} is disabled.", f"{UI}/credentials"
    except BrokerError as exc:
        return _problem(request, current, exc.status, exc.message)
    return _page(request, "done.html", current, message=done, back=back)


# Activity ----------------------------------------------------------------------------------


@router.get("/activity")
async def activity_page(request: Request, current: Signed, hours: int = 24) -> Response:
    """Charts of calls, refusals and Canvas capacity, drawn from ``activity.json``."""
    chosen = hours if hours in ACTIVITY_HOURS else 24
    return _page(request, "activity.html", current, hours=chosen, choices=ACTIVITY_HOURS)


@router.get("/activity.json")
async def activity_data(
    _current: Polling, services: ServicesDep, console: ConsoleDep, hours: int = 24
) -> Response:
    """Calls and refusals per client and reason, and Canvas capacity spent, over time."""
    chosen = hours if hours in ACTIVITY_HOURS else 24
    names = (await _names(services))["clients"]
    data = await console.activity(chosen, names)
    return _secured(Response(content=json.dumps(data), media_type="application/json"))


# Last: any other page under the console --------------------------------------------------


@router.get("/{rest:path}")
async def no_such_page(request: Request, current: Signed, rest: str) -> Response:  # noqa: ARG001
    """A page of the console's own for a mistyped or stale link, not the API's JSON error."""
    return _problem(request, current, HTTPStatus.NOT_FOUND, "There is no such page in the console.")
