"""private_key_jwt assertion checks (RFC 7523), without I/O."""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey

from broker.core.assertions import MAX_LIFETIME, claimed_issuer, public_key_set, verify_assertion
from broker.errors import InvalidAssertionError, InvalidKeySetError

if TYPE_CHECKING:
    from collections.abc import Callable

AUDIENCE = "https://broker.example.edu/broker/v1/oauth/token"
CLIENT = "cli_abc"
NOW = int(time.time())


def _claims(**overrides: Any) -> dict[str, Any]:
    claims = {"iss": CLIENT, "sub": CLIENT, "aud": AUDIENCE, "exp": NOW + 60, "jti": "j-1"}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(key: Any, alg: str = "ES256", **overrides: Any) -> str:
    return jwt.encode({"alg": alg}, _claims(**overrides), key, algorithms=[alg])


@pytest.fixture
def ec_key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "k1"})


def _verify(assertion: str, key: Any) -> Any:
    keys = public_key_set({"keys": [key.as_dict(private=False)]})
    return verify_assertion(assertion, keys, client_id=CLIENT, audiences=[AUDIENCE], now=NOW)


KEYS: dict[str, Callable[[], Any]] = {
    "ES256": lambda: ECKey.generate_key("P-256"),
    "RS256": lambda: RSAKey.generate_key(2048),
    "PS256": lambda: RSAKey.generate_key(2048),
}


def _b64(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _weak_rsa_public_key() -> dict[str, Any]:
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()  # noqa: S505 - the weak key under test
    public = numbers.public_numbers()
    return {"kty": "RSA", "n": _b64(public.n), "e": _b64(public.e)}


@pytest.mark.parametrize("alg", list(KEYS))
def test_assertion_signed_by_a_registered_key_verifies(alg: str) -> None:
    key = KEYS[alg]()
    verified = _verify(_sign(key, alg), key)
    assert (verified.client_id, verified.jti, verified.expires_at) == (CLIENT, "j-1", NOW + 60)


def test_assertion_signed_by_another_key_is_refused(ec_key: ECKey) -> None:
    other = ECKey.generate_key("P-256")
    with pytest.raises(InvalidAssertionError, match="signature"):
        _verify(_sign(other), ec_key)


def test_symmetric_hs256_assertion_is_refused(ec_key: ECKey) -> None:
    forged = jwt.encode({"alg": "HS256"}, _claims(), OctKey.generate_key(256))
    with pytest.raises(InvalidAssertionError):
        _verify(forged, ec_key)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"iss": "cli_other"}, "iss and sub"),
        ({"sub": "cli_other"}, "iss and sub"),
        ({"aud": "https://evil.example/token"}, "aud"),
        ({"aud": None}, "aud"),
        ({"exp": None}, "exp is required"),
        ({"exp": NOW - 3600}, "expired"),
        ({"exp": NOW + MAX_LIFETIME + 3600}, "at most"),
        ({"nbf": NOW + 3600}, "not valid yet"),
        ({"jti": None}, "jti"),
        ({"jti": ""}, "jti"),
    ],
)
def test_assertion_with_bad_claims_is_refused(
    ec_key: ECKey, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidAssertionError, match=message):
        _verify(_sign(ec_key, **overrides), ec_key)


def test_audience_may_be_a_list_naming_the_broker(ec_key: ECKey) -> None:
    assert _verify(_sign(ec_key, aud=["other", AUDIENCE]), ec_key).jti == "j-1"


def test_claimed_issuer_is_read_without_verifying(ec_key: ECKey) -> None:
    assert claimed_issuer(_sign(ec_key)) == CLIENT


@pytest.mark.parametrize("value", ["", "garbage", "a.b.c", "e30.e30.sig"])
def test_claimed_issuer_of_garbage_is_refused(value: str) -> None:
    with pytest.raises(InvalidAssertionError):
        claimed_issuer(value)


def test_key_set_keeps_public_members_only(ec_key: ECKey) -> None:
    public = ec_key.as_dict(private=False)
    registered = public_key_set({"keys": [{**public, "use": "sig", "x5c": ["ignored"]}]})
    assert registered == {"keys": [{**public, "use": "sig"}]}


@pytest.mark.parametrize(
    ("key_set", "message"),
    [
        (dict, "JWK Set"),
        (lambda: {"keys": []}, "JWK Set"),
        (lambda: {"keys": ["x"]}, "not a JSON object"),
        (lambda: {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "kty"),
        (lambda: {"keys": [ECKey.generate_key("P-256").as_dict(private=True)]}, "private key"),
        (lambda: {"keys": [_weak_rsa_public_key()]}, "2048"),
        (lambda: {"keys": [{"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}]}, "curve"),
        (lambda: {"keys": [OKPKey.generate_key("Ed25519").as_dict(private=False)]}, "kty"),
        (lambda: {"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}, "not parse"),
    ],
)
def test_unusable_key_sets_are_refused_naming_the_problem(
    key_set: Callable[[], dict[str, Any]], message: str
) -> None:
    with pytest.raises(InvalidKeySetError, match=message):
        public_key_set(key_set())
