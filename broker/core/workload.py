"""Workload identity: trust policies and the platform tokens they accept (no I/O).

A CI job or a Kubernetes pod already holds a short-lived token its platform signed (an OIDC
ID token from GitHub Actions or GitLab CI, a projected service-account token). A client's
trust policies say which of those tokens may stand in for a client secret: the issuer, the
audience the token must name, and rules on its claims (docs/grants.md#trust-policies).

Checked here: a policy when it is saved (``check_policies``), and a presented token against
the issuer's published keys and the client's policies (``verify_subject_token``). Fetching
the keys (``services.issuer_keys``) and remembering used ``jti`` values (storage shared by
every replica) are the callers' jobs.

Errors: ``PolicyError`` (a policy that cannot be saved) and ``SubjectTokenError`` (a token
refused; its ``reason`` is the audit reason, its message names the rule that failed).
"""

from __future__ import annotations

import base64
import json
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from joserfc import jwt
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import KeySet

from broker.core.assertions import MIN_RSA_BITS, rsa_bits

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from joserfc.jwk import KeySetSerialization

# Grant and token type names (RFC 8693 §2.1 and §3, RFC 7523 §2.1), not secrets.
TOKEN_EXCHANGE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
JWT_BEARER: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_TYPE_JWT: Final = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
TOKEN_TYPE_ID_TOKEN: Final = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105
TOKEN_TYPE_ACCESS_TOKEN: Final = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
SUBJECT_TOKEN_TYPES: Final = (TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN)

# Asymmetric signatures only: an HS* token would be verified with a secret the issuer shares
# with everyone who verifies, and "none" is no signature at all.
ALGORITHMS: Final = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "Ed25519",
    "EdDSA",
)
_KEY_TYPES: Final = frozenset({"RSA", "EC", "OKP"})
LEEWAY: Final = 30  # seconds of clock skew allowed on nbf and iat
MAX_POLICIES: Final = 20
MAX_RULES: Final = 20
MAX_PATTERN: Final = 500
MAX_VALUE: Final = 500
MAX_JTI: Final = 500
MAX_TOKEN_BYTES: Final = 16 * 1024

IDENTITY_CLAIMS: Final = (
    "sub",
    "repository",
    "repository_id",
    "project_path",
    "project_id",
    "kubernetes.io/serviceaccount/name",
    "kubernetes.io/serviceaccount/uid",
)
"""Claims that name one workload; a policy must pin one of them (docs/grants.md)."""

# Values no trust rule should accept: a pattern matching one of them would let in whoever
# can obtain a token from the issuer (any repository, any namespace). A pattern is refused
# when it matches the empty string or any of these (docs/grants.md#trust-policies).
MATCH_EVERYTHING_PROBES: Final = (
    "",
    "\u2603",
    "repo:attacker-org/evil:ref:refs/heads/main",
    "repo:attacker-org/evil:environment:production",
    "project_path:attacker-group/evil:ref_type:branch:ref:main",
    "system:serviceaccount:attacker:evil",
    "attacker-org/evil",
)
_CLAIM_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}(/[A-Za-z0-9_.:-]{1,100}){0,4}")
# The start of a pattern that pins nothing: a wildcard, class, group, alternation or escape.
_OPEN_START = frozenset(".[(|\\^$*+?{")


class PolicyError(ValueError):
    """A trust policy that cannot be saved; ``field`` says where, the message why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class SubjectTokenError(ValueError):
    """A platform token refused: ``reason`` for the audit log, the message for the caller."""

    def __init__(self, reason: str, message: str, **details: Any) -> None:  # noqa: ANN401
        super().__init__(message)
        self.reason = reason
        self.details = details


@dataclass(frozen=True, slots=True)
class ClaimRule:
    """One claim's rule: an exact value, or a pattern the whole value must match."""

    claim: str
    equals: str | None = None
    pattern: str | None = None

    def accepts(self, value: str) -> bool:
        """Whether ``value`` satisfies the rule (patterns by ``re.fullmatch``, never prefix)."""
        if self.equals is not None:
            return value == self.equals
        assert self.pattern is not None  # noqa: S101 - one of the two, by construction
        return re.fullmatch(self.pattern, value) is not None

    def describe(self) -> str:
        """The rule as a refusal names it."""
        if self.equals is not None:
            return f"{self.claim} == {self.equals!r}"
        return f"{self.claim} matches {self.pattern!r}"


@dataclass(frozen=True, slots=True)
class TrustPolicy:
    """A trusted workload identity: the issuer, the audience, the claim rules."""

    issuer: str
    audience: str
    rules: tuple[ClaimRule, ...]

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> TrustPolicy:
        """A policy as ``check_policies`` stored it."""
        rules = []
        for claim, rule in value["claims"].items():
            if isinstance(rule, str):
                rules.append(ClaimRule(claim, equals=rule))
            else:
                rules.append(ClaimRule(claim, pattern=rule["pattern"]))
        return cls(issuer=value["issuer"], audience=value["audience"], rules=tuple(rules))


@dataclass(frozen=True, slots=True)
class VerifiedSubject:
    """A platform token that satisfied a policy: what to audit and what bounds the token."""

    issuer: str
    subject: str | None
    policy_index: int
    matched: dict[str, str]
    jti: str | None
    expires_at: int


def check_issuer_url(url: object, *, allow_loopback_http: bool) -> str:
    """An issuer URL as ``iss`` names it: https (http only to loopback, when allowed).

    OpenID Connect Discovery §4.3: the issuer in the discovery document and in every token
    must equal the configured one exactly, so it is stored as given (no trailing slash
    added or removed).
    """
    if not isinstance(url, str) or not url or len(url) > MAX_VALUE:
        raise PolicyError("issuer", f"must be a URL of at most {MAX_VALUE} characters")
    parts = urlsplit(url)
    if parts.query or parts.fragment or parts.username or parts.password or not parts.hostname:
        raise PolicyError("issuer", "must be an https URL without query, fragment or user")
    if parts.scheme == "https":
        return url
    loopback = parts.hostname in {"127.0.0.1", "::1", "localhost"}
    if parts.scheme == "http" and loopback and allow_loopback_http:
        return url
    hint = (
        " (plain http is allowed only to a loopback address, with "
        "BROKER_WORKLOAD_ALLOW_LOOPBACK_HTTP=true)"
        if parts.scheme == "http"
        else ""
    )
    raise PolicyError("issuer", f"must be an https URL{hint}")


def check_pattern(claim: str, pattern: object) -> str:
    """A claim pattern that compiles, is bounded and does not match everything."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN:
        raise PolicyError(
            f"claims.{claim}", f"a pattern is a string of 1 to {MAX_PATTERN} characters"
        )
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise PolicyError(f"claims.{claim}", f"pattern does not compile: {exc}") from exc
    for probe in MATCH_EVERYTHING_PROBES:
        if compiled.fullmatch(probe) is not None:
            shown = "the empty string" if not probe else repr(probe)
            raise PolicyError(
                f"claims.{claim}",
                f"pattern {pattern!r} matches {shown}: it would accept almost anyone "
                "the issuer signs for; name the repository, project or service account",
            )
    return pattern


def check_policies(value: object, *, allow_loopback_http: bool) -> list[dict[str, Any]]:
    """Validate trust policies for saving; return them as stored (JSON).

    Each policy: ``issuer`` (https), ``audience`` (what the token's ``aud`` must name) and
    ``claims``: ``{name: "exact value"}`` or ``{name: {"pattern": "regex"}}``. Patterns match
    the whole value. A policy must pin an identity claim (``IDENTITY_CLAIMS``) with an exact
    value or a pattern that starts with a plain character.
    """
    if not isinstance(value, list):
        raise PolicyError("trust_policies", "must be a list of policies")
    if len(value) > MAX_POLICIES:
        raise PolicyError("trust_policies", f"at most {MAX_POLICIES} policies per client")
    stored = []
    seen: set[str] = set()
    for index, policy in enumerate(value):
        checked = _check_policy(index, policy, allow_loopback_http=allow_loopback_http)
        key = json.dumps(checked, sort_keys=True)
        if key in seen:
            raise PolicyError(f"trust_policies[{index}]", "repeats an earlier policy")
        seen.add(key)
        stored.append(checked)
    return stored


def _check_policy(index: int, policy: object, *, allow_loopback_http: bool) -> dict[str, Any]:
    where = f"trust_policies[{index}]"
    if not isinstance(policy, dict):
        raise PolicyError(where, "must be an object with issuer, audience and claims")
    unknown = set(policy) - {"issuer", "audience", "claims"}
    if unknown:
        raise PolicyError(where, f"unknown fields: {', '.join(sorted(unknown))}")
    try:
        issuer = check_issuer_url(policy.get("issuer"), allow_loopback_http=allow_loopback_http)
    except PolicyError as exc:
        raise PolicyError(f"{where}.issuer", str(exc)) from exc
    audience = policy.get("audience")
    if not isinstance(audience, str) or not audience.strip() or len(audience) > MAX_VALUE:
        raise PolicyError(
            f"{where}.audience",
            "required: the audience the platform token must name (the broker's URL, "
            "as the job requests its token)",
        )
    return {"issuer": issuer, "audience": audience, "claims": _check_claims(where, policy)}


def _check_claims(where: str, policy: dict[str, Any]) -> dict[str, Any]:
    claims = policy.get("claims")
    if not isinstance(claims, dict) or not claims:
        raise PolicyError(f"{where}.claims", "required: rules on the token's claims")
    if len(claims) > MAX_RULES:
        raise PolicyError(f"{where}.claims", f"at most {MAX_RULES} claim rules per policy")
    rules: dict[str, Any] = {}
    for claim, rule in claims.items():
        if not isinstance(claim, str) or _CLAIM_NAME.fullmatch(claim) is None:
            raise PolicyError(
                f"{where}.claims",
                f"{claim!r} is not a claim name (nested claims as 'kubernetes.io/namespace')",
            )
        if claim in {"iss", "aud", "exp", "nbf", "iat", "jti"}:
            raise PolicyError(
                f"{where}.claims.{claim}", "is checked by the broker itself; not a rule"
            )
        rules[claim] = _check_rule(f"{where}.claims", claim, rule)
    pins = [c for c in IDENTITY_CLAIMS if c in rules and _pins(rules[c])]
    if not pins:
        raise PolicyError(
            f"{where}.claims",
            "must pin the workload's identity: an exact value, or a pattern starting with a "
            f"plain character, for one of {', '.join(IDENTITY_CLAIMS)}",
        )
    return rules


def _check_rule(where: str, claim: str, rule: object) -> str | dict[str, str]:
    if isinstance(rule, str):
        if not rule or len(rule) > MAX_VALUE:
            raise PolicyError(f"{where}.{claim}", f"a value has 1 to {MAX_VALUE} characters")
        return rule
    if isinstance(rule, dict) and set(rule) == {"pattern"}:
        try:
            return {"pattern": check_pattern(claim, rule["pattern"])}
        except PolicyError as exc:
            raise PolicyError(f"{where}.{claim}", str(exc)) from exc
    raise PolicyError(
        f"{where}.{claim}", 'a rule is an exact value or {"pattern": "regular expression"}'
    )


def _pins(rule: str | dict[str, str]) -> bool:
    return isinstance(rule, str) or rule["pattern"][0] not in _OPEN_START


def issuers_of(policies: Iterable[Mapping[str, Any]]) -> list[str]:
    """The distinct issuers policies name, in order."""
    return list(dict.fromkeys(str(p["issuer"]) for p in policies))


@dataclass(frozen=True, slots=True)
class UnverifiedToken:
    """What a platform token says about itself before its signature is checked."""

    issuer: str
    kid: str | None
    alg: str


def read_unverified(token: str) -> UnverifiedToken:
    """The issuer, key id and algorithm a compact JWS names (which keys to verify it with)."""
    if len(token) > MAX_TOKEN_BYTES:
        raise SubjectTokenError("invalid_subject_token", "the subject token is too large")
    parts = token.split(".")
    if len(parts) != 3:  # noqa: PLR2004 - header.payload.signature
        raise SubjectTokenError("invalid_subject_token", "the subject token is not a signed JWT")
    try:
        header = json.loads(_b64(parts[0]))
        claims = json.loads(_b64(parts[1]))
    except (ValueError, UnicodeError) as exc:
        raise SubjectTokenError(
            "invalid_subject_token", "the subject token is not a signed JWT"
        ) from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise SubjectTokenError("invalid_subject_token", "the subject token is not a signed JWT")
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise SubjectTokenError(
            "invalid_subject_token",
            f"the subject token's alg {alg!r} is not accepted (asymmetric signatures only: "
            f"{', '.join(ALGORITHMS)})",
        )
    if "crit" in header:
        # RFC 7515 §4.1.11: extensions the broker does not understand must be refused.
        raise SubjectTokenError("invalid_subject_token", "the subject token has a crit header")
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not issuer:
        raise SubjectTokenError("invalid_subject_token", "the subject token has no iss claim")
    kid = header.get("kid")
    return UnverifiedToken(issuer=issuer, kid=kid if isinstance(kid, str) else None, alg=alg)


def _b64(segment: str) -> str:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)).decode()


def signing_key_set(jwks: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The usable public signing keys of an issuer's JWKS (others are dropped, not fatal)."""
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list):
        raise TypeError("the JWKS has no keys list")
    usable = []
    for key in keys:
        if not isinstance(key, dict) or key.get("kty") not in _KEY_TYPES:
            continue
        if key.get("use", "sig") != "sig" or {"d", "k"} & set(key):
            continue
        if key["kty"] == "RSA" and rsa_bits(key.get("n")) < MIN_RSA_BITS:
            continue  # a weak key an attacker might factor: never trusted
        usable.append(key)
    return {"keys": usable}


def has_key(jwks: Mapping[str, Any], kid: str | None) -> bool:
    """Whether the key set holds the key a token names (any key when it names none)."""
    keys = jwks.get("keys", [])
    if kid is None:
        return bool(keys)
    return any(key.get("kid") == kid for key in keys)


def verify_subject_token(
    token: str,
    jwks: Mapping[str, Any],
    policies: Sequence[tuple[int, TrustPolicy]],
    *,
    now: int,
) -> VerifiedSubject:
    """Verify a platform token with its issuer's keys and against the client's policies.

    ``policies`` are the client's policies for the token's issuer, with their positions. The
    first policy whose audience and every rule the token satisfies wins; otherwise the error
    names, for each policy, the first rule that failed.
    """
    unverified = read_unverified(token)
    claims = _verified_claims(token, jwks, unverified)
    if claims.get("iss") != unverified.issuer:
        raise SubjectTokenError("invalid_subject_token", "the subject token's iss changed")
    expires = claims.get("exp")
    if not isinstance(expires, int) or isinstance(expires, bool):
        raise SubjectTokenError("invalid_subject_token", "the subject token has no exp claim")
    # No leeway here: the proxy token may not outlive the platform token.
    if expires <= now:
        raise SubjectTokenError("subject_token_expired", "the subject token has expired")
    for name in ("nbf", "iat"):
        moment = claims.get(name)
        if isinstance(moment, int | float) and moment > now + LEEWAY:
            raise SubjectTokenError(
                "invalid_subject_token", f"the subject token is not valid yet ({name})"
            )
    jti = claims.get("jti")
    if jti is not None and (not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI):
        raise SubjectTokenError("invalid_subject_token", "the subject token's jti is malformed")
    failures = []
    for index, policy in policies:
        failure, matched = _evaluate(policy, claims)
        if failure is None:
            subject = claims.get("sub")
            return VerifiedSubject(
                issuer=unverified.issuer,
                subject=subject if isinstance(subject, str) else None,
                policy_index=index,
                matched=matched,
                jti=jti,
                expires_at=expires,
            )
        failures.append((index, *failure))
    reason = "audience_mismatch" if all(f[1] == "aud" for f in failures) else "claim_mismatch"
    message = "; ".join(f"trust policy {i}: {text}" for i, _claim, text in failures)
    raise SubjectTokenError(
        reason,
        f"the subject token satisfies no trust policy of this client ({message})",
        failed=[{"policy": i, "rule": claim} for i, claim, _text in failures],
    )


def _verified_claims(
    token: str, jwks: Mapping[str, Any], unverified: UnverifiedToken
) -> dict[str, Any]:
    candidates = [
        key
        for key in jwks.get("keys", [])
        if (unverified.kid is None or key.get("kid") == unverified.kid)
        and key.get("alg", unverified.alg) == unverified.alg
    ]
    if not candidates:
        raise SubjectTokenError(
            "invalid_subject_token",
            f"the issuer publishes no key {unverified.kid!r} for {unverified.alg}",
        )
    last: Exception | None = None
    for key in candidates:
        try:
            keys = KeySet.import_key_set(cast_keys(key))
            with warnings.catch_warnings():
                # joserfc flags the name "EdDSA" as superseded by "Ed25519" (RFC 9864);
                # issuers still sign with it, and the signature check is the same.
                warnings.simplefilter("ignore", SecurityWarning)
                decoded = jwt.decode(token, keys, algorithms=[unverified.alg])
        except (JoseError, ValueError, TypeError) as exc:
            last = exc
            continue
        return dict(decoded.claims)
    raise SubjectTokenError(
        "invalid_subject_token", "the subject token's signature does not verify"
    ) from last


def cast_keys(key: Mapping[str, Any]) -> KeySetSerialization:
    """A one-key set, typed for joserfc."""
    return {"keys": [dict(key)]}


def _evaluate(
    policy: TrustPolicy, claims: Mapping[str, Any]
) -> tuple[tuple[str, str] | None, dict[str, str]]:
    """``(None, matched claims)``, or ``((rule's claim, why), {})`` for the first failure."""
    audience = claims.get("aud")
    named = [audience] if isinstance(audience, str) else audience
    if not isinstance(named, list) or policy.audience not in named:
        return ("aud", f"aud does not name {policy.audience!r}"), {}
    matched: dict[str, str] = {}
    for rule in policy.rules:
        value = claim_value(claims, rule.claim)
        if not isinstance(value, str):
            return (rule.claim, f"the token has no string claim {rule.claim!r}"), {}
        if len(value) > MAX_VALUE * 4 or not rule.accepts(value):
            shown = value if len(value) <= MAX_VALUE else value[:MAX_VALUE] + "…"
            return (rule.claim, f"{rule.claim} is {shown!r}, the rule is {rule.describe()}"), {}
        matched[rule.claim] = value
    return None, matched


def claim_value(claims: Mapping[str, Any], path: str) -> object:
    """A claim by name; ``a/b`` reads member ``b`` of object claim ``a`` (Kubernetes)."""
    value: object = claims
    for part in path.split("/"):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
