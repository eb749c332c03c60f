"""FastAPI dependencies: the process's services, request facts and admin-key authentication."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from broker.core.net import client_address
from broker.errors import BadRequestError
from broker.requestid import current_request_id, set_request_facts
from broker.services.admin_auth import AdminAuthenticator
from broker.services.audit import AuditService
from broker.services.exchange import ExchangeService
from broker.services.management import Actor, ManagementService
from broker.services.manual_tokens import ManualTokenService
from broker.services.tokens import TokenService
from broker.services.worker_oauth import WorkerOAuthService


@dataclass(frozen=True)
class Services:
    """The services one process uses, built once in the lifespan."""

    management: ManagementService
    tokens: TokenService
    audit: AuditService
    admin_auth: AdminAuthenticator
    worker_oauth: WorkerOAuthService
    manual_tokens: ManualTokenService
    exchange: ExchangeService


def get_services(request: Request) -> Services:
    """The services of this process."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def request_facts(request: Request) -> dict[str, Any]:
    """What every audit event of a broker endpoint records about the request."""
    settings = request.app.state.context.settings
    peer = request.client.host if request.client else None
    return {
        "request_id": current_request_id(),
        "method": request.method,
        "path": request.url.path,
        "source_ip": client_address(
            peer, request.headers.getlist("x-forwarded-for"), settings.trusted_networks
        ),
        "user_agent": (request.headers.get("user-agent") or "")[:500] or None,
    }


async def reject_nul(request: Request) -> None:
    """Refuse NUL in path and query parameters: PostgreSQL text cannot hold it."""
    values = [*request.path_params.values(), *request.query_params.values()]
    if any("\x00" in str(value) for value in values):
        raise BadRequestError("parameters must not contain NUL characters")


async def _actor(request: Request, *, admin: bool) -> Actor:
    facts = request_facts(request)
    actor = await get_services(request).admin_auth.authenticate(
        request.headers.get("authorization"), facts, admin=admin
    )
    request.state.actor_key_id = actor.key_id
    # Management events record where the change came from, not only who made it.
    set_request_facts({k: v for k, v in facts.items() if k != "request_id"})
    return actor


# Declares the Bearer scheme in the OpenAPI schema, so the docs page can send an admin key
# ("Authorize"); authentication itself stays in ``AdminAuthenticator``, which answers a
# missing key with the broker's own 401 (auto_error=False keeps FastAPI's 403 out of it).
admin_key_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="adminKey",
    description="An admin key (`cba_…`): role `admin`, or `auditor` for reads.",
)
AdminKeyHeader = Annotated[HTTPAuthorizationCredentials | None, Depends(admin_key_scheme)]


async def require_reader(request: Request, _scheme: AdminKeyHeader) -> Actor:
    """Any valid admin key: ``admin`` or ``auditor``."""
    return await _actor(request, admin=False)


async def require_admin(request: Request, _scheme: AdminKeyHeader) -> Actor:
    """An ``admin`` key; auditors get 403 on every mutation."""
    return await _actor(request, admin=True)


Reader = Annotated[Actor, Depends(require_reader)]
Admin = Annotated[Actor, Depends(require_admin)]
