"""What the broker forwards, replayed into Rack: no forbidden key, no method override.

A battery of requests built from the ways Rack 2.2, 3.0 and 3.1 read parameters
(docs/proxy-rules.md): each goes through the broker to the Canvas simulator, and every
request the simulator received is read again the way each Rack release would read it (the
model in tests/support/rack_readings.py, and every real Rack this machine can run). Refused
requests must not have reached the simulator at all.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from broker.core.rules import CREDENTIAL_KEYS, MASQUERADE_KEYS, OVERRIDE_KEYS
from tests.proxy.support import make_caller, send_raw
from tests.support.rack_readings import RackRefused, RackRelease, RackUnmodelled, read_request
from tests.support.rack_readings import replay_request as rack_request
from tests.support.rack_replay import available_racks, replay_many

if TYPE_CHECKING:
    import httpx

    from broker.sim.state import ReceivedRequest
    from tests.support.env import BrokerEnv

FORBIDDEN = MASQUERADE_KEYS | OVERRIDE_KEYS | CREDENTIAL_KEYS
GRANT = [
    "url:POST|/api/v1/courses/:course_id/assignments",
    "url:GET|/api/v1/courses/:course_id/assignments",
    "url:PUT|/api/v1/courses/:course_id/assignments/:id",
]
ASSIGNMENTS = b"/api/v1/courses/1201/assignments"
B = "AaB03x"
MULTIPART = f"multipart/form-data; boundary={B}"
FORM = "application/x-www-form-urlencoded"


def parts(*heads: str, value: bytes = b"1") -> bytes:
    body = b"".join(f"--{B}\r\n{head}\r\n\r\n".encode() + value + b"\r\n" for head in heads)
    return body + f"--{B}--\r\n".encode()


def cd(params: str) -> str:
    return f"Content-Disposition: form-data; {params}"


NAME_A = cd('name="a"')
NAME_EVIL = cd('name="as_user_id"')
# (query, Content-Type or None, body): each one a reading of some Rack release, or innocent.
BATTERY: dict[str, tuple[bytes, str | None, bytes]] = {
    "query-semicolon": (b"a=1;as_user_id=2", None, b""),
    "query-spaces": (b"a=1&   as_user_id=2", None, b""),
    "query-brackets-2.2": (b"[as_user_id]=1&as_user_id]=1&]as_user_id=1", None, b""),
    "query-method": (b"_method=DELETE", None, b""),
    "query-become": (b"become_user_id=2", None, b""),
    "untyped-post": (b"", None, b"_method=DELETE&as_user_id=1"),
    "empty-type": (b"", "", b"_method=DELETE&as_user_id=1"),
    "multipart-no-boundary": (b"", "multipart/form-data", b"_method=PUT&as_user_id=1"),
    "multipart-mixed": (b"", f"multipart/mixed; boundary={B}", parts(cd('name="_method"'))),
    "multipart-related": (b"", f"multipart/related; boundary={B}", parts(cd('name="a"'))),
    "form-trailing-nul": (b"", FORM, b"as_user_id=1\x00"),
    "form-method-unicode": (b"", FORM, "_method=optio\u017f".encode()),
    "form-nested": (b"", FORM, b"assignment[name]=x&assignment[as_user_id]=2"),
    "name-in-filename": (b"", MULTIPART, parts(cd('name="a"; filename="x; name=as_user_id"'))),
    "name-in-param": (b"", MULTIPART, parts(cd('name="a"; foo="; name=as_user_id"'))),
    "decoy-header": (
        b"",
        MULTIPART,
        parts("X-Note: " + cd("name=as_user_id") + "\r\n" + NAME_A),
    ),
    "decoy-after-lf": (b"", MULTIPART, parts(f"X-Note: a\n{cd('name=as_user_id')}")),
    "content-id": (b"", MULTIPART, parts("Content-ID: as_user_id")),
    "content-id-fallback": (b"", MULTIPART, parts(f"{cd('x=1')}\r\nContent-ID: as_user_id")),
    "padded-disposition": (
        b"",
        MULTIPART,
        parts(NAME_A + '; pad="' + "x" * 1600 + '"\r\nContent-ID: as_user_id'),
    ),
    "empty-content-id": (b"", MULTIPART, parts(f"{cd('x=1')}\r\nContent-ID:\r\nX: as_user_id")),
    "filename-only": (b"", MULTIPART, parts(cd('filename="as_user_id"'))),
    "filename-encoded": (b"", MULTIPART, parts(cd('filename="%61s_user_id"'))),
    "filename-path": (b"", MULTIPART, parts(cd('filename="x/as_user_id"'))),
    "filename-star": (b"", MULTIPART, parts(cd("name=\"f\"; filename*=UTF-8''as_user_id"))),
    "type-as-name": (b"", MULTIPART, parts("Content-Type: as_user_id")),
    "filename-in-type": (
        b"",
        MULTIPART,
        parts(f"{cd('x=1')}\r\nContent-Type: text/plain; filename=as_user_id"),
    ),
    "17th-param": (b"", MULTIPART, parts(cd("".join(f"p{i}=1; " for i in range(16)) + "name=x"))),
    "flag-name": (b"", MULTIPART, parts(cd('flag; name="as_user_id"'))),
    "upper-name": (b"", MULTIPART, parts(cd('NAME="as_user_id"'))),
    "after-closing": (
        b"",
        MULTIPART,
        parts(NAME_A) + parts(NAME_EVIL),
    ),
    "lf-boundaries": (b"", MULTIPART, parts(cd('name="a"')).replace(b"\r\n", b"\n")),
    "boundary-trailing-space": (
        b"",
        MULTIPART,
        parts(NAME_EVIL).replace(b"\r\n", b"  \r\n", 1),
    ),
    "greedy-boundary-3.0": (
        b"",
        f'multipart/form-data; boundary=A; x="boundary={B}"',
        parts(cd('name="as_user_id"')),
    ),
    "xboundary": (b"", f"multipart/form-data; xboundary={B}", parts(cd('name="as_user_id"'))),
    "folded-name": (b"", MULTIPART, parts('Content-Disposition: form-data;\r\n name="as_user_id"')),
    "utf16-charset": (
        b"",
        MULTIPART,
        parts(NAME_A + "\r\nContent-Type: text/plain; charset=UTF-16LE"),
    ),
    # Innocent requests, as canvasapi, requests, curl -F and browsers send them: forwarded.
    "form": (b"", FORM, b"assignment[name]=Week+1&assignment[points_possible]=10"),
    "query": (b"per_page=50&page=2&order_by=due_at", None, b""),
    "multipart-fields": (b"", MULTIPART, parts(cd('name="assignment[name]"'), value=b"Week 1")),
    "multipart-upload": (
        b"",
        "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
        (
            b"------WebKitFormBoundary7MA4YWxkTrZu0gW\r\n"
            b'Content-Disposition: form-data; name="file"; filename="notes.txt"\r\n'
            b"Content-Type: text/plain\r\n\r\nhello\r\n"
            b"------WebKitFormBoundary7MA4YWxkTrZu0gW--\r\n"
        ),
    ),
}  # fmt: skip
INNOCENT = {"form", "query", "multipart-fields", "multipart-upload"}


async def send_battery(env: BrokerEnv, raw_http: httpx.AsyncClient) -> list[ReceivedRequest]:
    caller = await make_caller(env, scopes=GRANT)
    for label, (query, content_type, body) in BATTERY.items():
        before = len(env.sim.state.received)
        headers = dict(caller.headers)
        if content_type is not None:
            headers["Content-Type"] = content_type
        target = ASSIGNMENTS + (b"?" + query if query else b"")
        response = await send_raw(raw_http, "POST", target, headers, content=body)
        forwarded = len(env.sim.state.received) > before
        if not forwarded:  # the broker's own refusal, Canvas-shaped
            assert response.status_code in {400, 403, 415}, (label, response.text)
            assert response.json()["error"], label
        if label in INNOCENT:
            assert forwarded, (label, response.text)
    return list(env.sim.state.received)


def assert_harmless(keys: set[str], method: str, where: str) -> None:
    assert method == "POST", where
    assert not keys & FORBIDDEN, where


async def test_no_rack_reading_of_a_forwarded_request_finds_a_forbidden_key(
    env: BrokerEnv, raw_http: httpx.AsyncClient
) -> None:
    received = await send_battery(env, raw_http)
    assert len(received) >= len(INNOCENT)
    for request in received:
        for release in RackRelease:
            try:
                reading = read_request(
                    release,
                    method=request.method,
                    content_type=request.header("content-type"),
                    query=request.query_string,
                    body=request.body,
                )
            except (RackRefused, RackUnmodelled):
                continue
            assert_harmless(set(reading.all_keys), reading.method, f"{release}: {request}")


RACKS = available_racks()


@pytest.mark.skipif(
    not RACKS and not os.environ.get("BROKER_TEST_REQUIRE_RACK"),
    reason="no Ruby with Rack here (apt-get install ruby-rack); .ci/run installs it",
)
async def test_no_real_rack_finds_a_forbidden_key_in_a_forwarded_request(
    env: BrokerEnv, raw_http: httpx.AsyncClient
) -> None:
    assert RACKS, "BROKER_TEST_REQUIRE_RACK is set but no Rack can be run"
    received = await send_battery(env, raw_http)
    requests = [
        rack_request(
            method=request.method,
            content_type=request.header("content-type"),
            query=request.query_string,
            body=request.body,
        )
        for request in received
    ]
    for rack in RACKS:
        for request, result in zip(received, replay_many(rack, requests), strict=True):
            keys = {str(path[-1]) for path in result["keys"]}
            assert_harmless(keys, result["method"], f"{rack.label}: {request}")
