"""Tests for the proxy's request rules."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.rules import (
    CREDENTIAL_KEYS,
    HOP_BY_HOP,
    MASQUERADE_KEYS,
    MAX_PATH_BYTES,
    OVERRIDE_HEADERS,
    OVERRIDE_KEYS,
    SENSITIVE_QUERY_KEYS,
    check_body,
    check_headers,
    check_path,
    check_query,
    check_query_pairs,
    forward_request_headers,
    forward_response_headers,
    header_carrying,
    redact_pairs,
    redact_query,
)
from broker.errors import Refusal

if TYPE_CHECKING:
    from collections.abc import Callable


def violation(excinfo: pytest.ExceptionInfo[Refusal]) -> tuple[int, str]:
    return excinfo.value.status, excinfo.value.error


def test_rule_violation_carries_status_error_and_message() -> None:
    error = Refusal(403, "masquerade_denied", "no")
    assert (error.status, error.error, error.message, str(error)) == (
        403,
        "masquerade_denied",
        "no",
        "no",
    )


def test_key_sets_are_the_documented_ones() -> None:
    assert {"as_user_id", "become_user_id", "become_teacher", "become_student", "me"} == (
        MASQUERADE_KEYS
    )
    assert {"_method"} == OVERRIDE_KEYS
    assert {"access_token", "api_key"} == CREDENTIAL_KEYS
    assert {b"x-http-method-override", b"x-http-method", b"x-method-override"} == OVERRIDE_HEADERS


# --- check_path ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        b"/",
        b"/api/v1/courses",
        b"/api/v1/courses/1/assignments.json",
        b"/api/v1/courses/sis_course_id:A%20B",
        b"/api/v1/courses/sis_course_id%3AX",
        b"/api/v1/courses/1~23",
        b"/api/v1/users/self/files",
        b"/api/v1/courses/%C3%A9t%C3%A9",
        b"/api/v1/courses/...",
        b"/api/v1/courses/.hidden",
        b"/api/v1/courses/a..b",
        b"/api/v1/files/a+b",
        b"/api/v1/x/%26%3D%2B%40",
        b"/api/v1/x/%7E%20%2B",
    ],
)
def test_check_path_returns_canonical_paths_as_text(path: bytes) -> None:
    assert check_path(path) == path.decode("ascii")


@pytest.mark.parametrize(
    "path",
    [
        b"",
        b"api/v1/courses",
        b"*",
        b"http://evil/api/v1/courses",
        b"/api/v1/courses/../accounts",
        b"/api/v1/courses/./1",
        b"/api/v1/courses/..",
        b"/api/v1/courses/.",
        b"/..",
        b"/.",
        b"/api/v1//courses",
        b"//api/v1/courses",
        b"/api/v1/courses/",
        b"/api/v1/courses//",
        b"/api/v1/courses/%2e%2e/accounts",
        b"/api/v1/courses/%2E%2E/accounts",
        b"/api/v1/courses/%2e",
        b"/api/v1/courses/.%2e",
        b"/api/v1/courses/1%2Ejson",
        b"/api/v1/courses%2f1",
        b"/api/v1/courses%2F1",
        b"/api/v1/courses%5c1",
        b"/api/v1/courses%5C1",
        b"/api/v1/courses\\1",
        b"/api/v1/courses/1%00",
        b"/api/v1/courses/1%0a",
        b"/api/v1/courses/1%0D",
        b"/api/v1/courses/1%1f",
        b"/api/v1/courses/1%7f",
        b"/api/v1/courses/1%7F",
        b"/api/v1/courses/1%3Fas_user_id=2",
        b"/api/v1/courses/1%3fx",
        b"/api/v1/courses/1%23frag",
        b"/api/v1/courses/1%3Bas_user_id=2",
        b"/api/v1/courses/1%3bx",
        b"/api/v1/courses/%252e%252e",
        b"/api/v1/courses/%252F",
        b"/api/v1/courses/%25",
        b"/api/v1/courses/%",
        b"/api/v1/courses/%2",
        b"/api/v1/courses/%zz",
        b"/api/v1/courses/%%32%65",
        b"/api/v1/courses/1;as_user_id=2",
        b"/api/v1/courses;x/1",
        b"/api/v1/courses/1#frag",
        b"/api/v1/courses/1?x=1",
        b"/api/v1/courses/1 2",
        b"/api/v1/courses/1\t2",
        b"/api/v1/courses/1\x00",
        b"/api/v1/courses/1\x7f",
        b"/api/v1/courses/\xc3\xa9",
        b"/api/v1/courses/\xff",
        b"/api/v1/courses/1\r\nX-Injected: 1",
    ],
)
def test_check_path_refuses_non_canonical_paths(path: bytes) -> None:
    with pytest.raises(Refusal) as caught:
        check_path(path)
    assert violation(caught) == (400, "non_canonical_path")


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(b"/api/v1/courses/%C0%AE%C0%AE/accounts", id="overlong-dot"),
        pytest.param(b"/api/v1/courses/%c0%af", id="overlong-slash"),
        pytest.param(b"/api/v1/courses/%E0%80%AE", id="three-byte-overlong-dot"),
        pytest.param(b"/api/v1/courses/%C1%9C", id="overlong-backslash"),
        pytest.param(b"/api/v1/courses/%FF", id="invalid-byte"),
        pytest.param(b"/api/v1/courses/%C3", id="truncated-sequence"),
        pytest.param(b"/api/v1/courses/%ED%A0%80", id="surrogate"),
    ],
)
def test_check_path_refuses_escapes_that_are_not_utf8(path: bytes) -> None:
    with pytest.raises(Refusal) as caught:
        check_path(path)
    assert violation(caught) == (400, "non_canonical_path")
    assert "UTF-8" in caught.value.message


def test_check_path_refuses_a_path_over_the_length_limit_with_414() -> None:
    prefix = b"/api/v1/courses/"
    longest = prefix + b"1" * (MAX_PATH_BYTES - len(prefix))
    assert check_path(longest) == longest.decode()
    with pytest.raises(Refusal) as caught:
        check_path(longest + b"1")
    assert violation(caught) == (414, "path_too_long")
    assert len(caught.value.message) < 300


def test_check_path_message_truncates_huge_input() -> None:
    with pytest.raises(Refusal) as caught:
        check_path(b"/" + b"a" * 10_000 + b"/..")
    assert len(caught.value.message) < 250


def test_check_path_message_says_what_was_wrong() -> None:
    with pytest.raises(Refusal, match="empty segments"):
        check_path(b"/api//x")


@settings(max_examples=1000)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(["/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "%", "%00"]),
            st.sampled_from(["a", "1", ";", "?", "#", "\\", " ", "\x7f", "\xe9", "%41", "%c3%a9"]),
        ),
        max_size=12,
    ).map(lambda parts: "".join(parts).encode("utf-8"))
)
def test_check_path_output_never_holds_dot_or_empty_segments_or_encoded_slashes(
    path: bytes,
) -> None:
    try:
        result = check_path(path)
    except Refusal as error:
        refusal = (error.status, error.error)
        result = None
    if result is None:
        assert refusal == (400, "non_canonical_path")
        return
    assert result.encode("ascii") == path
    assert result.startswith("/")
    segments = result[1:].split("/")
    assert result == "/" or all(segment not in {"", ".", ".."} for segment in segments)
    lowered = result.lower()
    for encoded in ("%2f", "%5c", "%2e", "%25", "%00"):
        assert encoded not in lowered
    assert all(0x21 <= byte <= 0x7E for byte in path)


@settings(max_examples=500)
@given(st.binary(max_size=40))
def test_check_path_accepts_only_printable_ascii(path: bytes) -> None:
    try:
        result = check_path(b"/" + path)
    except Refusal:
        return
    assert all(0x21 <= byte <= 0x7E and byte not in b"\\;#?" for byte in result.encode())


# --- check_headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        b"x-http-method-override",
        b"X-HTTP-Method-Override",
        b"x-http-method",
        b"X-Http-Method",
        b"x-method-override",
        b"X-METHOD-OVERRIDE",
        b"x_http_method_override",
        b" X-HTTP-Method ",
    ],
)
def test_check_headers_refuses_method_override_headers(name: bytes) -> None:
    with pytest.raises(Refusal) as caught:
        check_headers([(b"accept", b"*/*"), (name, b"DELETE")])
    assert violation(caught) == (403, "method_override_denied")


def test_check_headers_allows_ordinary_headers() -> None:
    check_headers([(b"accept", b"application/json"), (b"x-method", b"DELETE"), (b"method", b"x")])


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b"host", b"broker"), (b"host", b"evil.example")], id="host"),
        pytest.param([(b"Host", b"broker"), (b"host", b"broker")], id="host-same-value"),
        pytest.param(
            [(b"content-type", b"application/json"), (b"Content-Type", b"text/plain")],
            id="content-type",
        ),
        pytest.param(
            [(b"content_type", b"application/json"), (b"content-type", b"application/json")],
            id="content-type-underscore",
        ),
    ],
)
def test_check_headers_refuses_a_repeated_host_or_content_type(
    headers: list[tuple[bytes, bytes]],
) -> None:
    with pytest.raises(Refusal) as caught:
        check_headers(headers)
    assert violation(caught) == (400, "malformed_request")


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"identity", b"chunked, chunked", b"gzip"])
def test_check_headers_refuses_transfer_codings_other_than_chunked(coding: bytes) -> None:
    with pytest.raises(Refusal) as caught:
        check_headers([(b"transfer-encoding", coding)])
    assert violation(caught) == (400, "malformed_request")


def test_check_headers_allows_chunked_and_repeated_ordinary_headers() -> None:
    check_headers(
        [
            (b"host", b"broker"),
            (b"content-type", b"application/json"),
            (b"transfer-encoding", b"Chunked"),
            (b"accept", b"application/json"),
            (b"accept", b"text/plain"),
        ]
    )


# --- check_query -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "error"),
    [
        (b"as_user_id=2", "masquerade_denied"),
        (b"per_page=10&as_user_id=2", "masquerade_denied"),
        (b"as_user_id", "masquerade_denied"),
        (b"as_user_id=", "masquerade_denied"),
        (b"as_user_id[]=2", "masquerade_denied"),
        (b"as_user_id%5B%5D=2", "masquerade_denied"),
        (b"as_user_id[0]=2", "masquerade_denied"),
        (b"as_user_id[x][y]=2", "masquerade_denied"),
        (b"as_user_id]=2", "masquerade_denied"),
        (b"[as_user_id]=2", "masquerade_denied"),
        (b"[]as_user_id=2", "masquerade_denied"),
        (b"as%5Fuser%5Fid=2", "masquerade_denied"),
        (b"as%5fuser%5fid=2", "masquerade_denied"),
        (b"%61s_user_id=2", "masquerade_denied"),
        (b"a=1;as_user_id=2", "masquerade_denied"),
        (b"a=1&%20as_user_id=2".replace(b"%20", b" "), "masquerade_denied"),
        (b"a=1;  as_user_id=2", "masquerade_denied"),
        (b"_method=DELETE", "method_override_denied"),
        (b"_method[x]=DELETE", "method_override_denied"),
        (b"%5Fmethod=DELETE", "method_override_denied"),
        (b"x=1&_method=delete", "method_override_denied"),
        (b"access_token=abc", "credential_param_denied"),
        (b"api_key=abc", "credential_param_denied"),
        (b"access%5Ftoken=abc", "credential_param_denied"),
        (b"access_token[]=abc", "credential_param_denied"),
        (b"course[as_user_id]=2", "masquerade_denied"),
        (b"course%5Bas_user_id%5D=2", "masquerade_denied"),
        (b"a[b][as_user_id]=2", "masquerade_denied"),
        (b"a[][as_user_id]=2", "masquerade_denied"),
        (b"as_user_id=1&as_user_id=2", "masquerade_denied"),
        (b"course[_method]=DELETE", "method_override_denied"),
        (b"user[access_token]=abc", "credential_param_denied"),
        (b"x[y][api_key]=abc", "credential_param_denied"),
    ],
)
def test_check_query_refuses_keys_canvas_would_read(query: bytes, error: str) -> None:
    with pytest.raises(Refusal) as caught:
        check_query(query, allow_masquerade=False)
    assert violation(caught) == (403, error)


@pytest.mark.parametrize(
    "query",
    [
        b"",
        b"per_page=100&page=2",
        b"include[]=uuid&include=uuid",
        b"search_term=as_user_id",
        b"x=as_user_id=2",
        b"AS_USER_ID=2",
        b"As_User_Id=2",
        b"as_user_id_x=2",
        b"xas_user_id=2",
        b"as+user+id=2",
        b"+as_user_id=2",
        b"as_user_id+=2",
        b"method=DELETE",
        b"_METHOD=DELETE",
        b"token=abc",
        b"Access_Token=abc",
        b"&&=&",
        b"q=%C3%A9t%C3%A9",
        b"user[as]=1",
        b"assignment[as]=2",
    ],
)
def test_check_query_allows_ordinary_queries(query: bytes) -> None:
    check_query(query, allow_masquerade=False)


@pytest.mark.parametrize(
    "query",
    [
        b"include[]=submission",
        b"include[]=uuid&include[]=rubric",
        b"includes[]=user",
        b"include=submission",
        b"include[0]=uuid",
        b"include[][x]=uuid",
        b"[include][]=rubric",
        b"include][]=rubric",
        b"include;include[]=x",
    ],
)
def test_check_query_refuses_includes_other_than_uuid_without_allow_includes(
    query: bytes,
) -> None:
    with pytest.raises(Refusal) as caught:
        check_query(query, allow_masquerade=False)
    assert violation(caught) == (403, "include_not_allowed")
    assert "allow_includes" in caught.value.message
    check_query(query, allow_masquerade=False, allow_includes=True)


@pytest.mark.parametrize(
    "query",
    [b"assignment[include]=x", b"includes_x=1", b"x=include", b"xinclude[]=1", b"per_page=1"],
)
def test_check_query_leaves_nested_or_other_keys_named_like_include_alone(query: bytes) -> None:
    check_query(query, allow_masquerade=False)


@pytest.mark.parametrize(
    "query",
    [b"become_user_id=2", b"become_teacher=1", b"become_student", b"me", b"me=1", b"x[me]=1"],
)
def test_check_query_refuses_every_canvas_masquerade_key(query: bytes) -> None:
    with pytest.raises(Refusal) as caught:
        check_query(query, allow_masquerade=False)
    assert violation(caught) == (403, "masquerade_denied")
    check_query(query, allow_masquerade=True)


def test_check_query_allows_masquerade_when_the_client_may() -> None:
    check_query(b"as_user_id=2&as_user_id[]=3", allow_masquerade=True)


@pytest.mark.parametrize(
    ("query", "error"),
    [
        (b"as_user_id=2&_method=DELETE", "method_override_denied"),
        (b"as_user_id=2&access_token=x", "credential_param_denied"),
    ],
)
def test_allow_masquerade_does_not_allow_other_keys(query: bytes, error: str) -> None:
    with pytest.raises(Refusal) as caught:
        check_query(query, allow_masquerade=True)
    assert violation(caught) == (403, error)


@pytest.mark.parametrize(
    "query",
    [
        b"a=%",
        b"a=%2",
        b"a=%zz",
        b"%=1",
        b"a=%FF",
        b"a=%C3",
        b"a=\xff",
        b"per_page=10&as_user_id=%",
        b"per_page=10#as_user_id=2",
        b"#",
    ],
)
def test_check_query_refuses_unparseable_queries(query: bytes) -> None:
    with pytest.raises(Refusal) as caught:
        check_query(query, allow_masquerade=False)
    assert violation(caught) == (400, "malformed_request")


# --- check_body ------------------------------------------------------------------------------


def test_check_body_accepts_an_empty_body_of_any_type() -> None:
    for content_type in (None, "text/plain", "application/octet-stream", "", "garbage"):
        check_body(content_type, b"", allow_masquerade=False)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "text/plain; charset=utf-8",
        "application/xml",
        "application/octet-stream",
        "multipart/mixed; boundary=x",
        "multipart/related; boundary=x",
        "text/json",
        "application/jsonx",
        "application",
        "application/json garbage",
        "application/json; charset",
        "application/json, text/plain",
        "application/x-www-form-urlencoded; charset=utf-8; charset=latin1",
        "/json",
    ],
)
def test_check_body_refuses_other_types_with_a_body(content_type: str | None) -> None:
    with pytest.raises(Refusal) as caught:
        check_body(content_type, b"as_user_id=1", allow_masquerade=False)
    assert violation(caught) == (415, "unsupported_media_type")


# JSON


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        'application/json; charset="utf-8"',
        "application/vnd.api+json",
        "application/merge-patch+json",
        "application/json;",
    ],
)
def test_check_body_reads_json_types(content_type: str) -> None:
    check_body(content_type, b'{"assignment": {"name": "x"}}', allow_masquerade=False)
    with pytest.raises(Refusal) as caught:
        check_body(content_type, b'{"as_user_id": 2}', allow_masquerade=False)
    assert violation(caught) == (403, "masquerade_denied")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"as_user_id": 2}, "masquerade_denied"),
        ({"assignment": {"as_user_id": 2}}, "masquerade_denied"),
        ({"a": [{"b": [{"as_user_id": 2}]}]}, "masquerade_denied"),
        ([{"as_user_id": 2}], "masquerade_denied"),
        ({"as_user_id[]": [2]}, "masquerade_denied"),
        ({"_method": "DELETE"}, "method_override_denied"),
        ({"x": {"_method": "DELETE"}}, "method_override_denied"),
        ({"access_token": "abc"}, "credential_param_denied"),
        ({"deep": {"er": {"api_key": "abc"}}}, "credential_param_denied"),
    ],
)
def test_check_body_refuses_keys_anywhere_in_json(body: object, error: str) -> None:
    with pytest.raises(Refusal) as caught:
        check_body("application/json", json.dumps(body).encode(), allow_masquerade=False)
    assert violation(caught) == (403, error)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"course[as_user_id]": 2}, "masquerade_denied"),
        ({"course": {"as_user_id[]": [2]}}, "masquerade_denied"),
        ({"course": [{"_method[x]": "DELETE"}]}, "method_override_denied"),
        ({"user": {"[access_token]": "x"}}, "credential_param_denied"),
    ],
)
def test_check_body_refuses_bracketed_keys_in_json(body: object, error: str) -> None:
    with pytest.raises(Refusal) as caught:
        check_body("application/json", json.dumps(body).encode(), allow_masquerade=False)
    assert violation(caught) == (403, error)


def test_check_body_sees_duplicate_json_keys() -> None:
    with pytest.raises(Refusal, match="as_user_id"):
        check_body("application/json", b'{"a": 1, "as_user_id": 2, "a": 3}', allow_masquerade=False)


def test_check_body_sees_escaped_json_keys() -> None:
    with pytest.raises(Refusal) as caught:
        check_body("application/json", b'{"as\\u005fuser_id": 2}', allow_masquerade=False)
    assert violation(caught) == (403, "masquerade_denied")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "as_user_id"},
        {"user": ["as_user_id", "_method"]},
        {"AS_USER_ID": 1},
        {"as%5Fuser%5Fid": 1},
        "as_user_id",
        [1, 2, 3],
        None,
    ],
)
def test_check_body_allows_json_without_the_keys(body: object) -> None:
    check_body("application/json", json.dumps(body).encode(), allow_masquerade=False)


def test_check_body_allows_masquerade_in_json_when_the_client_may() -> None:
    check_body("application/json", b'{"as_user_id": 2}', allow_masquerade=True)


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"{'a': 1}",
        b"as_user_id=2",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": "\xff"}',
        b'\xef\xbb\xbf{"a": 1}',
        '{"a": 1}'.encode("utf-16"),
        b"[" * 100_000,
        b'{"a": 1} {"b": 2}',
    ],
)
def test_check_body_refuses_malformed_json(body: bytes) -> None:
    with pytest.raises(Refusal) as caught:
        check_body("application/json", body, allow_masquerade=False)
    assert violation(caught) == (400, "malformed_body")


# Form bodies

FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"as_user_id=2", "masquerade_denied"),
        (b"assignment[name]=x&as_user_id[]=2", "masquerade_denied"),
        (b"as%5Fuser%5Fid=2", "masquerade_denied"),
        (b"_method=DELETE", "method_override_denied"),
        (b"_method[]=DELETE", "method_override_denied"),
        (b"access_token=x", "credential_param_denied"),
        (b"api_key=x", "credential_param_denied"),
    ],
)
def test_check_body_refuses_keys_in_form_bodies(body: bytes, error: str) -> None:
    with pytest.raises(Refusal) as caught:
        check_body(f"{FORM}; charset=UTF-8", body, allow_masquerade=False)
    assert violation(caught) == (403, error)


def test_check_body_allows_ordinary_form_bodies() -> None:
    check_body(FORM, b"assignment[name]=as_user_id&comment=a+b%21", allow_masquerade=False)


@pytest.mark.parametrize(
    "body", [b"assignment[name]=x\n", b"assignment[name]=x\r\n", b"assignment[name]=Week 1"]
)
def test_check_body_allows_a_form_body_as_curl_sends_it(body: bytes) -> None:
    check_body(FORM, body, allow_masquerade=False)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"course[as_user_id]=2", "masquerade_denied"),
        (b"assignment[name]=x&assignment[as_user_id][]=2", "masquerade_denied"),
        (b"assignment[_method]=DELETE", "method_override_denied"),
        (b"user[api_key]=x", "credential_param_denied"),
    ],
)
def test_check_body_refuses_nested_keys_in_form_bodies(body: bytes, error: str) -> None:
    with pytest.raises(Refusal) as caught:
        check_body(FORM, body, allow_masquerade=False)
    assert violation(caught) == (403, error)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"a=%", id="bad-escape"),
        pytest.param(b"a=%zz", id="bad-hex"),
        pytest.param(b"a=%FF", id="escape-not-utf8"),
        pytest.param(b"\xff=1", id="raw-not-utf8"),
        pytest.param(b'{"as_user_id": 2}', id="json-object"),
        pytest.param(b' \n[{"a": "&as_user_id=2"}]', id="json-array"),
        pytest.param(
            b'--b\r\nContent-Disposition: form-data; name="as_user_id"\r\n\r\n2\r\n--b--\r\n',
            id="multipart",
        ),
        pytest.param(b"a=1\x00&as_user_id=2", id="nul"),
        pytest.param(b"a=1\r\nb=2", id="line-break-inside"),
    ],
)
def test_check_body_refuses_malformed_form_bodies(body: bytes) -> None:
    with pytest.raises(Refusal) as caught:
        check_body(FORM, body, allow_masquerade=False)
    assert violation(caught) == (400, "malformed_body")


# Multipart bodies

BOUNDARY = "----broker-test-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(*parts: tuple[str, bytes], boundary: str = BOUNDARY) -> bytes:
    out = b""
    for head, content in parts:
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def form_part(name: str, value: bytes = b"v") -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"', value


def test_check_body_allows_ordinary_multipart_bodies() -> None:
    body = multipart(
        form_part("assignment[name]", b"as_user_id"),
        (
            (
                'Content-Disposition: form-data; name="file"; filename="report.pdf"\r\n'
                "Content-Type: application/pdf"
            ),
            b"%PDF-1.4 --" + BOUNDARY[:-1].encode() + b"\r\n\r\n as_user_id=1",
        ),
        (
            'Content-Disposition: form-data; name="attrs"\r\nContent-Type: application/json',
            b'{"as_user_id": 2, "_method": "DELETE"}',
        ),
    )
    check_body(MULTIPART, body, allow_masquerade=False)


def test_check_body_accepts_multipart_content_type_variants() -> None:
    body = multipart(form_part("a"), boundary="simple")
    for content_type in (
        "multipart/form-data; boundary=simple",
        "Multipart/Form-Data; BOUNDARY=simple",
        'multipart/form-data; boundary="simple"',
        "multipart/form-data;boundary=simple; charset=utf-8",
    ):
        check_body(content_type, body, allow_masquerade=False)


def test_check_body_accepts_a_multipart_body_without_parts() -> None:
    check_body(MULTIPART, f"--{BOUNDARY}--".encode(), allow_masquerade=False)


@pytest.mark.parametrize(
    ("part", "error"),
    [
        (form_part("as_user_id"), "masquerade_denied"),
        (form_part("as_user_id[]"), "masquerade_denied"),
        (form_part("[as_user_id]"), "masquerade_denied"),
        (("Content-Disposition: form-data; name=as_user_id", b"2"), "masquerade_denied"),
        (('content-disposition: FORM-DATA; name="as_user_id"', b"2"), "masquerade_denied"),
        (
            ('Content-Disposition: form-data; name="as_user_id"; filename="a.txt"', b"2"),
            "masquerade_denied",
        ),
        (form_part("become_user_id"), "masquerade_denied"),
        (form_part("_method"), "method_override_denied"),
        (form_part("access_token"), "credential_param_denied"),
        (form_part("api_key[]"), "credential_param_denied"),
    ],
)
def test_check_body_refuses_keys_in_multipart_part_names(
    part: tuple[str, bytes], error: str
) -> None:
    body = multipart(form_part("a"), part)
    with pytest.raises(Refusal) as caught:
        check_body(MULTIPART, body, allow_masquerade=False)
    assert violation(caught) == (403, error)


def test_check_body_allows_multipart_masquerade_when_the_client_may() -> None:
    check_body(MULTIPART, multipart(form_part("as_user_id")), allow_masquerade=True)


def test_check_body_does_not_reparse_json_parts() -> None:
    body = multipart(
        ('Content-Disposition: form-data; name="a"\r\nContent-Type: application/json', b"{bad")
    )
    check_body(MULTIPART, body, allow_masquerade=False)


VALID = multipart(form_part("a"))


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", VALID),
        ("multipart/form-data; boundary=", VALID),
        ('multipart/form-data; boundary=""', VALID),
        ("multipart/form-data; boundary=a,b", VALID),
        ('multipart/form-data; boundary="a b"', VALID),
        ('multipart/form-data; boundary="a;b"', VALID),
        ("multipart/form-data; boundary=" + "a" * 71, VALID),
        (f"{MULTIPART}; boundary={BOUNDARY}", VALID),
        (f'{MULTIPART}; x="boundary=evil"', VALID),
        ('multipart/form-data; boundary="\\a"', multipart(form_part("x"), boundary="a")),
        ("multipart/form-data; boundary=a ; x=y", multipart(form_part("x"), boundary="a")),
        (" multipart/form-data; boundary=a", multipart(form_part("x"), boundary="a")),
        (MULTIPART, b"preamble\r\n" + VALID),
        (MULTIPART, VALID[: -len(f"--{BOUNDARY}--\r\n")]),
        (MULTIPART, VALID.replace(b"--\r\n", b"\r\n")),
        (MULTIPART, VALID + f"--{BOUNDARY}--".encode()),
        (MULTIPART, VALID + f"epilogue --{BOUNDARY}\r\n".encode()),
        (MULTIPART, multipart(("", b"no headers"))),
        (MULTIPART, multipart(("Content-Type: text/plain", b"x"))),
        (MULTIPART, multipart(("Content-Disposition: form-data", b"x"))),
        (MULTIPART, multipart(('Content-Disposition: form-data; name=""', b"x"))),
        (MULTIPART, multipart(('Content-Disposition: attachment; name="a"', b"x"))),
        (MULTIPART, multipart(('Content-Disposition: form-data; name="a"; name="b"', b"x"))),
        (MULTIPART, multipart(('Content-Disposition: form-data; name = "a"', b"x"))),
        (
            MULTIPART,
            multipart((form_part("a")[0] + "\r\n" + form_part("b")[0], b"x")),
        ),
        (MULTIPART, multipart((form_part("a")[0] + "\r\n continued", b"x"))),
        (MULTIPART, multipart((form_part("a")[0] + "\r\nbroken header", b"x"))),
        (MULTIPART, multipart((form_part("a")[0] + "\r\nX-A : b", b"x"))),
        (MULTIPART, multipart((form_part("a")[0] + "\nX-A: b", b"x"))),
        (MULTIPART, multipart((form_part("a\xe9")[0], b"x")).replace(b"\xc3\xa9", b"\xe9")),
        (
            MULTIPART,
            multipart(
                form_part(
                    "a",
                    b"text--" + BOUNDARY.encode() + b"\r\n" + form_part("as_user_id")[0].encode(),
                )
            ),
        ),
        (MULTIPART, multipart(form_part("a", b"\r\n--" + BOUNDARY.encode() + b"  \r\n"))),
        (MULTIPART, multipart(form_part("a", b"\r\n--" + BOUNDARY.encode() + b"x"))),
        (MULTIPART, f"--{BOUNDARY}\r\n".encode() + form_part("a")[0].encode()),
    ],
)
def test_check_body_refuses_malformed_multipart(content_type: str, body: bytes) -> None:
    with pytest.raises(Refusal) as caught:
        check_body(content_type, body, allow_masquerade=False)
    assert violation(caught) == (400, "malformed_body")


def test_check_body_refuses_an_include_part_that_is_a_file_even_if_it_holds_uuid() -> None:
    part = ('Content-Disposition: form-data; name="include[]"; filename="x.txt"', b"uuid")
    with pytest.raises(Refusal) as caught:
        check_body(MULTIPART, multipart(part), allow_masquerade=False)
    assert violation(caught) == (403, "include_not_allowed")
    check_body(MULTIPART, multipart(form_part("include[]", b"uuid")), allow_masquerade=False)


def test_check_body_reads_part_names_as_rack_does_without_percent_decoding() -> None:
    check_body(MULTIPART, multipart(form_part("as%5Fuser%5Fid")), allow_masquerade=False)


def test_check_body_reads_utf8_part_names() -> None:
    check_body(MULTIPART, multipart(form_part("caf\u00e9")), allow_masquerade=False)


# Each of these is read as as_user_id, _method or another name than the disposition's own by
# at least one Rack release (docs/proxy-rules.md#multipart-bodies): refused as malformed.
CD = "Content-Disposition: form-data; "
NAMED = CD + 'name="a"'
RACK_TRAPS = {
    "upper-case-name": CD + 'NAME="as_user_id"',
    "capitalised-name": CD + 'Name="a"',
    "name-in-filename": CD + 'name="f"; filename="x; name=as_user_id"',
    "name-in-other-param": CD + 'name="f"; foo="; name=as_user_id"',
    "filename-first": CD + 'filename="a.txt"; name="as_user_id"',
    "filename-only": CD + 'filename="as_user_id"',
    "encoded-filename-only": CD + 'filename="%61s_user_id"',
    "filename-star": CD + "name=\"f\"; filename*=UTF-8''as_user_id",
    "content-id": NAMED + "\r\nContent-ID: as_user_id",
    "content-id-only": "Content-ID: as_user_id",
    "no-name-content-id": CD + "x=1\r\nContent-ID: as_user_id",
    "type-as-name": "Content-Type: as_user_id",
    "decoy-header": "X-Note: " + CD + "name=as_user_id\r\n" + NAMED,
    "filename-in-type": NAMED + "\r\nContent-Type: text/plain; filename=as_user_id",
    "flag-before-name": CD + 'flag; name="as_user_id"',
    "many-params": NAMED + "; " + "; ".join(f"p{i}=1" for i in range(16)),
    "long-disposition": NAMED + '; filename="' + "x" * 1600 + '"',
    "space-before-semicolon": CD + 'name="a" ; filename="b"',
    "trailing-space-after-token": CD + "name=a ",
    "no-space-after-colon": 'Content-Disposition:form-data; name="a"',
    "folded": CD + '\r\n name="as_user_id"',
    "escaped-quote": CD + 'name="a\\"b"',
    "colon-in-filename": NAMED + '; filename="C:x.txt"',
    "backslash-in-filename": NAMED + '; filename="a\\x.txt"',
    "type-param-without-value": NAMED + "\r\nContent-Type: text/plain; foo",
    "ascii-incompatible-charset": NAMED + "\r\nContent-Type: text/plain; charset=UTF-16LE",
    "empty-type": NAMED + "\r\nContent-Type:",
    "two-dispositions": NAMED + "\r\n" + CD + 'name="b"',
    "transfer-encoding-with-header": NAMED + "\r\nContent-Transfer-Encoding: a: b",
}


@pytest.mark.parametrize("head", RACK_TRAPS.values(), ids=RACK_TRAPS.keys())
def test_check_body_refuses_a_part_head_rack_releases_could_read_differently(head: str) -> None:
    body = multipart(form_part("ok"), (head, b"1"))
    with pytest.raises(Refusal) as caught:
        check_body(MULTIPART, body, allow_masquerade=True)
    assert violation(caught) == (400, "malformed_body")


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param(
            f'multipart/form-data; boundary={BOUNDARY}; x="boundary=a"', id="second-quoted"
        ),
        pytest.param(f"multipart/form-data; xboundary=a; boundary={BOUNDARY}", id="xboundary"),
        pytest.param(f"multipart/form-data; boundary ={BOUNDARY}", id="space-before-equals"),
        pytest.param(f"multipart/form-data; boundary={BOUNDARY}; boundary=a", id="repeated"),
        pytest.param("multipart/form-data; boundary=aboundary=b", id="boundary-in-value"),
        pytest.param("multipart/mixed; boundary=" + BOUNDARY, id="mixed"),
    ],
)
def test_check_body_refuses_a_boundary_rack_releases_could_read_differently(
    content_type: str,
) -> None:
    with pytest.raises(Refusal) as caught:
        check_body(content_type, multipart(form_part("a")), allow_masquerade=False)
    assert violation(caught)[0] in {400, 415}


@pytest.mark.parametrize(
    "boundary",
    ["----WebKitFormBoundary7MA4YWxkTrZu0gW", "------------------------d74496d66958873e", "x"],
)
def test_check_body_accepts_the_boundaries_browsers_and_libraries_send(boundary: str) -> None:
    body = multipart(form_part("assignment[name]"), boundary=boundary)
    check_body(f"multipart/form-data; boundary={boundary}", body, allow_masquerade=False)


# --- forward_request_headers ---------------------------------------------------------------------


def test_forward_request_headers_drops_credentials_and_proxy_headers() -> None:
    headers = [
        (b"Host", b"broker.example.edu"),
        (b"Authorization", b"Bearer cbt_secret"),
        (b"Cookie", b"_session=1"),
        (b"Content-Length", b"12"),
        (b"Forwarded", b"for=1.2.3.4;host=evil"),
        (b"X-Forwarded-For", b"1.2.3.4"),
        (b"X-Forwarded-Host", b"evil.example"),
        (b"X-Forwarded-Proto", b"http"),
        (b"x-forwarded-port", b"80"),
        (b"X-Real-IP", b"1.2.3.4"),
        (b"Client-IP", b"1.2.3.4"),
        (b"True-Client-IP", b"1.2.3.4"),
        (b"X-HTTP-Method-Override", b"DELETE"),
        (b"Connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Sum"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"Expect", b"100-continue"),
        (b"Accept", b"application/json"),
    ]
    assert forward_request_headers(headers) == [(b"Accept", b"application/json")]


@pytest.mark.parametrize(
    "name", [b"X_Forwarded_Host", b"x_forwarded_for", b"X_Real_IP", b"Transfer_Encoding"]
)
def test_forward_request_headers_treats_underscores_as_hyphens(name: bytes) -> None:
    assert forward_request_headers([(name, b"evil"), (b"a", b"b")]) == [(b"a", b"b")]


def test_forward_request_headers_keeps_order_duplicates_and_encodings() -> None:
    headers = [
        (b"accept", b"application/json"),
        (b"accept-encoding", b"gzip, br"),
        (b"content-type", b"application/json"),
        (b"content-encoding", b"gzip"),
        (b"x-custom", b"1"),
        (b"x-custom", b"2"),
        (b"user-agent", b"canvasapi"),
    ]
    assert forward_request_headers(headers) == headers


@pytest.mark.parametrize(
    "value",
    [
        b"close, Content-Type",
        b"keep-alive, content-length",
        b"Authorization",
        b"x-job-name",
        b"close, X-Secret ,x-other",
        b"Host",
        b"content_type",
    ],
)
def test_check_headers_refuses_connection_naming_an_end_to_end_header(value: bytes) -> None:
    with pytest.raises(Refusal) as caught:
        check_headers([(b"content-type", b"application/json"), (b"connection", value)])
    assert violation(caught) == (400, "malformed_request")


@pytest.mark.parametrize("value", [b"gzip", b"deflate", b"br", b"x-gzip", b"identity, gzip"])
def test_check_headers_refuses_a_content_encoded_request_body(value: bytes) -> None:
    with pytest.raises(Refusal) as caught:
        check_headers([(b"Content-Encoding", value)])
    assert violation(caught) == (415, "unsupported_media_type")
    check_headers([(b"Content-Encoding", b"identity")])


@pytest.mark.parametrize(
    "value",
    [b"close", b"keep-alive", b"Keep-Alive, Upgrade", b"TE, close", b"", b" , close"],
)
def test_check_headers_allows_connection_naming_hop_by_hop_headers(value: bytes) -> None:
    check_headers([(b"Connection", value)])


def test_forward_request_headers_keeps_every_end_to_end_header() -> None:
    headers = [(b"connection", b"close"), (b"x-job", b"1"), (b"content-type", b"text/plain")]
    assert forward_request_headers(headers) == [(b"x-job", b"1"), (b"content-type", b"text/plain")]


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_forward_request_headers_drops_every_hop_by_hop_header(name: bytes) -> None:
    assert forward_request_headers([(name.upper(), b"x"), (b"a", b"b")]) == [(b"a", b"b")]


# --- forward_response_headers --------------------------------------------------------------------


def test_forward_response_headers_keeps_canvas_headers() -> None:
    headers = [
        (b"Content-Type", b"application/json; charset=utf-8"),
        (b"Content-Encoding", b"gzip"),
        (b"Content-Length", b"123"),
        (b"Link", b'<https://x/api/v1/courses?page=2>; rel="next"'),
        (b"Location", b"https://x/files/1"),
        (b"Content-Disposition", b'attachment; filename="a.pdf"'),
        (b"X-Rate-Limit-Remaining", b"699.5"),
        (b"X-Request-Cost", b"0.3"),
        (b"X-Request-Context-Id", b"abc"),
        (b"Cache-Control", b"max-age=0, private, must-revalidate"),
        (b"ETag", b'W/"abc"'),
        (b"Last-Modified", b"Tue, 01 Jan 2030 00:00:00 GMT"),
        (b"Vary", b"Accept-Encoding"),
    ]
    assert forward_response_headers(headers) == headers


def test_forward_response_headers_drops_cookies_and_hop_by_hop_headers() -> None:
    headers = [
        (b"Set-Cookie", b"_csrf_token=x"),
        (b"set-cookie", b"log_session_id=y"),
        (b"Connection", b"keep-alive, X-Internal"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Internal", b"1"),
        (b"Date", b"Tue, 01 Jan 2030 00:00:00 GMT"),
        (b"Content-Type", b"application/json"),
    ]
    assert forward_response_headers(headers) == [(b"Content-Type", b"application/json")]


# --- redact_query ------------------------------------------------------------------------------


def fake_hmac(value: str) -> str:
    return "h:" + hashlib.sha256(value.encode()).hexdigest()[:8]


def test_redact_query_hashes_sensitive_values_and_keeps_the_rest() -> None:
    redacted = redact_query(b"per_page=10&access_token=s3cr%65t&page=2", fake_hmac)
    assert redacted == f"per_page=10&access_token={fake_hmac('s3cret')}&page=2"


@pytest.mark.parametrize("key", sorted(SENSITIVE_QUERY_KEYS))
def test_redact_query_hashes_every_sensitive_key(key: str) -> None:
    assert redact_query(f"{key}=secret".encode(), fake_hmac) == f"{key}={fake_hmac('secret')}"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"access_token[]=secret", "access_token[]=HASH"),
        (b"access%5Ftoken=secret", "access%5Ftoken=HASH"),
        (b"ACCESS_TOKEN=secret", "ACCESS_TOKEN=HASH"),
        (b"a=1;token=secret", "a=1;token=HASH"),
        (b"a=1& code=secret", "a=1& code=HASH"),
        (b"password=secret&password=secret", "password=HASH&password=HASH"),
        (b"code=a+b%20c", "code=" + fake_hmac("a b c")),
        (b"course[access_token]=secret", "course[access_token]=HASH"),
        (b"pseudonym[password]=secret&x=1", "pseudonym[password]=HASH&x=1"),
    ],
)
def test_redact_query_normalises_key_names(query: bytes, expected: str) -> None:
    assert redact_query(query, fake_hmac) == expected.replace("HASH", fake_hmac("secret"))


@pytest.mark.parametrize(
    "query",
    [b"", b"per_page=10", b"a&b&&c=", b"token", b"include[]=x&q=%C3%A9", b"tokens=1&codes=2"],
)
def test_redact_query_keeps_insensitive_queries_as_sent(query: bytes) -> None:
    assert redact_query(query, fake_hmac) == query.decode()


def test_redact_query_accepts_a_custom_key_set() -> None:
    assert redact_query(b"sig=x&token=y", fake_hmac, frozenset({"sig"})) == (
        f"sig={fake_hmac('x')}&token=y"
    )


@pytest.mark.parametrize(
    "query", [b"access_token=secret%", b"access_token=%zzsecret", b"a=\xffsecret", b"a=%FF"]
)
def test_redact_query_never_returns_unparseable_input(query: bytes) -> None:
    redacted = redact_query(query, fake_hmac)
    assert redacted == f"<malformed query: {len(query)} bytes>"
    assert "secret" not in redacted


@settings(max_examples=300)
@given(st.text(min_size=1).filter(lambda value: "&" not in value and ";" not in value))
def test_redact_query_never_leaks_a_token_value(secret: str) -> None:
    query = b"a=1&access_token=" + secret.encode().replace(b"%", b"%25")
    expected = "a=1&access_token=" + fake_hmac(secret.replace("+", " "))
    assert redact_query(query, fake_hmac) == expected


# --- Shortcuts agree with the full readings ------------------------------------------------

QUERY_ALPHABET = st.sampled_from(
    ["a", "page", "per_page", "as_user_id", "_method", "me", "include", "includes", "uuid",
     "x", "1", "=", "&", "[", "]", "%", "%41", ";", " ", "+", "token", "Token", ".", "~"]
)  # fmt: skip


def _outcome(check: Callable[[], None]) -> tuple[int, str] | None:
    try:
        check()
    except Refusal as exc:
        return exc.status, exc.error
    return None


@settings(max_examples=3000)
@given(st.lists(QUERY_ALPHABET, max_size=12), st.booleans(), st.booleans())
def test_the_plain_query_shortcut_decides_as_reading_every_pair(
    parts: list[str], masquerade: bool, includes: bool
) -> None:
    query = "".join(parts).encode()
    flags = {"allow_masquerade": masquerade, "allow_includes": includes}
    assert _outcome(lambda: check_query(query, **flags)) == _outcome(
        lambda: check_query_pairs(query, **flags)
    )


@settings(max_examples=3000)
@given(st.lists(QUERY_ALPHABET, max_size=12))
def test_the_redaction_shortcut_redacts_as_reading_every_pair(parts: list[str]) -> None:
    query = "".join(parts).encode()
    keys = SENSITIVE_QUERY_KEYS | {"Per_Page"}
    assert redact_query(query, lambda v: f"<{v}>", keys) == redact_pairs(
        query, lambda v: f"<{v}>", keys
    )


SECRET = b"worker-token-0001"


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ([(b"content-type", b"application/json")], None),
        ([(b"location", b"https://x.invalid/?access_token=worker-token-0001")], b"location"),
        ([(b"link", b"<https://x.invalid/?t=worker%2Dtoken%2D0001>")], b"link"),
        ([(b"link", b"<https://x.invalid/?t=worker%2Dtoken>"), (b"x-a", SECRET)], b"x-a"),
        ([(b"x-a", b"100%"), (b"x-b", b"worker-token-000")], None),
    ],
)
def test_the_header_carrying_the_worker_token_is_named(
    headers: list[tuple[bytes, bytes]], named: bytes | None
) -> None:
    assert header_carrying(headers, SECRET) == named


@settings(max_examples=500)
@given(
    st.lists(
        st.tuples(
            st.binary(max_size=2),
            st.lists(st.sampled_from([b"tok%", b"tok", b"%", b"%25", b"%74", b"ok", b"x"])).map(
                b"".join
            ),
        ),
        max_size=4,
    )
)
def test_header_carrying_finds_what_a_membership_test_finds(
    headers: list[tuple[bytes, bytes]],
) -> None:
    secret = b"tok%"
    expected = next(
        (
            name
            for name, value in headers
            if secret in value or (b"%" in value and secret in unquote_to_bytes(value))
        ),
        None,
    )
    assert header_carrying(headers, secret) == expected
