"""Management API routers: thin — parse, call a service, shape the response.

Contract: docs/interfaces.md#management-api.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, status

from broker.api.deps import Admin, Reader, Services, ServicesDep, reject_nul
from broker.api.schemas import (
    AdminKeyCreate,
    AdminKeyCreated,
    AdminKeyOut,
    AuthorizationOut,
    CanvasShareOut,
    ClientCreate,
    ClientOut,
    ClientUpdate,
    ClientUpdated,
    ClientWithSecret,
    CredentialCreate,
    CredentialOut,
    CredentialRotate,
    CredentialUpdate,
    ErrorOut,
    IssuerCreate,
    IssuerOut,
    IssuerRemoved,
    PolicyCheck,
    PolicyDecision,
    RevokedCount,
    SecretRotate,
    TokenOut,
    TokenValue,
    UpstreamCreate,
    UpstreamOut,
    UpstreamUpdate,
)
from broker.domain import Client, OAuthGrant, WorkerCredential
from broker.errors import ValidationFailedError
from broker.services.canvas_capacity import CanvasCapacity
from broker.services.management import ClientChange, grant_warnings, scope_warnings
from broker.services.manual_tokens import expiry_warnings
from broker.storage.models import utcnow

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 422)
}
router = APIRouter(prefix="/broker/v1", responses=ERRORS, dependencies=[Depends(reject_nul)])


def _client_out(client: Client) -> ClientOut:
    return ClientOut.model_validate({**asdict(client), "client_id": client.id})


def _credential_out(
    credential: WorkerCredential,
    upstreams: dict[str, str],
    grants: dict[str, OAuthGrant] | None = None,
    warnings: list[str] | None = None,
) -> CredentialOut:
    grant = (grants or {}).get(credential.id)
    return CredentialOut.model_validate(
        {
            **asdict(credential),
            "upstream": upstreams.get(credential.upstream_id),
            "oauth": None if grant is None else asdict(grant),
            "warnings": [*(warnings or ()), *expiry_warnings(credential, utcnow())],
        }
    )


async def _credential_view(services: Services, credential: WorkerCredential) -> CredentialOut:
    return _credential_out(
        credential,
        await services.management.upstream_names(),
        await services.management.oauth_grants(),
    )


# Upstreams ----------------------------------------------------------------------------------


@router.post("/upstreams", status_code=status.HTTP_201_CREATED, tags=["upstreams"])
async def create_upstream(body: UpstreamCreate, actor: Admin, services: ServicesDep) -> UpstreamOut:
    """Register a Canvas instance."""
    upstream = await services.management.create_upstream(
        actor, name=body.name, base_url=body.base_url
    )
    return UpstreamOut.model_validate(upstream)


@router.get("/upstreams", tags=["upstreams"])
async def list_upstreams(_: Reader, services: ServicesDep) -> list[UpstreamOut]:
    """All upstreams."""
    return [UpstreamOut.model_validate(u) for u in await services.management.list_upstreams()]


@router.get("/upstreams/{ref}", tags=["upstreams"])
async def get_upstream(ref: str, _: Reader, services: ServicesDep) -> UpstreamOut:
    """One upstream by id or name."""
    return UpstreamOut.model_validate(await services.management.get_upstream(ref))


@router.patch("/upstreams/{ref}", tags=["upstreams"])
async def update_upstream(
    ref: str, body: UpstreamUpdate, actor: Admin, services: ServicesDep
) -> UpstreamOut:
    """Change an upstream."""
    upstream = await services.management.update_upstream(
        actor, ref, name=body.name, base_url=body.base_url, enabled=body.enabled
    )
    return UpstreamOut.model_validate(upstream)


@router.post("/upstreams/{ref}/disable", tags=["upstreams"])
async def disable_upstream(ref: str, actor: Admin, services: ServicesDep) -> UpstreamOut:
    """Disable an upstream: every token bound to it stops working at once."""
    upstream = await services.management.update_upstream(actor, ref, enabled=False)
    return UpstreamOut.model_validate(upstream)


@router.post("/upstreams/{ref}/enable", tags=["upstreams"])
async def enable_upstream(ref: str, actor: Admin, services: ServicesDep) -> UpstreamOut:
    """Re-enable an upstream."""
    upstream = await services.management.update_upstream(actor, ref, enabled=True)
    return UpstreamOut.model_validate(upstream)


# Worker credentials -------------------------------------------------------------------------


@router.post("/credentials", status_code=status.HTTP_201_CREATED, tags=["credentials"])
async def create_credential(
    body: CredentialCreate, actor: Admin, services: ServicesDep
) -> CredentialOut:
    """Store a worker user's Canvas token, encrypted. It is never returned.

    Unless ``verify`` is false, Canvas is asked first (``GET /api/v1/users/self``): a token it
    rejects is a 422 ``canvas_rejected_token`` and nothing is stored.
    """
    if (body.token is None) == (body.developer_key is None):
        raise ValidationFailedError(
            "token", "give exactly one of token (a manual token) and developer_key (OAuth)"
        )
    if body.developer_key is not None:
        key = body.developer_key
        credential = await services.management.create_oauth_credential(
            actor,
            upstream=body.upstream,
            name=body.name,
            developer_key_id=key.client_id,
            developer_key_secret=key.client_secret.get_secret_value(),
            key_scopes=key.scopes,
            canvas_user_id=body.canvas_user_id,
            expires_at=body.expires_at,
            notes=body.notes,
        )
        return await _credential_view(services, credential)
    assert body.token is not None  # noqa: S101 - one of the two, checked above
    warnings: list[str] = []
    credential = await services.management.create_credential(
        actor,
        upstream=body.upstream,
        name=body.name,
        token=body.token.get_secret_value(),
        canvas_user_id=body.canvas_user_id,
        expires_at=body.expires_at,
        notes=body.notes,
        verify=body.verify,
        rotate_every=body.rotate_every,
        warnings=warnings,
    )
    return _credential_out(
        credential, await services.management.upstream_names(), warnings=warnings
    )


@router.post("/credentials/{ref}/authorize", tags=["credentials"])
async def authorize_credential(
    ref: str, actor: Admin, services: ServicesDep, request: Request
) -> AuthorizationOut:
    """Start the authorisation of an OAuth credential: a URL for the worker user to open once.

    Canvas sends the browser back to ``redirect_uri`` (the broker's callback, under
    ``BROKER_PUBLIC_URL``), which must be a redirect URI of the developer key. The link works
    once, for ten minutes.
    """
    settings = request.app.state.context.settings
    base = settings.public_base or str(request.base_url).rstrip("/")
    started = await services.worker_oauth.start(actor.key_id, ref, base)
    return AuthorizationOut(
        authorization_url=started.url,
        redirect_uri=started.redirect_uri,
        expires_at=started.expires_at,
        credential=await _credential_view(services, started.credential),
    )


@router.get("/credentials", tags=["credentials"])
async def list_credentials(_: Reader, services: ServicesDep) -> list[CredentialOut]:
    """All worker credentials (metadata only)."""
    names = await services.management.upstream_names()
    grants = await services.management.oauth_grants()
    return [_credential_out(c, names, grants) for c in await services.management.list_credentials()]


@router.get("/credentials/{ref}", tags=["credentials"])
async def get_credential(ref: str, _: Reader, services: ServicesDep) -> CredentialOut:
    """One credential's metadata by id or name."""
    credential = await services.management.get_credential(ref)
    return await _credential_view(services, credential)


@router.patch("/credentials/{ref}", tags=["credentials"])
async def update_credential(
    ref: str, body: CredentialUpdate, actor: Admin, services: ServicesDep
) -> CredentialOut:
    """Change a credential's metadata (fields left out are unchanged).

    ``key_scopes`` records an OAuth credential's developer-key scopes anew (after they were
    changed in Canvas); the next authorisation asks for them.
    """
    fields = body.model_dump(exclude_unset=True)
    key_scopes = fields.pop("key_scopes", None)
    if key_scopes is not None:
        credential = await services.management.set_key_scopes(actor, ref, key_scopes)
    if fields or key_scopes is None:
        credential = await services.management.update_credential(actor, ref, **fields)
    return await _credential_view(services, credential)


@router.post("/credentials/{ref}/rotate", tags=["credentials"])
async def rotate_credential(
    ref: str, body: CredentialRotate, actor: Admin, services: ServicesDep
) -> CredentialOut:
    """Replace the stored Canvas token, verified with Canvas first unless ``verify`` is false.

    With ``regenerate`` (and no token) Canvas regenerates the stored manual token instead
    (docs/interfaces.md#manual-tokens-with-a-lifecycle); if it refuses, nothing changes.
    """
    warnings: list[str] = []
    credential = await services.management.rotate_credential(
        actor,
        ref,
        token=None if body.token is None else body.token.get_secret_value(),
        verify=body.verify,
        regenerate=body.regenerate,
        warnings=warnings,
    )
    return _credential_out(
        credential, await services.management.upstream_names(), warnings=warnings
    )


@router.post("/credentials/{ref}/disable", tags=["credentials"])
async def disable_credential(ref: str, actor: Admin, services: ServicesDep) -> CredentialOut:
    """Disable a credential: every proxy token minted through it fails at once."""
    credential = await services.management.update_credential(actor, ref, enabled=False)
    return _credential_out(credential, await services.management.upstream_names())


@router.post("/credentials/{ref}/enable", tags=["credentials"])
async def enable_credential(ref: str, actor: Admin, services: ServicesDep) -> CredentialOut:
    """Re-enable a credential."""
    credential = await services.management.update_credential(actor, ref, enabled=True)
    return _credential_out(credential, await services.management.upstream_names())


# Clients ------------------------------------------------------------------------------------


@router.post("/clients", status_code=status.HTTP_201_CREATED, tags=["clients"])
async def create_client(
    body: ClientCreate, actor: Admin, services: ServicesDep
) -> ClientWithSecret:
    """Create a client. The response carries ``client_secret``, shown this once."""
    client, secret = await services.management.create_client(actor, **body.model_dump())
    return ClientWithSecret(
        **_client_out(client).model_dump(),
        client_secret=secret,
        warnings=[
            *scope_warnings(client.scopes),
            *await services.management.key_scope_warnings(client),
        ],
    )


@router.get("/clients", tags=["clients"])
async def list_clients(_: Reader, services: ServicesDep) -> list[ClientOut]:
    """All clients."""
    return [_client_out(c) for c in await services.management.list_clients()]


@router.get("/clients/{ref}", tags=["clients"])
async def get_client(ref: str, _: Reader, services: ServicesDep, request: Request) -> ClientOut:
    """One client by id or name, with its share of its credential's Canvas capacity."""
    client = await services.management.get_client(ref)
    out = _client_out(client)
    canvas: CanvasCapacity = request.app.state.canvas_capacity
    share, remaining = canvas.share(client.credential_id, client.id)
    out.canvas_share = CanvasShareOut(
        weight=client.canvas_weight,
        share=share.share if share is not None else 1.0,
        asking=share.asking if share is not None else False,
        spent_per_second=share.spent_per_second if share is not None else 0.0,
        spent_total=share.spent_total if share is not None else 0.0,
        credential_remaining=None if remaining is None else round(remaining, 3),
    )
    return out


@router.patch("/clients/{ref}", tags=["clients"])
async def update_client(
    ref: str, body: ClientUpdate, actor: Admin, services: ServicesDep
) -> ClientUpdated:
    """Change a client's grant or settings; live tokens follow the new grant at once.

    Fields left out are unchanged (constraints too, when only the scopes change); the
    response's ``changes`` lists what changed, old and new.
    """
    change = await services.management.update_client(
        actor, ref, **body.model_dump(exclude_unset=True)
    )
    return _client_updated(change, await services.management.key_scope_warnings(change.client))


def _client_updated(change: ClientChange, key_warnings: list[str]) -> ClientUpdated:
    return ClientUpdated(
        **_client_out(change.client).model_dump(),
        warnings=[*grant_warnings(change.client), *key_warnings],
        changes=change.changes,
        tokens_revoked=change.tokens_revoked,
    )


@router.post("/clients/{ref}/rotate-secret", tags=["clients"])
async def rotate_client_secret(
    ref: str, body: SecretRotate, actor: Admin, services: ServicesDep
) -> ClientWithSecret:
    """Issue a new client secret (shown once), optionally revoking every live token."""
    client, secret = await services.management.rotate_client_secret(
        actor, ref, revoke_tokens=body.revoke_tokens
    )
    return ClientWithSecret(**_client_out(client).model_dump(), client_secret=secret)


@router.post("/clients/{ref}/disable", tags=["clients"])
async def disable_client(ref: str, actor: Admin, services: ServicesDep) -> ClientUpdated:
    """Disable a client: it cannot mint, and its live tokens are revoked (``tokens_revoked``)."""
    return _client_updated(await services.management.update_client(actor, ref, enabled=False), [])


@router.post("/clients/{ref}/enable", tags=["clients"])
async def enable_client(ref: str, actor: Admin, services: ServicesDep) -> ClientUpdated:
    """Re-enable a client. Tokens minted before it was disabled stay revoked; mint new ones."""
    return _client_updated(await services.management.update_client(actor, ref, enabled=True), [])


@router.post("/clients/{ref}/revoke-tokens", tags=["clients", "tokens"])
async def revoke_client_tokens(ref: str, actor: Admin, services: ServicesDep) -> RevokedCount:
    """Revoke every live token of a client."""
    return RevokedCount(revoked=await services.management.revoke_client_tokens(actor, ref))


@router.post("/clients/{ref}/check", tags=["clients"])
async def check_policy(
    ref: str, body: PolicyCheck, _: Reader, services: ServicesDep
) -> PolicyDecision:
    """Would this call be allowed? Test a vendor's endpoint list before go-live."""
    _client, decision = await services.management.check_policy(ref, body.method, body.path)
    return PolicyDecision(
        allowed=decision.allowed,
        rule=decision.scope if decision.allowed else (decision.reason or "scope_not_granted"),
        scope=decision.scope,
        reason=decision.reason,
        detail=decision.detail,
    )


# Tokens -------------------------------------------------------------------------------------


@router.get("/tokens", tags=["tokens"])
async def list_tokens(
    _: Reader,
    services: ServicesDep,
    client: Annotated[str | None, Query(description="client id or name")] = None,
    include_inactive: bool = False,
) -> list[TokenOut]:
    """Live proxy tokens (ids and metadata, never values)."""
    tokens = await services.management.list_tokens(client=client, include_inactive=include_inactive)
    return [TokenOut.model_validate(t) for t in tokens]


@router.post("/tokens/revoke", tags=["tokens"])
async def revoke_token_value(body: TokenValue, actor: Admin, services: ServicesDep) -> TokenOut:
    """Revoke the proxy token with this value (a leaked one): the value travels in the body."""
    token = await services.management.revoke_token_value(actor, body.token.get_secret_value())
    return TokenOut.model_validate(token)


@router.post("/tokens/{token_id}/revoke", tags=["tokens"])
async def revoke_token(token_id: str, actor: Admin, services: ServicesDep) -> TokenOut:
    """Revoke one proxy token; it fails on its very next use."""
    return TokenOut.model_validate(await services.management.revoke_token(actor, token_id))


# Trusted issuers ----------------------------------------------------------------------------


@router.post("/trusted-issuers", status_code=status.HTTP_201_CREATED, tags=["trusted-issuers"])
async def add_trusted_issuer(body: IssuerCreate, actor: Admin, services: ServicesDep) -> IssuerOut:
    """Put a workload identity issuer on the allowlist trust policies may name (admins only).

    Unless ``verify`` is false its discovery document and keys are fetched first; an issuer
    that does not answer is a 422 and nothing is saved.
    """
    entry = await services.management.add_issuer(
        actor, issuer=body.issuer, description=body.description, verify=body.verify
    )
    return IssuerOut.model_validate(entry)


@router.get("/trusted-issuers", tags=["trusted-issuers"])
async def list_trusted_issuers(_: Reader, services: ServicesDep) -> list[IssuerOut]:
    """The issuers whose workload identity tokens trust policies may accept."""
    return [IssuerOut.model_validate(e) for e in await services.management.list_issuers()]


@router.post("/trusted-issuers/{ref}/remove", tags=["trusted-issuers"])
async def remove_trusted_issuer(ref: str, actor: Admin, services: ServicesDep) -> IssuerRemoved:
    """Take an issuer (by id or URL) off the allowlist: its tokens are refused at once."""
    entry, affected = await services.management.remove_issuer(actor, ref)
    return IssuerRemoved(**IssuerOut.model_validate(entry).model_dump(), clients=affected)


# Admin keys ---------------------------------------------------------------------------------


@router.post("/admin-keys", status_code=status.HTTP_201_CREATED, tags=["admin-keys"])
async def create_admin_key(
    body: AdminKeyCreate, actor: Admin, services: ServicesDep
) -> AdminKeyCreated:
    """Create a management key; ``key`` is shown this once."""
    key, value = await services.management.create_admin_key(actor, name=body.name, role=body.role)
    return AdminKeyCreated(**AdminKeyOut.model_validate(key).model_dump(), key=value)


@router.get("/admin-keys", tags=["admin-keys"])
async def list_admin_keys(_: Reader, services: ServicesDep) -> list[AdminKeyOut]:
    """All management keys (never their values)."""
    return [AdminKeyOut.model_validate(k) for k in await services.management.list_admin_keys()]


@router.post("/admin-keys/{key_id}/revoke", tags=["admin-keys"])
async def revoke_admin_key(key_id: str, actor: Admin, services: ServicesDep) -> AdminKeyOut:
    """Revoke a management key."""
    return AdminKeyOut.model_validate(await services.management.revoke_admin_key(actor, key_id))
