"""Tests for rewriting upstream URLs to the broker's public URL."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.rewrite import Rewriter

UPSTREAM = "https://school.instructure.com"
PUBLIC = "https://broker.example.edu"


@pytest.fixture
def rewriter() -> Rewriter:
    return Rewriter(UPSTREAM, PUBLIC)


# --- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "ftp://school.instructure.com",
        "school.instructure.com",
        "https://",
        "https://school.instructure.com/api",
        "https://school.instructure.com?x=1",
        "https://user@school.instructure.com",
        "https://school.instructure.com:abc",
        "https://[::1",
    ],
)
def test_rewriter_refuses_an_upstream_that_is_not_an_origin(origin: str) -> None:
    with pytest.raises(ValueError, match="upstream origin"):
        Rewriter(origin, PUBLIC)


@pytest.mark.parametrize(
    "base", ["broker.example.edu", "https://broker.example.edu/", "https://b.example/x?y", ""]
)
def test_rewriter_refuses_a_bad_public_base(base: str) -> None:
    with pytest.raises(ValueError, match="public base"):
        Rewriter(UPSTREAM, base)


def test_rewriter_tolerates_a_trailing_slash_on_the_upstream(rewriter: Rewriter) -> None:
    other = Rewriter(UPSTREAM + "/", PUBLIC)
    assert other.url(UPSTREAM + "/api/v1/x") == rewriter.url(UPSTREAM + "/api/v1/x")


# --- url ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"{UPSTREAM}/api/v1/courses?page=2", f"{PUBLIC}/api/v1/courses?page=2"),
        ("HTTPS://School.Instructure.COM/api/v1/x", f"{PUBLIC}/api/v1/x"),
        ("https://school.instructure.com:443/api/v1/x", f"{PUBLIC}/api/v1/x"),
        ("https://school.instructure.com:/api/v1/x", f"{PUBLIC}/api/v1/x"),
        (UPSTREAM, PUBLIC),
        (f"{UPSTREAM}?x=1", f"{PUBLIC}?x=1"),
        (f"{UPSTREAM}#frag", f"{PUBLIC}#frag"),
        (
            f"{UPSTREAM}/api/v1/Courses/%2F%zz?Q=A+B&x=%E9#F",
            f"{PUBLIC}/api/v1/Courses/%2F%zz?Q=A+B&x=%E9#F",
        ),
    ],
)
def test_url_rewrites_upstream_urls_keeping_path_and_query(
    rewriter: Rewriter, value: str, expected: str
) -> None:
    assert rewriter.url(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "https://inst-fs-iad-prod.inscloudgate.net/files/1/download?token=abc",
        "https://school.instructure.com.evil.example/api/v1/x",
        "https://evil.example/school.instructure.com/api/v1/x",
        "https://evil.example?u=https://school.instructure.com/",
        "http://school.instructure.com/api/v1/x",
        "https://school.instructure.com:8443/api/v1/x",
        "https://user@school.instructure.com/api/v1/x",
        "https://school.instructure.com@evil.example/api/v1/x",
        "//school.instructure.com/api/v1/x",
        "/api/v1/courses?page=2",
        "api/v1/courses",
        "",
        " https://school.instructure.com/api/v1/x",
        "mailto:someone@school.instructure.com",
        "https://[::1]/api/v1/x",
    ],
)
def test_url_leaves_other_urls_unchanged(rewriter: Rewriter, value: str) -> None:
    assert rewriter.url(value) == value


def test_url_compares_default_ports_both_ways() -> None:
    rewriter = Rewriter("http://canvas.local:80", "http://localhost:8080")
    assert rewriter.url("http://canvas.local/api/v1/x") == "http://localhost:8080/api/v1/x"
    assert rewriter.url("http://CANVAS.local:80/api/v1/x") == "http://localhost:8080/api/v1/x"
    assert rewriter.url("https://canvas.local/api/v1/x") == "https://canvas.local/api/v1/x"


def test_url_handles_explicit_ports_and_ipv6_upstreams() -> None:
    rewriter = Rewriter("http://[::1]:3000", "https://broker.example.edu/prefix")
    assert (
        rewriter.url("http://[::1]:3000/api/v1/x") == "https://broker.example.edu/prefix/api/v1/x"
    )
    assert rewriter.url("http://[::1]/api/v1/x") == "http://[::1]/api/v1/x"


def test_location_rewrites_like_url(rewriter: Rewriter) -> None:
    assert rewriter.location(f"{UPSTREAM}/courses/1/files/2/download") == (
        f"{PUBLIC}/courses/1/files/2/download"
    )
    assert (
        rewriter.location("https://s3.amazonaws.com/x?sig=1") == "https://s3.amazonaws.com/x?sig=1"
    )


# --- link_header -------------------------------------------------------------------------------


def canvas_link(origin: str, separator: str = ",") -> str:
    query = "?page={}&per_page=10"
    return separator.join(
        f'<{origin}/api/v1/courses/1/assignments{query.format(page)}>; rel="{rel}"'
        for page, rel in [
            ("1", "current"),
            ("2", "next"),
            ("first", "prev"),
            ("first", "first"),
            ("bookmark:WzEyM10", "last"),
        ]
    )


@pytest.mark.parametrize("separator", [",", ", ", ",\t", " , "])
def test_link_header_rewrites_all_five_canvas_rels(rewriter: Rewriter, separator: str) -> None:
    header = canvas_link(UPSTREAM, separator)
    assert rewriter.link_header(header) == canvas_link(PUBLIC, separator)


def test_link_header_keeps_other_hosts_and_parameters_byte_for_byte(rewriter: Rewriter) -> None:
    header = (
        f'<{UPSTREAM}/a?b=1>;rel=next;title="a, <b>; c",'
        '  <https://other.example/x>; rel="last" ; type="text/html",'
        f'<{UPSTREAM}/c>; rel="first"; title="q\\"uote, <{UPSTREAM}/d>"'
    )
    expected = (
        f'<{PUBLIC}/a?b=1>;rel=next;title="a, <b>; c",'
        '  <https://other.example/x>; rel="last" ; type="text/html",'
        f'<{PUBLIC}/c>; rel="first"; title="q\\"uote, <{UPSTREAM}/d>"'
    )
    assert rewriter.link_header(header) == expected


def test_link_header_rewrites_relative_links_unchanged(rewriter: Rewriter) -> None:
    header = '</api/v1/x?page=2>; rel="next"'
    assert rewriter.link_header(header) == header


@pytest.mark.parametrize(
    "header",
    [
        "",
        f"{UPSTREAM}/api/v1/x",
        f'<{UPSTREAM}/api/v1/x; rel="next"',
        f'x <{UPSTREAM}/api/v1/x>; rel="next"',
        f'<{UPSTREAM}/a>; rel="next", garbage <{UPSTREAM}/b>',
        f'<{UPSTREAM}/a>; title="unterminated, <{UPSTREAM}/b>',
    ],
)
def test_link_header_leaves_unparseable_headers_unchanged(rewriter: Rewriter, header: str) -> None:
    assert rewriter.link_header(header) == header


def test_link_header_tolerates_empty_list_elements(rewriter: Rewriter) -> None:
    header = f' , <{UPSTREAM}/a>; rel="next",, '
    assert rewriter.link_header(header) == f' , <{PUBLIC}/a>; rel="next",, '


# --- json_body ---------------------------------------------------------------------------------


def test_json_body_rewrites_pagination_urls_byte_for_byte(rewriter: Rewriter) -> None:
    body = (
        b'{"data": [{"url": "https://school.instructure.com/api/v1/x"}],\n'
        b' "meta" : {"count": 3, "pagination": {\n'
        b'   "current": "https://school.instructure.com/api/v1/x?page=1\\u0026per_page=2",\n'
        b'   "next":"https:\\/\\/school.instructure.com\\/api\\/v1\\/x?page=2&per_page=2",\n'
        b'   "last": "https://other.example/api/v1/x?page=9",\n'
        b'   "first": "/api/v1/x?page=1", "per_page": 2, "prev": null}},\n'
        b' "links": {"next": "https://school.instructure.com/api/v1/x?page=2"}}'
    )
    expected = (
        b'{"data": [{"url": "https://school.instructure.com/api/v1/x"}],\n'
        b' "meta" : {"count": 3, "pagination": {\n'
        b'   "current": "https://broker.example.edu/api/v1/x?page=1\\u0026per_page=2",\n'
        b'   "next":"https:\\/\\/broker.example.edu\\/api\\/v1\\/x?page=2&per_page=2",\n'
        b'   "last": "https://other.example/api/v1/x?page=9",\n'
        b'   "first": "/api/v1/x?page=1", "per_page": 2, "prev": null}},\n'
        b' "links": {"next": "https://school.instructure.com/api/v1/x?page=2"}}'
    )
    assert rewriter.json_body(body) == expected


def test_json_body_handles_escapes_inside_the_origin(rewriter: Rewriter) -> None:
    body = b'{"meta": {"pagination": {"next": "https\\u003a//School.instructure.com/\\u00e9"}}}'
    assert rewriter.json_body(body) == (
        b'{"meta": {"pagination": {"next": "https://broker.example.edu/\\u00e9"}}}'
    )


def test_json_body_keeps_non_ascii_text_as_utf8(rewriter: Rewriter) -> None:
    body = (
        '{"name": "caf\u00e9 \U0001f600", "meta": {"pagination": '
        '{"next": "https://school.instructure.com/x?q=\u00e9t\u00e9"}}}'
    ).encode()
    assert rewriter.json_body(body) == body.replace(
        b"https://school.instructure.com", b"https://broker.example.edu"
    )


def test_json_body_counts_an_escaped_surrogate_pair_as_one_character() -> None:
    rewriter = Rewriter("https://\U0001f600.example", PUBLIC)
    body = b'{"meta": {"pagination": {"next": "https://\\ud83d\\ude00.example/\\ud83d\\ude00?a"}}}'
    assert rewriter.json_body(body) == (
        b'{"meta": {"pagination": {"next": "https://broker.example.edu/\\ud83d\\ude00?a"}}}'
    )


def test_json_body_rewrites_every_duplicate_meta(rewriter: Rewriter) -> None:
    body = (
        b'{"meta": {"pagination": {"next": "https://school.instructure.com/a"}},'
        b' "meta": {"pagination": {"next": "https://school.instructure.com/b"}}}'
    )
    assert rewriter.json_body(body) == body.replace(
        b"https://school.instructure.com", b"https://broker.example.edu"
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b'"https://school.instructure.com/x"',
        b'["https://school.instructure.com/x"]',
        b'{"meta": {"pagination": {"next": "https://school.instructure.com/a"}}',
        b'{"pagination": {"next": "https://school.instructure.com/a"}}',
        b'{"meta": {"next": "https://school.instructure.com/a"}}',
        b'{"meta": {"pagination": ["https://school.instructure.com/a"]}}',
        b'{"meta": {"pagination": {"next": ["https://school.instructure.com/a"]}}}',
        b'{"meta": {"pagination": {"next": {"href": "https://school.instructure.com/a"}}}}',
        b'{"meta": [{"pagination": {"next": "https://school.instructure.com/a"}}]}',
        b'{"data": {"meta": {"pagination": {"next": "https://school.instructure.com/a"}}}}',
        b'{"meta": {"pagination": {"next": "https://other.example/a", "n": 1}}}',
        b'{"meta": {"pagination": {}}}',
        b'{"meta": {"pagination": {"next": "https://school.instructure.com/a"}}} trailing',
        b"[" * 100_000,
    ],
)
def test_json_body_returns_none_when_nothing_changes(rewriter: Rewriter, body: bytes) -> None:
    assert rewriter.json_body(body) is None


URL_TAILS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)


@settings(max_examples=300)
@given(
    tails=st.lists(URL_TAILS, min_size=1, max_size=4),
    escape_slashes=st.booleans(),
    ensure_ascii=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
)
def test_json_body_changes_only_the_pagination_origins(
    tails: list[str], escape_slashes: bool, ensure_ascii: bool, indent: int | None
) -> None:
    rewriter = Rewriter(UPSTREAM, PUBLIC)
    document = {
        "items": [UPSTREAM + "/" + tail for tail in tails],
        "meta": {"pagination": {f"k{i}": UPSTREAM + "/" + t for i, t in enumerate(tails)}},
    }
    text = json.dumps(document, ensure_ascii=ensure_ascii, indent=indent)
    if escape_slashes:
        text = text.replace("/", "\\/")
    result = rewriter.json_body(text.encode())
    assert result is not None
    parsed = json.loads(result)
    assert parsed["items"] == document["items"]
    assert parsed["meta"]["pagination"] == {f"k{i}": PUBLIC + "/" + t for i, t in enumerate(tails)}
    public = PUBLIC.replace("/", "\\/") if escape_slashes else PUBLIC
    upstream = UPSTREAM.replace("/", "\\/") if escape_slashes else UPSTREAM
    head, meta, tail = text.partition('"meta"')
    assert result.decode().startswith(head + meta)
    assert result.decode()[len(head + meta) :] == tail.replace(upstream, public)


def _reference_link_header(rewriter: Rewriter, value: str) -> str:
    """The Link grammar read character by character: the oracle for the regex scanner."""
    out: list[str] = []
    expect_link, index = True, 0
    while index < len(value):
        char = value[index]
        if expect_link and char == "<":
            close = value.find(">", index)
            if close < 0:
                return value
            out.append(f"<{rewriter.url(value[index + 1 : close])}>")
            index, expect_link = close + 1, False
            continue
        if expect_link and char not in " \t,":
            return value
        if char == '"':
            close = index + 1
            while close < len(value) and value[close] != '"':
                close += 2 if value[close] == "\\" else 1
            if close >= len(value):
                return value
            out.append(value[index : close + 1])
            index = close + 1
            continue
        expect_link = expect_link or char == ","
        out.append(char)
        index += 1
    return "".join(out)


LINK_PIECES = st.sampled_from(
    [
        "<",
        ">",
        ",",
        " ",
        "\t",
        '"',
        "\\",
        ";",
        "rel=",
        "next",
        UPSTREAM,
        UPSTREAM.upper(),
        UPSTREAM + ":443",
        UPSTREAM + "0",
        "https://other.example",
        "/api/v1/courses?page=2",
        "?x",
        "#f",
        "@evil",
    ]
)


@settings(max_examples=2000)
@given(st.lists(LINK_PIECES, max_size=16).map("".join))
def test_link_header_agrees_with_the_character_by_character_reading(value: str) -> None:
    rewriter = Rewriter(UPSTREAM, PUBLIC)
    assert rewriter.link_header(value) == _reference_link_header(rewriter, value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (UPSTREAM, PUBLIC),
        (UPSTREAM + "/api/v1/x?page=2", PUBLIC + "/api/v1/x?page=2"),
        (UPSTREAM + "?q", PUBLIC + "?q"),
        (UPSTREAM + "#f", PUBLIC + "#f"),
        (UPSTREAM + "0/api", UPSTREAM + "0/api"),
        (UPSTREAM + ".evil.example/api", UPSTREAM + ".evil.example/api"),
        (UPSTREAM + "@evil.example/api", UPSTREAM + "@evil.example/api"),
        (UPSTREAM + ":443/api", PUBLIC + "/api"),
        ("HTTPS://SCHOOL.instructure.com/api", PUBLIC + "/api"),
    ],
)
def test_url_rewrites_only_the_upstream_origin(url: str, expected: str) -> None:
    assert Rewriter(UPSTREAM, PUBLIC).url(url) == expected


@pytest.mark.parametrize("links", [1, 40, 5000])
def test_link_header_scans_hostile_headers_in_one_pass(links: int) -> None:
    rewriter = Rewriter(UPSTREAM, PUBLIC)
    # Links without commas between them, then an unterminated quote: a backtracking matcher
    # would try every way of splitting the run before giving up.
    value = f"<{UPSTREAM}/a> " * links + '"'
    assert rewriter.link_header(value) == value
    assert (
        rewriter.link_header(value[:-1]) == f"<{PUBLIC}/a>" + f" <{UPSTREAM}/a>" * (links - 1) + " "
    )
