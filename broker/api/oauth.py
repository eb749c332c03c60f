"""OAuth 2.0 endpoints for scripts.

Client credentials (RFC 6749 §4.4), token exchange of a platform's identity token (RFC 8693,
and the RFC 7523 JWT bearer grant), revocation (RFC 7009), introspection (RFC 7662, for admin
keys) and the authorization server metadata (RFC 8414).
"""

from __future__ import annotations

import base64
import binascii
import html
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse

from broker.api.deps import Reader, ServicesDep, request_facts
from broker.api.schemas import ErrorOut, OAuthErrorOut
from broker.core.assertions import ALGORITHMS as ASSERTION_ALGORITHMS
from broker.core.assertions import ASSERTION_TYPE
from broker.core.workload import ALGORITHMS as WORKLOAD_ALGORITHMS
from broker.core.workload import (
    JWT_BEARER,
    SUBJECT_TOKEN_TYPES,
    TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS_TOKEN,
)
from broker.errors import BrokerError, OAuthError
from broker.requestid import set_request_facts

if TYPE_CHECKING:
    from starlette.datastructures import FormData

    from broker.domain import Client

# RFC 6749 §5.2 errors; introspection is authenticated by admin key, whose errors are the
# management API's.
OAUTH_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": OAuthErrorOut},
    401: {"model": OAuthErrorOut},
    429: {"model": OAuthErrorOut},
    503: {"model": OAuthErrorOut},
}
ADMIN_KEY_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut},
    403: {"model": ErrorOut},
}
router = APIRouter(prefix="/broker/v1/oauth", tags=["oauth"])
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
FORM = "application/x-www-form-urlencoded"


async def _form(request: Request) -> FormData:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM:
        raise OAuthError("invalid_request", f"send the parameters as {FORM}")
    form = await request.form()
    for name, _value in form.multi_items():
        if len(form.getlist(name)) > 1:
            raise OAuthError("invalid_request", f"parameter {name!r} is repeated")
    return form


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _client_credentials(request: Request, form: FormData) -> tuple[str, str]:
    """``client_secret_basic`` or ``client_secret_post``, never both (RFC 6749 §2.3)."""
    header = request.headers.get("authorization")
    posted_id, posted_secret = _field(form, "client_id"), _field(form, "client_secret")
    if header is not None:
        if posted_secret is not None:
            raise OAuthError("invalid_request", "use one client authentication method, not two")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            raise OAuthError("invalid_client", "use HTTP Basic client authentication", status=401)
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise OAuthError("invalid_client", "malformed Basic credentials", status=401) from exc
        client_id, sep, secret = decoded.partition(":")
        if not sep:
            raise OAuthError("invalid_client", "malformed Basic credentials", status=401)
        return unquote_plus(client_id), unquote_plus(secret)
    if posted_id is None or posted_secret is None:
        raise OAuthError("invalid_client", "client authentication required", status=401)
    return posted_id, posted_secret


async def _authenticated_client(
    request: Request,
    services: ServicesDep,
    audit: dict[str, Any],
    parsed: FormData | None = None,
) -> tuple[Client, FormData]:
    """Parse the form and authenticate the client within the limits; every refusal is audited.

    ``parsed`` is a form the caller already read (after admitting the source).
    """
    if parsed is None:
        services.tokens.admit_source(audit)
    try:
        form = parsed if parsed is not None else await _form(request)
        assertion = _client_assertion(request, form)
        if assertion is None:
            client_id, secret = _client_credentials(request, form)
    except OAuthError as exc:
        await services.tokens.refuse(audit, exc.error, status=exc.status)
        raise
    if assertion is not None:
        client = await services.tokens.authenticate_assertion(
            assertion,
            _field(form, "client_id"),
            audiences=_audiences(request),
            audit=audit,
        )
    else:
        client = await services.tokens.authenticate_client(client_id, secret, audit=audit)
    services.tokens.admit_client(client, audit)
    return client, form


def _client_assertion(request: Request, form: FormData) -> str | None:
    """``private_key_jwt`` (RFC 7523 §2.2): the signed assertion, or None for secret auth."""
    assertion_type = _field(form, "client_assertion_type")
    assertion = _field(form, "client_assertion")
    if assertion_type is None and assertion is None:
        return None
    if request.headers.get("authorization") is not None or _field(form, "client_secret"):
        raise OAuthError("invalid_request", "use one client authentication method, not two")
    if assertion_type != ASSERTION_TYPE:
        raise OAuthError("invalid_client", f"client_assertion_type must be {ASSERTION_TYPE}", 401)
    if not assertion:
        raise OAuthError("invalid_request", "client_assertion is required")
    return assertion


def _audiences(request: Request) -> list[str]:
    """What an assertion's ``aud`` may name: this token endpoint, or the broker itself."""
    base = request.app.state.context.settings.public_base
    if base is None:
        base = f"{request.url.scheme}://{request.url.netloc}"
    return [f"{base}{router.prefix}/token", base, f"{base}/"]


def _grant_type_problem(form: FormData) -> OAuthError | None:
    grant_type = _field(form, "grant_type")
    if grant_type is None:
        return OAuthError("invalid_request", "grant_type is required")
    if grant_type != "client_credentials":
        return OAuthError(
            "unsupported_grant_type",
            f"grant_type must be client_credentials, {TOKEN_EXCHANGE} or {JWT_BEARER}",
        )
    return None


@router.post("/token", responses=OAUTH_ERRORS)
async def token(request: Request, services: ServicesDep) -> JSONResponse:
    """Mint a short-lived proxy token: for client credentials, or for a platform's token.

    ``grant_type=client_credentials`` with client authentication, or a keyless job's
    ``urn:ietf:params:oauth:grant-type:token-exchange`` (RFC 8693) or
    ``urn:ietf:params:oauth:grant-type:jwt-bearer`` (RFC 7523) with ``client_id`` and the
    platform's identity token (docs/interfaces.md#workload-identity-token-exchange).
    """
    audit = request_facts(request)
    services.tokens.admit_source(audit)
    try:
        form = await _form(request)
    except OAuthError as exc:
        await services.tokens.refuse(audit, exc.error, status=exc.status)
        raise
    if _field(form, "grant_type") in {TOKEN_EXCHANGE, JWT_BEARER}:
        return await _exchange(request, services, form, audit)
    client, form = await _authenticated_client(request, services, audit, form)
    problem = _grant_type_problem(form)
    if problem is not None:
        await services.tokens.refuse(
            audit, problem.error, status=problem.status, client_id=client.id
        )
        raise problem
    minted = await services.tokens.mint(
        client,
        scope=_field(form, "scope"),
        expires_in=_field(form, "expires_in"),
        audit=audit,
    )
    return JSONResponse(
        {
            "access_token": minted.access_token,
            "token_type": "Bearer",
            "expires_in": minted.expires_in,
            "scope": minted.scope,
        },
        headers=NO_STORE,
    )


async def _exchange(
    request: Request, services: ServicesDep, form: FormData, audit: dict[str, Any]
) -> JSONResponse:
    """Token exchange or JWT bearer: the platform token stands in for client authentication."""
    grant_type = _field(form, "grant_type") or ""
    try:
        subject_token = _subject_token(request, form, grant_type)
    except OAuthError as exc:
        await services.tokens.refuse(
            {**audit, "action": "token.exchange"},
            exc.error,
            status=exc.status,
            details={"grant_type": grant_type},
        )
        raise
    minted = await services.exchange.exchange(
        grant_type=grant_type,
        subject_token=subject_token,
        client_id=_field(form, "client_id"),
        scope=_field(form, "scope"),
        expires_in=_field(form, "expires_in"),
        audit=audit,
    )
    body: dict[str, Any] = {
        "access_token": minted.access_token,
        "token_type": "Bearer",
        "expires_in": minted.expires_in,
        "scope": minted.scope,
    }
    if grant_type == TOKEN_EXCHANGE:
        body["issued_token_type"] = TOKEN_TYPE_ACCESS_TOKEN  # RFC 8693 §2.2.1
    return JSONResponse(body, headers=NO_STORE)


def _subject_token(request: Request, form: FormData, grant_type: str) -> str:
    """The platform token of an exchange request, its parameters checked."""
    if (
        request.headers.get("authorization") is not None
        or _field(form, "client_secret") is not None
        or _field(form, "client_assertion") is not None
    ):
        raise OAuthError(
            "invalid_request",
            "the platform token authenticates this request: send client_id, and no client "
            "secret or assertion",
        )
    if grant_type == JWT_BEARER:
        assertion = _field(form, "assertion")
        if not assertion:
            raise OAuthError("invalid_request", "assertion is required (the platform's token)")
        return assertion
    if _field(form, "actor_token") is not None or _field(form, "actor_token_type") is not None:
        raise OAuthError("invalid_request", "delegation (actor_token) is not supported")
    requested = _field(form, "requested_token_type")
    if requested not in {None, TOKEN_TYPE_ACCESS_TOKEN}:
        raise OAuthError(
            "invalid_request", f"requested_token_type must be {TOKEN_TYPE_ACCESS_TOKEN}"
        )
    for name in ("audience", "resource"):
        target = _field(form, name)
        if target is not None and target not in _audiences(request):
            # RFC 8693 §2.2.2: a target this server cannot issue a token for.
            raise OAuthError("invalid_target", f"{name} must name this broker, or be left out")
    subject_token = _field(form, "subject_token")
    if not subject_token:
        raise OAuthError("invalid_request", "subject_token is required (the platform's token)")
    if _field(form, "subject_token_type") not in SUBJECT_TOKEN_TYPES:
        raise OAuthError(
            "invalid_request",
            f"subject_token_type must be one of {', '.join(SUBJECT_TOKEN_TYPES)}",
        )
    return subject_token


@router.post("/revoke", responses=OAUTH_ERRORS)
async def revoke(request: Request, services: ServicesDep) -> JSONResponse:
    """RFC 7009: a client revokes one of its own tokens. Always 200 for a known client."""
    audit = {**request_facts(request), "action": "token.revoke"}
    client, form = await _authenticated_client(request, services, audit)
    value = _field(form, "token")
    if not value:
        problem = OAuthError("invalid_request", "token is required")
        await services.tokens.refuse(
            audit, problem.error, status=problem.status, client_id=client.id
        )
        raise problem
    await services.tokens.revoke_own(client, value, audit=audit)
    return JSONResponse({}, headers=NO_STORE)


@router.post("/introspect", responses={400: {"model": OAuthErrorOut}, **ADMIN_KEY_ERRORS})
async def introspect(request: Request, _: Reader, services: ServicesDep) -> JSONResponse:
    """RFC 7662 introspection, for admin and auditor keys."""
    form = await _form(request)
    value = _field(form, "token")
    if not value:
        raise OAuthError("invalid_request", "token is required")
    return JSONResponse(await services.tokens.introspect(value), headers=NO_STORE)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - Canvas Token Broker</title></head>
<body><h1>{title}</h1><p>{message}</p></body></html>
"""
# The page runs nothing and loads nothing; it is not to be framed or cached.
_PAGE_HEADERS = {
    **NO_STORE,
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


_PAGE_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "content": {"text/html": {}}}
    for status, description in (
        (400, "the authorisation cannot complete: the page says why"),
        (429, "too many callbacks from this address"),
        (502, "Canvas's token endpoint could not be reached"),
    )
}


@router.get("/callback", response_class=HTMLResponse, responses=_PAGE_ERRORS)
async def callback(request: Request, services: ServicesDep) -> HTMLResponse:
    """Where Canvas sends the worker user's browser after authorising a developer key.

    Completes ``POST /broker/v1/credentials/{ref}/authorize``: the ``state`` must be one this
    broker issued, unused and unexpired; the code is exchanged with Canvas and the grant stored
    encrypted. The page shows no token (docs/interfaces.md#oauth-worker-credentials).
    """
    set_request_facts({k: v for k, v in request_facts(request).items() if k != "request_id"})
    query = request.query_params
    try:
        done = await services.worker_oauth.complete(
            state=query.get("state"), code=query.get("code"), error=query.get("error")
        )
    except BrokerError as exc:
        page = _PAGE.format(title="Not authorised", message=html.escape(str(exc)))
        return HTMLResponse(page, status_code=exc.status, headers=_PAGE_HEADERS)
    credential = done.credential
    who = credential.canvas_user_name or credential.canvas_user_id or "the worker user"
    message = (
        f"The broker's credential {credential.name!r} now acts as Canvas user "
        f"{who}. You can close this window."
    )
    page = _PAGE.format(title="Authorised", message=html.escape(message))
    return HTMLResponse(page, headers=_PAGE_HEADERS)


metadata_router = APIRouter(tags=["oauth"])
METADATA_PATH = "/.well-known/oauth-authorization-server"


@metadata_router.get(METADATA_PATH)
async def authorization_server_metadata(request: Request) -> JSONResponse:
    """RFC 8414 metadata: the token endpoint, its grants and client authentication methods.

    ``none`` is the authentication of a keyless job: its platform's token stands in for it
    (docs/interfaces.md#authorization-server-metadata).
    """
    base = request.app.state.context.settings.public_base
    if base is None:
        base = f"{request.url.scheme}://{request.url.netloc}"
    methods = ["client_secret_basic", "client_secret_post", "private_key_jwt"]
    return JSONResponse(
        {
            "issuer": base,
            "token_endpoint": f"{base}{router.prefix}/token",
            "revocation_endpoint": f"{base}{router.prefix}/revoke",
            "introspection_endpoint": f"{base}{router.prefix}/introspect",
            "grant_types_supported": ["client_credentials", TOKEN_EXCHANGE, JWT_BEARER],
            # RFC 8414 §2 requires the member; there is no authorization endpoint.
            "response_types_supported": [],
            "token_endpoint_auth_methods_supported": [*methods, "none"],
            "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
            "revocation_endpoint_auth_methods_supported": methods,
            "introspection_endpoint_auth_methods_supported": ["bearer"],
            "subject_token_types_supported": list(SUBJECT_TOKEN_TYPES),
            "subject_token_signing_alg_values_supported": list(WORKLOAD_ALGORITHMS),
            "service_documentation": f"{base}/broker/v1/docs",
        },
        headers={"Cache-Control": "public, max-age=3600"},
    )
