"""Bypass attempts as raw HTTP/1.1 bytes against a broker served by uvicorn on loopback.

These are the attacks an HTTP client library will not send, or that ASGI test transports
cannot express: absolute-form and asterisk-form targets, fragments, raw control and non-ASCII
bytes in the request line, repeated or conflicting framing headers, chunked bodies, HTTP/1.0,
odd methods. For every attempt the test checks what the Canvas simulator received (nothing)
and either the broker's Canvas-shaped refusal with its ``deny`` audit event, or, where the HTTP
server itself rejects the bytes before the broker sees them, that rejection and that the broker
recorded nothing.

One broker serves the whole module (started once: it is a real server); each test mints
nothing new and finds its own audit event by request id.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import clean_database
from tests.e2e.conftest import serve_live_broker
from tests.support import rawhttp

if TYPE_CHECKING:
    from collections.abc import Iterator

    from broker.sim.server import SimServer
    from tests.e2e.conftest import LiveBroker, LiveCaller

LIMIT = 1024
ASSIGNMENTS = b"/api/v1/courses/1201/assignments"
GRANT = [
    "url:GET|/api/v1/courses/:course_id/assignments",
    "url:POST|/api/v1/courses/:course_id/assignments",
    "url:GET|/api/v1/courses/:id",
]
CONSTRAINTS = {"course_id": ["1201"], "id": ["1201"]}
JSON = (b"Content-Type", b"application/json")
FORM = (b"Content-Type", b"application/x-www-form-urlencoded")
NEW_ASSIGNMENT = b'{"assignment": {"name": "Week 36"}}'


@pytest.fixture(scope="module")
def broker(
    template_db: str, sim_server: SimServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveBroker]:
    database = clean_database(template_db, tmp_path_factory.mktemp("raw-http"))
    with serve_live_broker(database, sim_server, max_body_bytes=LIMIT) as live:
        yield live


@pytest.fixture(scope="module")
def caller(broker: LiveBroker) -> LiveCaller:
    return broker.caller(GRANT, CONSTRAINTS)


@dataclass(frozen=True)
class Attempt:
    """A request: its request line, then Host and Authorization (unless left out), then the
    given headers, ``Connection: close`` and the body (with a Content-Length unless the
    headers frame it)."""

    line: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    host: bool = True
    authorizations: int = 1

    def render(self, broker: LiveBroker, caller: LiveCaller) -> bytes:
        headers: list[tuple[bytes, bytes]] = []
        if self.host:
            headers.append((b"Host", f"127.0.0.1:{broker.server.port}".encode()))
        headers += [(b"Authorization", f"Bearer {caller.token}".encode())] * self.authorizations
        headers += self.headers
        framed = {name.lower() for name, _value in self.headers} & {
            b"content-length",
            b"transfer-encoding",
        }
        if self.body and not framed:
            headers.append((b"Content-Length", str(len(self.body)).encode()))
        headers.append((b"Connection", b"close"))
        return rawhttp.build(self.line, headers, self.body)


def get(target: bytes, *headers: tuple[bytes, bytes], version: bytes = b"HTTP/1.1") -> Attempt:
    return Attempt(b"GET " + target + b" " + version, headers)


def post(target: bytes, body: bytes, *headers: tuple[bytes, bytes]) -> Attempt:
    return Attempt(b"POST " + target + b" HTTP/1.1", headers, body)


def chunked(body: bytes, size: int = 256) -> bytes:
    chunks = [body[start : start + size] for start in range(0, len(body), size)]
    return b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for chunk in chunks) + (
        b"0\r\n\r\n"
    )


def send(broker: LiveBroker, caller: LiveCaller, attempt: Attempt) -> rawhttp.RawResponse:
    return rawhttp.exchange("127.0.0.1", broker.server.port, attempt.render(broker, caller))


def assert_broker_refused(
    broker: LiveBroker,
    sim: SimServer,
    response: rawhttp.RawResponse,
    status: int,
    error: str,
    caller: LiveCaller | None,
) -> dict[str, Any]:
    """The broker's own Canvas-shaped refusal, audited as deny, and nothing sent to Canvas."""
    assert sim.state.received == []
    assert response.status == status, response.body
    request_id = response.header("x-request-id")
    assert request_id
    body = response.json()
    assert body["error"] == error
    assert body["request_id"] == request_id
    assert body["errors"][0]["message"]
    event = broker.proxy_event(request_id)
    assert (event["decision"], event["reason"], event["status"]) == ("deny", error, status)
    assert event["upstream_status"] is None
    assert event["client_id"] == (caller.client_id if caller else None)
    assert event["token_id"] == (caller.token_id if caller else None)
    return event


def assert_server_rejected(
    broker: LiveBroker, sim: SimServer, response: rawhttp.RawResponse, seq_before: int
) -> None:
    """uvicorn refused the bytes as invalid HTTP: the broker never saw them, nor did Canvas."""
    assert sim.state.received == []
    assert response.status == 400
    assert response.header("x-request-id") is None
    assert response.body == b"Invalid HTTP request received."
    assert broker.newest_seq() == seq_before


REFUSED_BY_THE_BROKER = [
    # Request targets that are not an origin-form path.
    pytest.param(
        get(b"http://other-host" + ASSIGNMENTS), 400, "non_canonical_path", id="absolute-form"
    ),
    pytest.param(
        get(b"https://127.0.0.1" + ASSIGNMENTS),
        400,
        "non_canonical_path",
        id="absolute-form-https-own-host",
    ),
    pytest.param(
        get(b"http://127.0.0.1@other-host" + ASSIGNMENTS),
        400,
        "non_canonical_path",
        id="absolute-form-userinfo",
    ),
    pytest.param(
        get(b"http://other-host" + ASSIGNMENTS, version=b"HTTP/1.0"),
        400,
        "non_canonical_path",
        id="absolute-form-http-1.0",
    ),
    pytest.param(Attempt(b"OPTIONS * HTTP/1.1"), 400, "non_canonical_path", id="asterisk-form"),
    pytest.param(get(ASSIGNMENTS + b"#top"), 400, "non_canonical_path", id="fragment"),
    pytest.param(
        get(ASSIGNMENTS + b"?per_page=1#as_user_id=2"),
        400,
        "malformed_request",
        id="fragment-after-query",
    ),
    # Path tricks in the raw request line.
    pytest.param(
        get(b"/api/v1/courses/1201;as_user_id=2/assignments"),
        400,
        "non_canonical_path",
        id="semicolon-parameter",
    ),
    pytest.param(
        get(ASSIGNMENTS + b";jsessionid=1"), 400, "non_canonical_path", id="trailing-semicolon"
    ),
    pytest.param(
        get(b"/api/v1/courses/1202/../1201/assignments"), 400, "non_canonical_path", id="dot-dot"
    ),
    pytest.param(
        get(b"/api/v1/courses/1202/%2E%2e/1201/assignments"),
        400,
        "non_canonical_path",
        id="encoded-dot-dot-mixed-case",
    ),
    pytest.param(
        get(b"/api/v1/courses/1202/%252e%252e/1201/assignments"),
        400,
        "non_canonical_path",
        id="double-encoded-dot-dot",
    ),
    pytest.param(
        get(b"/api/v1/courses/1202/%C0%AE%C0%AE/1201/assignments"),
        400,
        "non_canonical_path",
        id="overlong-utf8-dot-dot",
    ),
    pytest.param(
        get(b"/api/v1/courses/1201%2Fassignments"), 400, "non_canonical_path", id="encoded-slash"
    ),
    pytest.param(
        get(b"/api/v1/courses/1201%5cassignments"),
        400,
        "non_canonical_path",
        id="encoded-backslash",
    ),
    pytest.param(get(ASSIGNMENTS + b"%00"), 400, "non_canonical_path", id="encoded-nul"),
    pytest.param(
        get(ASSIGNMENTS + b"%0d%0aX-Injected:%201"), 400, "non_canonical_path", id="encoded-crlf"
    ),
    pytest.param(get(b"/api/v1//courses/1201/assignments"), 400, "non_canonical_path", id="//"),
    pytest.param(get(ASSIGNMENTS + b"/"), 400, "non_canonical_path", id="trailing-slash"),
    pytest.param(get(ASSIGNMENTS + b"/" + b"a" * 3000), 414, "path_too_long", id="overlong-path"),
    pytest.param(get(b"/API/V1/courses/1201/assignments"), 403, "path_not_proxied", id="upper"),
    pytest.param(
        get(b"/api/v1/Courses/1201/Assignments"), 403, "scope_not_granted", id="mixed-case"
    ),
    pytest.param(
        get(ASSIGNMENTS + b".json.json"), 403, "scope_not_granted", id="double-format-suffix"
    ),
    pytest.param(get(ASSIGNMENTS + b".xml"), 403, "scope_not_granted", id="xml-format-suffix"),
    pytest.param(get(b"/api/v1/courses/1202.json"), 403, "constraint_violation", id="format-id"),
    pytest.param(
        get(b"/api/v1/courses/1201.json/assignments"),
        403,
        "constraint_violation",
        id="format-in-middle",
    ),
    pytest.param(
        get(b"/api/v1/courses/sis_course_id:1201/assignments"),
        403,
        "constraint_violation",
        id="sis-alias",
    ),
    pytest.param(
        get(b"/api/v1/courses/1~1201/assignments"), 403, "constraint_violation", id="shard-id"
    ),
    pytest.param(
        get(b"/api/v1/courses/%31%32%30%32/assignments"),
        403,
        "constraint_violation",
        id="encoded-other-course",
    ),
    pytest.param(
        get(b"/api/v1/courses/1202/assignments", version=b"HTTP/1.0"),
        403,
        "constraint_violation",
        id="http-1.0-outside-grant",
    ),
    pytest.param(
        Attempt(b"POST /login/session_token HTTP/1.1"), 403, "path_not_proxied", id="login"
    ),
    pytest.param(
        post(b"/api/graphql", b'{"query": "{ allCourses { id } }"}', JSON),
        403,
        "path_not_proxied",
        id="graphql",
    ),
    # Methods.
    pytest.param(
        Attempt(b"TRACE " + ASSIGNMENTS + b" HTTP/1.1"), 403, "scope_not_granted", id="TRACE"
    ),
    pytest.param(
        Attempt(b"OPTIONS " + ASSIGNMENTS + b" HTTP/1.1"), 403, "scope_not_granted", id="OPTIONS"
    ),
    pytest.param(
        Attempt(b"PROPFIND " + ASSIGNMENTS + b" HTTP/1.1"), 403, "scope_not_granted", id="PROPFIND"
    ),
    pytest.param(
        Attempt(b"DELETE /api/v1/courses/1201 HTTP/1.1"), 403, "scope_not_granted", id="DELETE"
    ),
    # Masquerade, method override and credentials in the raw query.
    pytest.param(get(ASSIGNMENTS + b"?as_user_id=2"), 403, "masquerade_denied", id="as_user_id"),
    pytest.param(
        get(ASSIGNMENTS + b"?course[as_user_id]=2"), 403, "masquerade_denied", id="nested-as-user"
    ),
    pytest.param(
        get(ASSIGNMENTS + b"?_method=DELETE"), 403, "method_override_denied", id="_method-query"
    ),
    pytest.param(
        get(ASSIGNMENTS + b"?become_user_id=2"), 403, "masquerade_denied", id="become_user_id"
    ),
    pytest.param(get(ASSIGNMENTS + b"?me"), 403, "masquerade_denied", id="me"),
    pytest.param(
        get(ASSIGNMENTS + b"?include[]=submission"), 403, "include_not_allowed", id="include"
    ),
    pytest.param(
        get(b"/api/v1/courses/1201%3Fas_user_id=2"),
        400,
        "non_canonical_path",
        id="encoded-question-mark",
    ),
    pytest.param(
        get(b"/api/v1/courses/1201%3bas_user_id=2"),
        400,
        "non_canonical_path",
        id="encoded-semicolon",
    ),
    pytest.param(
        get(b"/api/v1/courses/1201%23/assignments"), 400, "non_canonical_path", id="encoded-hash"
    ),
    # Headers.
    pytest.param(
        post(ASSIGNMENTS, b"as_user_id=2", JSON, (b"Connection", b"Content-Type")),
        400,
        "malformed_request",
        id="connection-drops-content-type",
    ),
    pytest.param(
        post(ASSIGNMENTS, NEW_ASSIGNMENT, JSON, (b"Connection", b"keep-alive, content-length")),
        400,
        "malformed_request",
        id="connection-drops-content-length",
    ),
    pytest.param(
        post(
            ASSIGNMENTS,
            gzip.compress(b"as_user_id=2&_method=DELETE"),
            FORM,
            (b"Content-Encoding", b"gzip"),
        ),
        415,
        "unsupported_media_type",
        id="gzipped-request-body",
    ),
    pytest.param(
        get(ASSIGNMENTS, (b"Connection", b"Authorization")),
        400,
        "malformed_request",
        id="connection-drops-authorization",
    ),
    pytest.param(
        get(ASSIGNMENTS, (b"X-HTTP-Method-Override", b"DELETE")),
        403,
        "method_override_denied",
        id="x-http-method-override",
    ),
    pytest.param(
        get(ASSIGNMENTS, (b"X_HTTP_Method_Override", b"DELETE")),
        403,
        "method_override_denied",
        id="override-header-with-underscores",
    ),
    pytest.param(
        get(ASSIGNMENTS, (b"Host", b"evil.example")),
        400,
        "malformed_request",
        id="second-host",
    ),
    pytest.param(
        post(ASSIGNMENTS, b'{"x": "&as_user_id=2"}', JSON, FORM),
        400,
        "malformed_request",
        id="two-content-types",
    ),
    pytest.param(
        post(
            ASSIGNMENTS,
            chunked(NEW_ASSIGNMENT),
            JSON,
            (b"Transfer-Encoding", b"gzip, chunked"),
        ),
        400,
        "malformed_request",
        id="transfer-coding-gzip",
    ),
    # Bodies.
    pytest.param(
        post(ASSIGNMENTS, chunked(b" " * (4 * LIMIT)), JSON, (b"Transfer-Encoding", b"chunked")),
        413,
        "body_too_large",
        id="chunked-over-limit",
    ),
    pytest.param(
        post(
            ASSIGNMENTS,
            b"",
            JSON,
            (b"Expect", b"100-continue"),
            (b"Content-Length", str(1024 * LIMIT).encode()),
        ),
        413,
        "body_too_large",
        id="declared-length-over-limit",
    ),
    pytest.param(
        post(
            ASSIGNMENTS,
            chunked(b'{"assignment": {"name": "x"}, "as_user_id": 2}', size=7),
            JSON,
            (b"Transfer-Encoding", b"chunked"),
        ),
        403,
        "masquerade_denied",
        id="chunked-json-as-user",
    ),
    pytest.param(
        post(ASSIGNMENTS, b'{"as_user_id": 2}', FORM),
        400,
        "malformed_body",
        id="form-type-json-body",
    ),
    pytest.param(
        post(
            ASSIGNMENTS,
            b'--b\r\nContent-Disposition: form-data; name="as_user_id"\r\n\r\n2\r\n--b--\r\n',
            FORM,
        ),
        400,
        "malformed_body",
        id="form-type-multipart-body",
    ),
    pytest.param(
        post(ASSIGNMENTS, b"as_user_id=2", JSON), 400, "malformed_body", id="json-type-form-body"
    ),
    pytest.param(
        post(ASSIGNMENTS, NEW_ASSIGNMENT, (b"Content-Type", b"multipart/form-data; boundary=b")),
        400,
        "malformed_body",
        id="multipart-type-json-body",
    ),
    pytest.param(
        post(ASSIGNMENTS, NEW_ASSIGNMENT, (b"Content-Type", b"text/plain")),
        415,
        "unsupported_media_type",
        id="text-type-json-body",
    ),
    pytest.param(
        post(ASSIGNMENTS, b'{"as_user_id": 2}'), 415, "unsupported_media_type", id="no-type"
    ),
    pytest.param(
        post(
            ASSIGNMENTS,
            gzip.compress(b'{"as_user_id": 2}'),
            JSON,
            (b"Content-Encoding", b"gzip"),
        ),
        415,
        "unsupported_media_type",
        id="gzipped-json-body",
    ),
]


@pytest.mark.parametrize(("attempt", "status", "error"), REFUSED_BY_THE_BROKER)
def test_attempt_is_refused_by_the_broker_and_never_reaches_canvas(
    broker: LiveBroker,
    caller: LiveCaller,
    sim: SimServer,
    attempt: Attempt,
    status: int,
    error: str,
) -> None:
    response = send(broker, caller, attempt)
    assert_broker_refused(broker, sim, response, status, error, caller)


def test_two_authorization_headers_are_refused_as_a_malformed_token(
    broker: LiveBroker, caller: LiveCaller, sim: SimServer
) -> None:
    response = send(broker, caller, Attempt(b"GET " + ASSIGNMENTS + b" HTTP/1.1", authorizations=2))
    assert_broker_refused(broker, sim, response, 401, "malformed_token", None)
    assert response.header("www-authenticate") == (
        'Bearer realm="canvas-token-broker", error="invalid_token"'
    )


def test_refused_credential_parameter_is_audited_without_its_value(
    broker: LiveBroker, caller: LiveCaller, sim: SimServer
) -> None:
    response = send(broker, caller, get(ASSIGNMENTS + b"?access_token=stolen-canvas-token"))
    event = assert_broker_refused(broker, sim, response, 403, "credential_param_denied", caller)
    assert event["query"].startswith("access_token=")
    assert "stolen-canvas-token" not in json.dumps(broker.proxy_events())


REJECTED_BY_THE_SERVER = [
    pytest.param(get(ASSIGNMENTS + b"\x00"), id="nul"),
    pytest.param(get(b"/api/v1/courses/1201\x01/assignments"), id="control-byte"),
    pytest.param(get(b"/api/v1/courses/1201\x7f/assignments"), id="delete-byte"),
    pytest.param(get(b"/api/v1/courses/12\t01/assignments"), id="tab"),
    pytest.param(get(b"/api/v1/courses/12 01/assignments"), id="space"),
    pytest.param(get("/api/v1/courses/caf\u00e9/assignments".encode()), id="utf8"),
    pytest.param(get(b"/api/v1/courses/caf\xe9/assignments"), id="latin-1"),
    pytest.param(Attempt(b"CONNECT other-host:443 HTTP/1.1"), id="CONNECT"),
    pytest.param(Attempt(b"get " + ASSIGNMENTS + b" HTTP/1.1"), id="lower-case-method"),
    pytest.param(Attempt(b"FOO " + ASSIGNMENTS + b" HTTP/1.1"), id="unknown-method"),
    pytest.param(
        post(ASSIGNMENTS, b"{}", JSON, (b"Content-Length", b"2"), (b"Content-Length", b"30")),
        id="two-content-lengths",
    ),
    pytest.param(
        post(ASSIGNMENTS, b"{}", JSON, (b"Content-Length", b"2"), (b"Content-Length", b"2")),
        id="two-equal-content-lengths",
    ),
    pytest.param(
        post(
            ASSIGNMENTS,
            chunked(b"{}"),
            JSON,
            (b"Content-Length", b"2"),
            (b"Transfer-Encoding", b"chunked"),
        ),
        id="content-length-and-chunked",
    ),
    pytest.param(
        post(
            ASSIGNMENTS,
            chunked(b"{}"),
            JSON,
            (b"Transfer-Encoding", b"chunked"),
            (b"Transfer-Encoding", b"chunked"),
        ),
        id="two-transfer-encodings",
    ),
    pytest.param(get(ASSIGNMENTS, (b"X-HTTP-Method-Override ", b"DELETE")), id="space-in-name"),
    pytest.param(
        get(ASSIGNMENTS, (b"X-Job", b"a\r\n X-HTTP-Method-Override: DELETE")), id="folded-header"
    ),
]


@pytest.mark.parametrize("attempt", REJECTED_BY_THE_SERVER)
def test_invalid_http_is_rejected_by_the_server_before_the_broker(
    broker: LiveBroker, caller: LiveCaller, sim: SimServer, attempt: Attempt
) -> None:
    seq_before = broker.newest_seq()
    response = send(broker, caller, attempt)
    assert_server_rejected(broker, sim, response, seq_before)


def test_bare_line_feeds_are_rejected_by_the_server(
    broker: LiveBroker, caller: LiveCaller, sim: SimServer
) -> None:
    seq_before = broker.newest_seq()
    request = get(ASSIGNMENTS).render(broker, caller).replace(b"\r\n", b"\n")
    response = rawhttp.exchange("127.0.0.1", broker.server.port, request)
    assert_server_rejected(broker, sim, response, seq_before)


def _link_urls(response: rawhttp.RawResponse) -> list[str]:
    link = response.header("link")
    assert link
    return [part.split(">", 1)[0].strip().lstrip("<") for part in link.split(",")]


def test_forwarding_headers_change_neither_canvas_links_nor_the_brokers(
    broker: LiveBroker, caller: LiveCaller, sim: SimServer
) -> None:
    attempt = get(
        ASSIGNMENTS,
        (b"X-Forwarded-Host", b"evil.example"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Port", b"8443"),
        (b"X-Forwarded-For", b"203.0.113.9"),
        (b"Forwarded", b"for=203.0.113.9;host=evil.example;proto=https"),
    )
    response = send(broker, caller, attempt)
    assert response.status == 200, response.body
    [received] = sim.state.received
    names = {name for name, _value in received.headers}
    assert not {name for name in names if name.startswith("x-forwarded-")}
    assert "forwarded" not in names
    assert received.header_values("host") == [f"127.0.0.1:{sim.port}"]
    urls = _link_urls(response)
    assert len(urls) == 4
    assert all(url.startswith(f"{broker.url}/api/v1/courses/1201/assignments?") for url in urls)
    event = broker.proxy_event(response.header("x-request-id") or "")
    assert (event["decision"], event["source_ip"]) == ("allow", "127.0.0.1")


def test_granted_call_over_http_1_0_is_forwarded(
    broker: LiveBroker, caller: LiveCaller, sim: SimServer
) -> None:
    attempt = Attempt(b"GET " + ASSIGNMENTS + b" HTTP/1.0", host=False)
    response = send(broker, caller, attempt)
    assert response.status == 200, response.body
    assert [(r.method, r.target) for r in sim.state.received] == [("GET", ASSIGNMENTS.decode())]
    assert len(response.json()) == 10
    assert len(response.header_values("date")) == 1


def test_expect_continue_body_is_forwarded_once_without_the_expectation(
    broker: LiveBroker, caller: LiveCaller, sim: SimServer
) -> None:
    attempt = post(ASSIGNMENTS, NEW_ASSIGNMENT, JSON, (b"Expect", b"100-continue"))
    response = send(broker, caller, attempt)
    assert response.status == 201, response.body
    [received] = sim.state.received
    assert received.body == NEW_ASSIGNMENT
    assert received.header("expect") is None


def test_chunked_body_within_the_limit_is_forwarded_byte_for_byte(
    broker: LiveBroker, caller: LiveCaller, sim: SimServer
) -> None:
    body = json.dumps({"assignment": {"name": "Chunked", "description": "x" * 500}}).encode()
    attempt = post(ASSIGNMENTS, chunked(body, size=100), JSON, (b"Transfer-Encoding", b"chunked"))
    response = send(broker, caller, attempt)
    assert response.status == 201, response.body
    [received] = sim.state.received
    assert received.body == body
    assert received.header("content-length") == str(len(body))
    assert received.header("transfer-encoding") is None


def test_chunked_trailers_are_neither_read_nor_forwarded(
    broker: LiveBroker, caller: LiveCaller, sim: SimServer
) -> None:
    # The parser reports trailer fields like header fields; arriving in the same packet as the
    # head, they would otherwise join the headers the broker checks and forwards.
    trailers = (
        b"X-HTTP-Method-Override: DELETE\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"X-Trailer-Marker: 1\r\n\r\n"
    )
    body = chunked(NEW_ASSIGNMENT).removesuffix(b"\r\n") + trailers
    attempt = post(
        ASSIGNMENTS, body, JSON, (b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X-Trailer")
    )
    response = send(broker, caller, attempt)
    assert response.status == 201, response.body
    [received] = sim.state.received
    assert received.body == NEW_ASSIGNMENT
    assert received.header_values("content-type") == ["application/json"]
    assert received.header("x-http-method-override") is None
    assert received.header("x-trailer-marker") is None
    assert received.header("trailer") is None
    assert received.method == "POST"


def test_pipelined_request_after_a_granted_one_is_checked_on_its_own(
    broker: LiveBroker, caller: LiveCaller, sim: SimServer
) -> None:
    granted = get(ASSIGNMENTS + b"?per_page=1").render(broker, caller)
    granted = granted.replace(b"Connection: close", b"Connection: keep-alive")
    smuggled = get(b"http://other-host/api/v1/courses/1202/assignments").render(broker, caller)
    first, second = rawhttp.exchange_all("127.0.0.1", broker.server.port, granted + smuggled)
    assert first.status == 200, first.body
    assert [r.target for r in sim.state.received] == [f"{ASSIGNMENTS.decode()}?per_page=1"]
    sim.state.received.clear()
    assert_broker_refused(broker, sim, second, 400, "non_canonical_path", caller)
