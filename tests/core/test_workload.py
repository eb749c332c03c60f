"""Trust policy checks and claim matching (broker/core/workload.py), without I/O."""

from __future__ import annotations

import base64

import pytest
from joserfc.jwk import RSAKey

from broker.core.workload import (
    ClaimRule,
    PolicyError,
    check_issuer_url,
    check_policies,
    claim_value,
    signing_key_set,
)
from broker.services.issuer_keys import DEFAULT_FRESH, MAX_FRESH, MIN_FRESH, freshness

GITHUB = "https://token.actions.githubusercontent.com"


def _policy(**claims: object) -> list[dict[str, object]]:
    return [{"issuer": GITHUB, "audience": "https://broker.example.edu", "claims": claims}]


def test_a_pattern_matches_the_whole_value_never_a_prefix() -> None:
    rule = ClaimRule("repository", pattern="org/repo")
    assert rule.accepts("org/repo")
    assert not rule.accepts("org/repo-evil")
    assert not rule.accepts("evil/org/repo")
    assert not rule.accepts("org/repo\n")


def test_an_exact_rule_is_equality() -> None:
    rule = ClaimRule("sub", equals="repo:org/repo:ref:refs/heads/main")
    assert rule.accepts("repo:org/repo:ref:refs/heads/main")
    assert not rule.accepts("repo:org/repo:ref:refs/heads/main2")


@pytest.mark.parametrize(
    "pattern", [".*", ".+", "(?s).*", "[\\s\\S]*", "repo:.*", "x*", "(a|.+)", ".{0,500}"]
)
def test_patterns_that_match_everything_are_refused(pattern: str) -> None:
    with pytest.raises(PolicyError, match="would accept almost anyone"):
        check_policies(_policy(sub={"pattern": pattern}), allow_loopback_http=False)


def test_a_narrow_pattern_is_kept() -> None:
    [saved] = check_policies(
        _policy(sub={"pattern": "repo:org/repo:ref:refs/heads/(main|release/[0-9.]+)"}),
        allow_loopback_http=False,
    )
    assert saved["claims"]["sub"] == {
        "pattern": "repo:org/repo:ref:refs/heads/(main|release/[0-9.]+)"
    }


def test_a_policy_must_pin_an_identity_claim() -> None:
    with pytest.raises(PolicyError, match="must pin the workload's identity"):
        check_policies(_policy(ref="refs/heads/main"), allow_loopback_http=False)
    with pytest.raises(PolicyError, match="must pin the workload's identity"):
        check_policies(
            _policy(sub={"pattern": "(repo):org/x:ref:refs/heads/main"}), allow_loopback_http=False
        )


@pytest.mark.parametrize(
    ("url", "loopback", "ok"),
    [
        (GITHUB, False, True),
        ("http://token.actions.githubusercontent.com", True, False),
        ("http://127.0.0.1:8080", False, False),
        ("http://127.0.0.1:8080", True, True),
        ("https://user:pw@issuer.example", False, False),
        ("https://issuer.example/?x=1", False, False),
        ("issuer.example", False, False),
    ],
)
def test_issuer_urls(url: str, loopback: bool, ok: bool) -> None:
    if ok:
        assert check_issuer_url(url, allow_loopback_http=loopback) == url
    else:
        with pytest.raises(PolicyError):
            check_issuer_url(url, allow_loopback_http=loopback)


def test_nested_claims_are_read_by_path() -> None:
    claims = {"kubernetes.io": {"namespace": "jobs", "serviceaccount": {"name": "sync"}}}
    assert claim_value(claims, "kubernetes.io/namespace") == "jobs"
    assert claim_value(claims, "kubernetes.io/serviceaccount/name") == "sync"
    assert claim_value(claims, "kubernetes.io/pod/name") is None
    assert claim_value({"sub": "x"}, "sub/deeper") is None


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, DEFAULT_FRESH),
        ("public, max-age=3600", 3600.0),
        ("max-age=5", MIN_FRESH),
        ("max-age=99999999", MAX_FRESH),
        ("no-store", MIN_FRESH),
        ("private", DEFAULT_FRESH),
        ('s-maxage=10, max-age="120"', 120.0),
    ],
)
def test_key_sets_stay_fresh_for_their_bounded_max_age(header: str | None, seconds: float) -> None:
    assert freshness(header) == seconds


def test_weak_rsa_and_symmetric_keys_in_an_issuers_set_are_dropped() -> None:
    modulus = base64.urlsafe_b64encode(b"\xc1" + bytes(127)).rstrip(b"=").decode()
    weak = {"kty": "RSA", "kid": "weak", "n": modulus, "e": "AQAB"}  # 1,024 bits
    strong = RSAKey.generate_key(2048, parameters={"kid": "strong"})
    keys = {
        "keys": [
            weak,
            strong.as_dict(private=False),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**strong.as_dict(private=False), "kid": "enc", "use": "enc"},
        ]
    }
    assert [k["kid"] for k in signing_key_set(keys)["keys"]] == ["strong"]
