"""FastAPI dependencies: the process's services and admin-key authentication."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from broker.core.tokens import MalformedSecretError, SecretKind, check_secret
from broker.errors import AuthenticationError, BadRequestError, PermissionDeniedError
from broker.services.audit import AuditService
from broker.services.management import Actor, ManagementService
from broker.services.tokens import TokenService
from broker.storage.queries import find_admin_key


@dataclass(frozen=True)
class Services:
    """The services one process uses, built once in the lifespan."""

    management: ManagementService
    tokens: TokenService
    audit: AuditService


def get_services(request: Request) -> Services:
    """The services of this process."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def reject_nul(request: Request) -> None:
    """Refuse NUL in path and query parameters: PostgreSQL text cannot hold it."""
    values = [*request.path_params.values(), *request.query_params.values()]
    if any("\x00" in str(value) for value in values):
        raise BadRequestError("parameters must not contain NUL characters")


async def _actor(request: Request) -> Actor:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthenticationError(
            "send Authorization: Bearer <admin key>", error="invalid_admin_key"
        )
    try:
        key_value = check_secret(value.strip(), SecretKind.ADMIN_KEY)
    except MalformedSecretError as exc:
        raise AuthenticationError("the admin key is malformed", error="invalid_admin_key") from exc
    context = request.app.state.context
    async with context.sessions() as session:
        key = await find_admin_key(session, context.keyring.secret_hash_candidates(key_value))
    if key is None or key.revoked_at is not None:
        raise AuthenticationError("the admin key is not valid", error="invalid_admin_key")
    request.state.actor_key_id = key.id
    return Actor(key_id=key.id, role=key.role)


async def require_reader(request: Request) -> Actor:
    """Any valid admin key: ``admin`` or ``auditor``."""
    return await _actor(request)


async def require_admin(request: Request) -> Actor:
    """An ``admin`` key; auditors get 403 on every mutation."""
    actor = await _actor(request)
    if actor.role != "admin":
        raise PermissionDeniedError("auditor keys are read-only", error="read_only_key")
    return actor


Reader = Annotated[Actor, Depends(require_reader)]
Admin = Annotated[Actor, Depends(require_admin)]
