"""An OpenID Connect issuer the tests run themselves, on a loopback port.

It serves a discovery document and a JWKS as GitHub Actions, GitLab or a Kubernetes API
server do, signs tokens with its current keys, rotates them on request, and counts what it
was asked, so tests can check the broker's caching. It is a test double of the *protocol*
(OpenID Connect Discovery 1.0 §4, RFC 7517), not of any one platform's claims.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.serving import BackgroundServer

if TYPE_CHECKING:
    from joserfc.jwk import KeyParameters
    from starlette.requests import Request

Key = RSAKey | ECKey | OKPKey
ALGORITHM = {"RSA": "RS256", "EC": "ES256", "OKP": "Ed25519"}


@dataclass
class IssuerState:
    """What the issuer publishes and what it was asked."""

    keys: list[Key] = field(default_factory=list)
    cache_control: str | None = "max-age=300"
    failing: bool = False
    discovery_requests: int = 0
    jwks_requests: int = 0
    issuer_override: str | None = None


def new_key(kind: str = "EC", kid: str | None = None) -> Key:
    """A fresh signing key with a key id."""
    parameters: KeyParameters = {"kid": kid or secrets.token_hex(6)}
    if kind == "RSA":
        return RSAKey.generate_key(2048, parameters=parameters)
    if kind == "OKP":
        return OKPKey.generate_key("Ed25519", parameters=parameters)
    return ECKey.generate_key("P-256", parameters=parameters)


class OIDCIssuer(BackgroundServer):
    """The issuer under uvicorn in a background thread; ``url`` is its issuer URL."""

    def __init__(self) -> None:
        self.state = IssuerState(keys=[new_key()])
        super().__init__(
            Starlette(
                routes=[
                    Route("/.well-known/openid-configuration", self._discovery),
                    Route("/keys", self._jwks),
                ]
            ),
            lifespan="off",
            name="oidc-issuer",
        )

    @property
    def url(self) -> str:
        """The issuer URL (``iss``)."""
        return self.base_url

    def reset(self) -> None:
        """One fresh key, normal caching, counters at zero."""
        self.state = IssuerState(keys=[new_key()])

    def rotate(self, kind: str = "EC") -> Key:
        """Replace the published keys by a new one, which signs from now on."""
        key = new_key(kind)
        self.state.keys = [key]
        return key

    async def _discovery(self, request: Request) -> Response:
        self.state.discovery_requests += 1
        if self.state.failing:
            return JSONResponse({"error": "down"}, status_code=503)
        base = str(request.base_url).rstrip("/")
        return JSONResponse(
            {
                "issuer": self.state.issuer_override or base,
                "jwks_uri": f"{base}/keys",
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            }
        )

    async def _jwks(self, _request: Request) -> Response:
        self.state.jwks_requests += 1
        if self.state.failing:
            return JSONResponse({"error": "down"}, status_code=503)
        headers = (
            {} if self.state.cache_control is None else {"Cache-Control": self.state.cache_control}
        )
        return JSONResponse(
            {"keys": [key.as_dict(private=False) for key in self.state.keys]}, headers=headers
        )

    def sign(
        self,
        claims: dict[str, Any],
        *,
        key: Key | None = None,
        header: dict[str, Any] | None = None,
        lifetime: int = 300,
    ) -> str:
        """A token from this issuer: ``iss``, ``iat``, ``exp``, ``jti`` filled in unless given."""
        signer = key or self.state.keys[0]
        now = int(time.time())
        body = {
            "iss": self.url,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": secrets.token_hex(12),
            **claims,
        }
        alg = ALGORITHM[signer.key_type]
        protected = {"alg": alg, "kid": signer.kid, "typ": "JWT", **(header or {})}
        return jwt.encode(
            protected, {k: v for k, v in body.items() if v is not None}, signer, algorithms=[alg]
        )


def github_claims(
    repository: str = "example-org/canvas-sync", ref: str = "refs/heads/main", **extra: Any
) -> dict[str, Any]:
    """Claims shaped as a GitHub Actions ID token's."""
    return {
        "sub": f"repo:{repository}:ref:{ref}",
        "repository": repository,
        "repository_owner": repository.split("/", maxsplit=1)[0],
        "ref": ref,
        "ref_type": "branch",
        "workflow": "sync",
        "event_name": "schedule",
        **extra,
    }
