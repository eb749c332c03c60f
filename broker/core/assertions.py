"""``private_key_jwt`` client assertions (RFC 7523 §2.2 and §3, OpenID Connect Core §9).

A script host signs a short JWT with its own private key; the broker holds only the public
key set, so no shared secret lives on the host. Checked here, without I/O: the signature
against the client's registered keys (asymmetric algorithms only), ``iss`` and ``sub`` equal to
the client id, ``aud`` naming this broker, an ``exp`` in the near future (which bounds how long
a ``jti`` must be remembered) and a ``jti``. Remembering used ``jti`` values (replay) is the
caller's job, because it needs storage shared by every replica.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from broker.errors import InvalidAssertionError, InvalidKeySetError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from joserfc.jwk import KeySetSerialization

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Asymmetric only: a symmetric (HS*) assertion would need the broker to hold the signing key.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
MAX_LIFETIME = 300
LEEWAY = 30
MIN_RSA_BITS = 2048
_PUBLIC_MEMBERS = {
    "RSA": ("kty", "n", "e", "kid", "alg", "use"),
    "EC": ("kty", "crv", "x", "y", "kid", "alg", "use"),
}
_CURVES = {"EC": {"P-256", "P-384", "P-521"}}
_PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


@dataclass(frozen=True, slots=True)
class VerifiedAssertion:
    """What a valid assertion proves: who signed it, and the id and expiry to remember."""

    client_id: str
    jti: str
    expires_at: int


def public_key_set(value: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Validate a JWK Set for registration and return it with public members only.

    Refuses private or symmetric keys (the broker must never hold a signing key), weak RSA
    keys, unknown curves and sets that do not parse.
    """
    keys = value.get("keys") if isinstance(value, dict) else None
    if not isinstance(keys, list) or not keys:
        raise InvalidKeySetError('must be a JWK Set: {"keys": [ ...public keys... ]}')
    public: list[dict[str, Any]] = []
    for index, key in enumerate(keys):
        if not isinstance(key, dict):
            raise InvalidKeySetError(f"key {index} is not a JSON object")
        kty = key.get("kty")
        if kty not in _PUBLIC_MEMBERS:
            raise InvalidKeySetError(f"key {index}: kty must be RSA or EC (public keys)")
        if _PRIVATE_MEMBERS & set(key):
            raise InvalidKeySetError(
                f"key {index} contains private key material; send the public key"
            )
        if kty in _CURVES and key.get("crv") not in _CURVES[kty]:
            raise InvalidKeySetError(f"key {index}: unsupported curve {key.get('crv')!r}")
        if kty == "RSA" and rsa_bits(key.get("n")) < MIN_RSA_BITS:
            raise InvalidKeySetError(f"key {index}: RSA keys need at least {MIN_RSA_BITS} bits")
        public.append({m: key[m] for m in _PUBLIC_MEMBERS[kty] if m in key})
    try:
        KeySet.import_key_set({"keys": public})
    except (JoseError, ValueError, TypeError) as exc:
        raise InvalidKeySetError(f"the key set does not parse: {exc}") from exc
    return {"keys": public}


def rsa_bits(modulus: object) -> int:
    """Bit length of a JWK's base64url modulus (0 if unreadable), checked before importing."""
    if not isinstance(modulus, str):
        return 0
    try:
        raw = base64.urlsafe_b64decode(modulus + "=" * (-len(modulus) % 4))
    except ValueError:
        return 0
    return int.from_bytes(raw, "big").bit_length()


def claimed_issuer(assertion: str) -> str:
    """The unverified ``iss`` of an assertion: which client's keys to verify it with."""
    try:
        claims = json.loads(jws.extract_compact(assertion.encode()).payload)
    except (JoseError, ValueError, UnicodeError) as exc:
        raise InvalidAssertionError("client_assertion is not a signed JWT") from exc
    issuer = claims.get("iss") if isinstance(claims, dict) else None
    if not isinstance(issuer, str) or not issuer:
        raise InvalidAssertionError("client_assertion has no iss claim")
    return issuer


def verify_assertion(
    assertion: str,
    key_set: Mapping[str, Any],
    *,
    client_id: str,
    audiences: Sequence[str],
    now: int,
) -> VerifiedAssertion:
    """Verify ``assertion`` for ``client_id``; raise ``InvalidAssertionError`` saying why."""
    try:
        keys = KeySet.import_key_set(cast("KeySetSerialization", dict(key_set)))
        token = jwt.decode(assertion, keys, algorithms=list(ALGORITHMS))
    except (JoseError, ValueError, TypeError) as exc:
        raise InvalidAssertionError("client_assertion signature does not verify") from exc
    claims = token.claims
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        raise InvalidAssertionError("iss and sub must both be the client_id")
    audience = claims.get("aud")
    named = [audience] if isinstance(audience, str) else audience
    if not isinstance(named, list) or not set(named) & set(audiences):
        raise InvalidAssertionError(f"aud must name this broker: {audiences[0]}")
    expires = claims.get("exp")
    if not isinstance(expires, int) or isinstance(expires, bool):
        raise InvalidAssertionError("exp is required")
    if expires + LEEWAY < now:
        raise InvalidAssertionError("the assertion has expired")
    if expires > now + MAX_LIFETIME + LEEWAY:
        raise InvalidAssertionError(f"exp may be at most {MAX_LIFETIME} seconds ahead")
    not_before = claims.get("nbf")
    if isinstance(not_before, int) and not_before > now + LEEWAY:
        raise InvalidAssertionError("the assertion is not valid yet")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= 200:  # noqa: PLR2004
        raise InvalidAssertionError("jti is required (at most 200 characters)")
    return VerifiedAssertion(client_id=client_id, jti=jti, expires_at=expires)
