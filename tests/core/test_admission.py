"""The rules of one proxied call, as pure functions (docs/proxy-rules.md#order-of-checks)."""

from __future__ import annotations

import ipaddress

import pytest

from broker.core import admission
from broker.core.admission import CallPolicy, ProxyRequest
from broker.core.scopes import Grant
from broker.errors import Refusal

ASSIGNMENTS = b"/api/v1/courses/1201/assignments"


def request(
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    path: bytes = ASSIGNMENTS,
    query: bytes = b"",
    method: str = "GET",
) -> ProxyRequest:
    return ProxyRequest(method, path, query, headers or [])


def refused(excinfo: pytest.ExceptionInfo[Refusal]) -> tuple[int, str]:
    return excinfo.value.status, excinfo.value.error


def test_admit_target_returns_the_canonical_path_as_text() -> None:
    assert admission.admit_target(request()) == ASSIGNMENTS.decode()


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        pytest.param(request(path=b"/api/v1/../x"), (400, "non_canonical_path"), id="path"),
        pytest.param(request(query=b"a=1 2"), (400, "malformed_request"), id="space-in-query"),
        pytest.param(request(query=b"a=\x00"), (400, "malformed_request"), id="nul-in-query"),
        pytest.param(request([(b"x job", b"1")]), (400, "malformed_request"), id="header-name"),
        pytest.param(request([(b"x-job", b"a\r\nb")]), (400, "malformed_request"), id="crlf"),
    ],
)
def test_admit_target_refuses_what_no_server_would_pass_on(
    call: ProxyRequest, expected: tuple[int, str]
) -> None:
    with pytest.raises(Refusal) as caught:
        admission.admit_target(call)
    assert refused(caught) == expected


GOOD = [(b"host", b"canvas.test"), (b"user-agent", b"job/1\tx"), (b"accept", b"*/*")]


@pytest.mark.parametrize(
    ("headers", "bad"),
    [
        pytest.param([], None, id="none"),
        pytest.param(GOOD, None, id="good"),
        pytest.param([*GOOD, (b"x\nb", b"1")], b"x\nb", id="newline-in-a-name"),
        pytest.param([(b"a\nb", b"1")], b"a\nb", id="lone-name-looking-like-two"),
        pytest.param([*GOOD, (b"", b"1")], b"", id="empty-name"),
        pytest.param([(b"a:b", b"1"), *GOOD], b"a:b", id="colon-in-a-name"),
        pytest.param([*GOOD[:1], (b"x-job", b"a\x00"), *GOOD[1:]], b"x-job", id="nul-in-a-value"),
        pytest.param([(b"x-job", b"a\nb"), *GOOD], b"x-job", id="newline-in-a-value"),
        pytest.param([(b"x-job", b"\x7f")], b"x-job", id="del-in-a-value"),
        pytest.param([(b"x-a", b"ok"), (b"x b", b"ok"), (b"x-c", b"\r")], b"x b", id="first-bad"),
    ],
)
def test_admit_target_checks_every_header_name_and_value(
    headers: list[tuple[bytes, bytes]], bad: bytes | None
) -> None:
    # Names and values are checked joined (broker/core/admission.py): joining must neither
    # hide a bad one nor refuse good ones, and the refusal names the first bad header.
    if bad is None:
        assert admission.admit_target(request(headers)) == ASSIGNMENTS.decode()
        return
    with pytest.raises(Refusal) as caught:
        admission.admit_target(request(headers))
    assert refused(caught) == (400, "malformed_request")
    assert repr(bad) in caught.value.message


def test_bearer_token_reads_the_one_authorization_header() -> None:
    assert admission.bearer_token(request([(b"authorization", b"Bearer  cbt_x ")])) == "cbt_x"
    assert admission.bearer_token(request([(b"authorization", b"bearer cbt_x")])) == "cbt_x"


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ([], "missing_token"),
        ([(b"authorization", b"Basic abc")], "malformed_token"),
        ([(b"authorization", b"Bearer ")], "malformed_token"),
        ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")], "malformed_token"),
    ],
)
def test_bearer_token_refuses_anything_else_with_401(
    headers: list[tuple[bytes, bytes]], error: str
) -> None:
    with pytest.raises(Refusal) as caught:
        admission.bearer_token(request(headers))
    assert refused(caught) == (401, error)


def test_check_source_allows_listed_networks_only() -> None:
    networks = (ipaddress.ip_network("10.20.0.0/16"),)
    admission.check_source("10.20.1.2", networks)
    admission.check_source("192.0.2.1", ())
    with pytest.raises(Refusal) as caught:
        admission.check_source("192.0.2.1", networks)
    assert refused(caught) == (403, "source_not_allowed")


def test_rate_limited_says_when_to_retry() -> None:
    refusal = admission.rate_limited(3)
    assert (refusal.status, refusal.error) == (429, "rate_limited")
    assert refusal.headers == ((b"retry-after", b"3"),)


@pytest.mark.parametrize(
    ("declared", "expected"),
    [(b"12x", (400, "malformed_request")), (b"101", (413, "body_too_large"))],
)
def test_check_declared_length_refuses_a_bad_or_large_content_length(
    declared: bytes, expected: tuple[int, str]
) -> None:
    admission.check_declared_length(request([(b"content-length", b"100")]), 100)
    with pytest.raises(Refusal) as caught:
        admission.check_declared_length(request([(b"content-length", declared)]), 100)
    assert refused(caught) == expected


def test_admit_head_and_body_apply_the_clients_flags() -> None:
    policy = CallPolicy(Grant.compile(["url:GET|/api/v1/courses/:course_id/assignments"]))
    call = request(query=b"as_user_id=2")
    with pytest.raises(Refusal) as caught:
        admission.admit_head(call, policy)
    assert refused(caught) == (403, "masquerade_denied")
    admission.admit_head(call, CallPolicy(policy.grant, allow_masquerade=True))
    form = request([(b"content-type", b"application/x-www-form-urlencoded")], method="POST")
    with pytest.raises(Refusal) as caught:
        admission.admit_body(form, policy, b"include[]=rubric")
    assert refused(caught) == (403, "include_not_allowed")
    admission.admit_body(form, CallPolicy(policy.grant, allow_includes=True), b"include[]=r")


def test_check_grant_is_the_grants_own_decision() -> None:
    policy = CallPolicy(Grant.compile(["url:GET|/api/v1/*path"]))
    decision = admission.check_grant(policy, "GET", "/api/v1/login/session_token")
    assert decision == policy.grant.check("GET", "/api/v1/login/session_token")
    assert (decision.refusal().status, decision.refusal().error) == (403, "exact_scope_required")


@pytest.mark.parametrize(
    ("raw", "limit", "shown"),
    [
        (b"/api/v1/x", 100, "/api/v1/x"),
        (b"/a\\b", 100, "/a\\x5cb"),
        (b"/caf\xc3\xa9", 100, "/caf\\xc3\\xa9"),
        (b"a" * 20, 5, "aaaaa"),
        (b"\x00" * 20, 6, "\\x00\\x"),
    ],
)
def test_audit_text_shows_exactly_what_was_sent(raw: bytes, limit: int, shown: str) -> None:
    assert admission.audit_text(raw, limit) == shown
