"""Real clients (requests, canvasapi, curl) through a broker served by uvicorn on loopback.

What legitimate scripts send must still work, byte for byte, including following rewritten
pagination links; a link that leads outside the grant must be refused when followed, whoever
wrote it; and headers that try to move the links must not.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import pytest
import requests
from canvasapi import Canvas
from canvasapi.exceptions import Forbidden

from broker.serving import BackgroundServer
from tests.support import rawhttp

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from starlette.types import Receive, Scope, Send

    from broker.sim.server import SimServer
    from tests.e2e.conftest import LiveBroker

pytestmark = pytest.mark.filterwarnings(
    # canvasapi warns about plain-HTTP base URLs; loopback test servers are plain HTTP.
    "ignore:.*HTTP.*:UserWarning"
)

ASSIGNMENTS = "/api/v1/courses/1201/assignments"
GRANT = [
    "url:GET|/api/v1/courses/:id",
    "url:GET|/api/v1/courses/:course_id/assignments",
    "url:POST|/api/v1/courses/:course_id/assignments",
]
ONLY_1201 = {"id": ["1201", "sis_course_id:SIS-1201"], "course_id": ["1201"]}
PUBLIC = "https://broker.example.edu"


def _session(token: str) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    return session


def test_requests_follows_every_next_link_through_the_broker(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    client = live_broker.client(GRANT, ONLY_1201, allow_includes=True)
    session = _session(live_broker.token(*client))
    url: str | None = f"{live_broker.url}{ASSIGNMENTS}?per_page=10&include[]=submission"
    ids: list[int] = []
    for _ in range(10):
        if url is None:
            break
        response = session.get(url, timeout=10)
        assert response.status_code == 200, response.text
        ids += [assignment["id"] for assignment in response.json()]
        assert all(
            link["url"].startswith(f"{live_broker.url}{ASSIGNMENTS}?")
            for link in response.links.values()
        )
        url = response.links.get("next", {}).get("url")
    assert url is None
    assert len(ids) == len(set(ids)) == 35
    queries = [parse_qs(received.query_string) for received in sim.state.received]
    assert [query["page"] for query in queries[1:]] == [["2"], ["3"], ["4"]]
    assert all(query["include[]"] == ["submission"] for query in queries)
    assert [received.header("accept-encoding") for received in sim.state.received] == [
        session.headers["Accept-Encoding"]
    ] * 4


@pytest.mark.parametrize(
    "request_args",
    [
        pytest.param(
            {"json": {"assignment": {"name": "From requests", "points_possible": 5}}}, id="json"
        ),
        pytest.param(
            {"data": {"assignment[name]": "Form", "assignment[submission_types][]": ["a", "b"]}},
            id="form",
        ),
        pytest.param(
            {
                "data": {"assignment[name]": "Multipart"},
                "files": {"attachment": ("notes.txt", b"hello\r\n--x\r\n", "text/plain")},
            },
            id="multipart",
        ),
    ],
)
def test_requests_body_reaches_canvas_byte_for_byte(
    live_broker: LiveBroker, sim: SimServer, request_args: dict[str, Any]
) -> None:
    session = _session(live_broker.token(*live_broker.client(GRANT, ONLY_1201)))
    response = session.post(f"{live_broker.url}{ASSIGNMENTS}", timeout=10, **request_args)
    assert response.status_code == 201, response.text
    [received] = sim.state.received
    sent = response.request.body
    assert received.body == (sent.encode() if isinstance(sent, str) else sent)
    assert received.header("content-type") == response.request.headers["Content-Type"]
    assert response.json()["name"] in {"From requests", "Form", "Multipart"}


def test_canvasapi_creates_an_assignment_and_reads_a_course_by_listed_sis_id(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    canvas = Canvas(live_broker.url, live_broker.token(*live_broker.client(GRANT, ONLY_1201)))

    course = canvas.get_course("SIS-1201", use_sis_id=True)
    created = course.create_assignment({"name": "From canvasapi", "points_possible": 3})

    assert (course.id, created.name) == (1201, "From canvasapi")
    posted = sim.state.received[-1]
    assert (posted.method, posted.raw_path) == ("POST", ASSIGNMENTS)
    assert b"assignment%5Bname%5D=From+canvasapi" in posted.body
    assert sim.state.received[0].raw_path == "/api/v1/courses/sis_course_id:SIS-1201"


def test_canvasapi_cannot_reach_a_course_by_an_unlisted_alias(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    canvas = Canvas(live_broker.url, live_broker.token(*live_broker.client(GRANT, ONLY_1201)))
    with pytest.raises(Forbidden):
        canvas.get_course("SIS-1202", use_sis_id=True)
    assert sim.state.received == []


# --- curl ------------------------------------------------------------------------------------

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


def _curl(*args: str, cwd: Path | None = None) -> tuple[int, bytes]:
    """Run curl; return the HTTP status and what it printed before it."""
    assert CURL is not None
    done = subprocess.run(
        [CURL, "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args],
        capture_output=True,
        timeout=30,
        check=False,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr
    output, _, status = done.stdout.rpartition(b"\n")
    return int(status), output


@needs_curl
@pytest.mark.parametrize(
    ("args", "method", "body", "content_type"),
    [
        pytest.param(
            ["--compressed", "-G", "--data-urlencode", "search_term=Week 1"],
            "GET",
            b"",
            None,
            id="get-compressed",
        ),
        pytest.param(
            ["-d", "assignment[name]=Week 2&assignment[points_possible]=4"],
            "POST",
            b"assignment[name]=Week 2&assignment[points_possible]=4",
            "application/x-www-form-urlencoded",
            id="form-with-raw-brackets",
        ),
        pytest.param(
            ["--json", '{"assignment": {"name": "Week 3"}}'],
            "POST",
            b'{"assignment": {"name": "Week 3"}}',
            "application/json",
            id="json",
        ),
    ],
)
def test_curl_call_reaches_canvas_as_sent(
    live_broker: LiveBroker,
    sim: SimServer,
    args: list[str],
    method: str,
    body: bytes,
    content_type: str | None,
) -> None:
    token = live_broker.token(*live_broker.client(GRANT, ONLY_1201))
    status, text = _curl(
        "-H", f"Authorization: Bearer {token}", *args, f"{live_broker.url}{ASSIGNMENTS}"
    )
    assert status == (200 if method == "GET" else 201), text
    assert json.loads(text)
    [received] = sim.state.received
    assert (received.method, received.raw_path, received.body) == (method, ASSIGNMENTS, body)
    assert received.header("content-type") == content_type
    assert received.header("authorization") != f"Bearer {token}"


@needs_curl
def test_curl_multipart_upload_reaches_canvas(
    live_broker: LiveBroker, sim: SimServer, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_bytes(b"line one\r\n--boundary-like\r\n")
    token = live_broker.token(*live_broker.client(GRANT, ONLY_1201))
    status, text = _curl(
        "-H",
        f"Authorization: Bearer {token}",
        "-F",
        "assignment[name]=Upload",
        "-F",
        "attachment=@notes.txt",
        f"{live_broker.url}{ASSIGNMENTS}",
        cwd=tmp_path,
    )
    assert status == 201, text
    [received] = sim.state.received
    assert (received.header("content-type") or "").startswith("multipart/form-data; boundary=")
    assert b"line one\r\n--boundary-like\r\n" in received.body
    assert json.loads(text)["name"] == "Upload"


@needs_curl
@pytest.mark.parametrize(
    ("args", "target", "error"),
    [
        pytest.param(
            ["--path-as-is"],
            "/api/v1/courses/1202/../1201/assignments",
            "non_canonical_path",
            id="path-as-is",
        ),
        pytest.param(
            ["--request-target", f"http://other-host{ASSIGNMENTS}"],
            ASSIGNMENTS,
            "non_canonical_path",
            id="absolute-form",
        ),
        pytest.param(["-X", "DELETE"], "/api/v1/courses/1201", "scope_not_granted", id="delete"),
    ],
)
def test_curl_tricks_are_refused_and_audited(
    live_broker: LiveBroker, sim: SimServer, args: list[str], target: str, error: str
) -> None:
    client_id, secret = live_broker.client(GRANT, ONLY_1201)
    token = live_broker.token(client_id, secret)
    status, text = _curl(
        "-i", "-H", f"Authorization: Bearer {token}", *args, f"{live_broker.url}{target}"
    )
    response = rawhttp.parse(text)
    assert sim.state.received == []
    assert (status, response.json()["error"]) == (response.status, error)
    event = live_broker.proxy_event(response.header("x-request-id") or "")
    assert (event["decision"], event["reason"], event["client_id"]) == ("deny", error, client_id)


# --- links that lead outside the grant -------------------------------------------------------


class LyingCanvas:
    """An upstream whose pagination link leads to another course, recording what it gets."""

    def __init__(self) -> None:
        self.received: list[str] = []

    async def __call__(self, scope: Scope, _receive: Receive, send: Send) -> None:
        query = scope["query_string"].decode()
        self.received.append(scope["raw_path"].decode() + (f"?{query}" if query else ""))
        host = dict(scope["headers"])[b"host"].decode()
        headers = [(b"content-type", b"application/json; charset=utf-8")]
        if scope["raw_path"].endswith(b"/assignments"):
            body = json.dumps([{"id": 1, "name": "Only assignment", "course_id": 1201}])
            link = (
                f'<http://{host}/api/v1/courses/1202/assignments?page=2&per_page=100>; rel="next"'
            )
            headers.append((b"link", link.encode()))
        else:
            body = json.dumps({"id": 1201, "name": "Course 1201"})
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})


@pytest.fixture
def lying_canvas(live_broker: LiveBroker) -> Iterator[tuple[LyingCanvas, Callable[[], str]]]:
    """A lying upstream registered in ``live_broker``; yields it and a token factory."""
    upstream = LyingCanvas()
    with BackgroundServer(upstream, lifespan="off", name="lying canvas") as server:
        for path, payload in [
            ("/broker/v1/upstreams", {"name": "lying", "base_url": server.base_url}),
            (
                "/broker/v1/credentials",
                {
                    "upstream": "lying",
                    "name": "lying-worker",
                    "token": "lying-worker-token",
                    "verify": False,
                },
            ),
        ]:
            response = live_broker.http.post(path, json=payload)
            assert response.status_code == 201, response.text

        def token() -> str:
            return live_broker.token(
                *live_broker.client(GRANT, ONLY_1201, credential="lying-worker")
            )

        yield upstream, token


def test_following_a_link_to_another_course_is_refused(
    live_broker: LiveBroker, lying_canvas: tuple[LyingCanvas, Callable[[], str]]
) -> None:
    upstream, token = lying_canvas
    session = _session(token())
    first = session.get(f"{live_broker.url}{ASSIGNMENTS}", timeout=10)
    assert first.status_code == 200, first.text
    next_url = first.links["next"]["url"]
    assert next_url == f"{live_broker.url}/api/v1/courses/1202/assignments?page=2&per_page=100"

    followed = session.get(next_url, timeout=10)

    assert followed.status_code == 403
    assert followed.json()["error"] == "constraint_violation"
    assert upstream.received == [ASSIGNMENTS]
    event = live_broker.proxy_event(followed.headers["x-request-id"])
    assert (event["decision"], event["path"]) == ("deny", "/api/v1/courses/1202/assignments")


def test_canvasapi_following_a_link_to_another_course_raises_forbidden(
    live_broker: LiveBroker, lying_canvas: tuple[LyingCanvas, Callable[[], str]]
) -> None:
    upstream, token = lying_canvas
    course = Canvas(live_broker.url, token()).get_course(1201)
    with pytest.raises(Forbidden):
        list(course.get_assignments())
    assert upstream.received == ["/api/v1/courses/1201", f"{ASSIGNMENTS}?per_page=100"]


# --- headers that try to move the links --------------------------------------------------------


def _links(response: rawhttp.RawResponse) -> list[str]:
    link = response.header("link") or ""
    return [part.split(">", 1)[0].strip().lstrip("<") for part in link.split(",") if part]


def _raw_get(broker: LiveBroker, token: str, *headers: tuple[bytes, bytes]) -> rawhttp.RawResponse:
    request = rawhttp.build(
        f"GET {ASSIGNMENTS} HTTP/1.1".encode(),
        [
            *headers,
            (b"Authorization", f"Bearer {token}".encode()),
            (b"Connection", b"close"),
        ],
    )
    return rawhttp.exchange("127.0.0.1", broker.server.port, request)


HOST_TRICKS = (
    (b"Host", b"evil.example"),
    (b"X-Forwarded-Host", b"evil.example"),
    (b"X-Forwarded-Proto", b"http"),
    (b"Forwarded", b"host=evil.example;proto=http"),
)


def test_links_use_the_public_url_whatever_host_the_client_claims(
    make_live_broker: Callable[..., LiveBroker], sim: SimServer
) -> None:
    broker = make_live_broker(public_url=PUBLIC)
    response = _raw_get(broker, broker.token(*broker.client(GRANT, ONLY_1201)), *HOST_TRICKS)
    assert response.status == 200, response.body
    links = _links(response)
    assert len(links) == 4
    assert all(url.startswith(f"{PUBLIC}{ASSIGNMENTS}?") for url in links)
    [received] = sim.state.received
    assert received.header_values("host") == [f"127.0.0.1:{sim.port}"]
    assert not {name for name, _value in received.headers} & {"x-forwarded-host", "forwarded"}


def test_links_follow_the_clients_own_host_only_when_no_public_url_is_set(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    token = live_broker.token(*live_broker.client(GRANT, ONLY_1201))
    response = _raw_get(live_broker, token, *HOST_TRICKS)
    assert response.status == 200, response.body
    # The one client that sent the Host gets links to it; Canvas never saw it.
    assert all(url.startswith(f"http://evil.example{ASSIGNMENTS}?") for url in _links(response))
    [received] = sim.state.received
    assert received.header_values("host") == [f"127.0.0.1:{sim.port}"]
