"""Forwarding headers, redirects and pagination links.

Contract: docs/proxy-rules.md#forwarding-and-hop-by-hop-headers, #redirects, #pagination.
"""

from __future__ import annotations

import gzip
import json
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.proxy.support import assert_refused, fetch_raw, last_proxy_event, make_caller
from tests.support.env import WORKER_TOKEN

if TYPE_CHECKING:
    from tests.proxy.conftest import EnvFactory
    from tests.support.env import BrokerEnv

ASSIGNMENTS = "/api/v1/courses/1201/assignments"
BROKER = "http://broker.test"
PUBLIC = "https://broker.example.edu"
JSON_API = "application/vnd.api+json"
RELS = ["current", "next", "prev", "first", "last"]


async def _direct(
    env: BrokerEnv, path: str, headers: dict[str, str]
) -> tuple[httpx.Response, bytes]:
    """The same request sent straight to the simulator with the worker token, body as sent."""
    async with httpx.AsyncClient(base_url=env.sim.base_url) as direct:
        return await fetch_raw(direct, path, {**headers, "Authorization": f"Bearer {WORKER_TOKEN}"})


def _link_urls(response: httpx.Response) -> dict[str, str]:
    return {rel: link["url"] for rel, link in response.links.items() if rel is not None}


async def test_forwarding_headers_from_the_client_are_not_forwarded(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    response = await env.http.get(
        ASSIGNMENTS,
        headers={
            **caller.headers,
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Port": "8443",
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Prefix": "/evil",
            "Forwarded": "host=evil.example;proto=https",
            "X-Real-IP": "203.0.113.9",
        },
    )
    assert response.status_code == 200, response.text
    [received] = env.sim.state.received
    names = {name for name, _value in received.headers}
    assert not {name for name in names if name.startswith("x-forwarded-")}
    assert not names & {"forwarded", "x-real-ip"}
    assert received.header("host") == f"127.0.0.1:{env.sim.port}"
    urls = _link_urls(response)
    assert urls
    assert all(url.startswith(f"{BROKER}{ASSIGNMENTS}?") for url in urls.values())
    assert "evil" not in response.headers["link"]
    # The peer is not a trusted proxy, so its X-Forwarded-For is not believed either.
    assert (await last_proxy_event(env))["source_ip"] == "127.0.0.1"


async def test_host_from_the_client_is_not_forwarded_and_links_use_the_public_url(
    make_env: EnvFactory,
) -> None:
    env = await make_env(public_url=PUBLIC)
    caller = await make_caller(env)
    response = await env.http.get(
        ASSIGNMENTS,
        headers={**caller.headers, "Host": "evil.example", "X-Forwarded-Host": "evil.example"},
    )
    assert response.status_code == 200, response.text
    [received] = env.sim.state.received
    assert received.header_values("host") == [f"127.0.0.1:{env.sim.port}"]
    urls = _link_urls(response)
    assert set(urls) == {"current", "next", "first", "last"}
    assert all(url.startswith(f"{PUBLIC}{ASSIGNMENTS}?") for url in urls.values())


async def test_hop_by_hop_headers_are_not_forwarded_but_others_are(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    response = await env.http.get(
        ASSIGNMENTS,
        headers={
            **caller.headers,
            "Connection": "keep-alive, Upgrade, TE",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Upgrade": "h2c",
            "X-Job-Name": "nightly-sync",
        },
    )
    assert response.status_code == 200, response.text
    [received] = env.sim.state.received
    names = {name for name, _value in received.headers}
    assert not names & {"connection", "keep-alive", "te", "upgrade"}
    assert received.header("x-job-name") == "nightly-sync"


@pytest.mark.parametrize(
    ("connection", "extra"),
    [
        ("close, Content-Type", {}),
        ("keep-alive, Authorization", {}),
        ("Content-Length", {}),
        ("X-Secret-Hop", {"X-Secret-Hop": "1"}),
        ("x-job-name", {"X-Job-Name": "nightly-sync"}),
    ],
)
async def test_connection_naming_an_end_to_end_header_is_refused_not_obeyed(
    env: BrokerEnv, connection: str, extra: dict[str, str]
) -> None:
    caller = await make_caller(env)
    response = await env.http.post(
        ASSIGNMENTS,
        json={"assignment": {"name": "x"}},
        headers={**caller.headers, "Connection": connection, **extra},
    )
    await assert_refused(env, response, 400, "malformed_request", caller)
    assert "Connection" in response.json()["errors"][0]["message"]


async def test_redirect_to_file_storage_is_passed_on_untouched_and_not_followed(
    env: BrokerEnv,
) -> None:
    caller = await make_caller(env)
    response = await env.http.get("/api/v1/files/9001/download", headers=caller.headers)
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith("http://files.sim.invalid/files/9001/download?sig=")
    assert env.received == ["/api/v1/files/9001/download"]
    direct, _body = await _direct(env, "/api/v1/files/9001/download", {})
    assert location == direct.headers["location"]


@pytest.mark.parametrize(
    ("public_url", "base"), [(None, BROKER), (PUBLIC, PUBLIC)], ids=["host-derived", "configured"]
)
async def test_redirect_to_the_upstream_is_rewritten_to_the_broker(
    make_env: EnvFactory, monkeypatch: pytest.MonkeyPatch, public_url: str | None, base: str
) -> None:
    env = await make_env(public_url=public_url)
    monkeypatch.setattr(env.sim.state, "file_host", env.sim.base_url)
    caller = await make_caller(env)
    response = await env.http.get("/api/v1/files/9001/download", headers=caller.headers)
    assert response.status_code == 302
    direct, _body = await _direct(env, "/api/v1/files/9001/download", {})
    upstream_location = direct.headers["location"]
    assert upstream_location.startswith(f"{env.sim.base_url}/files/9001/download?sig=")
    assert response.headers["location"] == base + upstream_location.removeprefix(env.sim.base_url)


async def test_link_header_urls_are_rewritten_to_the_broker_and_otherwise_unchanged(
    env: BrokerEnv,
) -> None:
    caller = await make_caller(env, allow_includes=True)
    path = f"{ASSIGNMENTS}?page=2&include[]=submission"
    response = await env.http.get(path, headers=caller.headers)
    assert response.status_code == 200, response.text
    direct, _body = await _direct(env, path, {})
    upstream_link = direct.headers["link"]
    assert upstream_link.count(env.sim.base_url) == len(RELS)
    assert response.headers["link"] == upstream_link.replace(env.sim.base_url, BROKER)
    assert list(_link_urls(response)) == RELS


async def test_following_every_next_link_visits_all_pages_through_the_broker(
    env: BrokerEnv,
) -> None:
    caller = await make_caller(env)
    url: str | None = ASSIGNMENTS
    ids: list[int] = []
    pages = 0
    while url is not None and pages < 10:
        response = await env.http.get(url, headers=caller.headers)
        assert response.status_code == 200, response.text
        ids += [assignment["id"] for assignment in response.json()]
        pages += 1
        url = _link_urls(response).get("next")
        assert url is None or url.startswith(f"{BROKER}{ASSIGNMENTS}?")
    assert pages == 4
    assert len(set(ids)) == len(ids) == 35
    assert len(env.sim.state.received) == 4
    events = await env.audit(kind="proxy", decision="allow")
    assert len(events) == 4


async def test_following_a_rewritten_link_is_checked_against_the_grant(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    first = await env.http.get(ASSIGNMENTS, headers=caller.headers)
    next_url = _link_urls(first)["next"]
    narrowed = await env.http.patch(
        f"/broker/v1/clients/{caller.client_id}",
        headers=env.admin(),
        json={"scopes": ["url:GET|/api/v1/courses/:id"]},
    )
    assert narrowed.status_code == 200, narrowed.text
    env.sim.state.received.clear()
    response = await env.http.get(next_url, headers=caller.headers)
    await assert_refused(env, response, 403, "scope_not_granted", caller)


def _pagination_urls(body: bytes) -> dict[str, str]:
    pagination: dict[str, Any] = json.loads(body)["meta"]["pagination"]
    return {key: value for key, value in pagination.items() if isinstance(value, str)}


def _expected_body(direct: bytes, sim_base: str, base: str) -> bytes:
    expected = direct
    for url in _pagination_urls(direct).values():
        quoted = json.dumps(url).encode()
        assert quoted.startswith(f'"{sim_base}/'.encode())
        expected = expected.replace(quoted, json.dumps(base + url.removeprefix(sim_base)).encode())
    return expected


async def test_json_api_pagination_urls_are_rewritten_and_the_rest_is_byte_identical(
    env: BrokerEnv,
) -> None:
    caller = await make_caller(env)
    headers = {"Accept": JSON_API, "Accept-Encoding": "identity"}
    path = f"{ASSIGNMENTS}?page=2"
    response, body = await fetch_raw(env.http, path, {**caller.headers, **headers})
    assert response.status_code == 200, body
    direct, direct_body = await _direct(env, path, headers)
    assert "content-encoding" not in direct.headers
    assert body == _expected_body(direct_body, env.sim.base_url, BROKER)
    assert set(_pagination_urls(body)) == set(RELS)
    assert all(url.startswith(BROKER) for url in _pagination_urls(body).values())
    # Other URLs in the body are Canvas's own (html_url), not the broker's to rewrite.
    assert env.sim.base_url.encode() in body
    assert response.headers["content-length"] == str(len(body))


async def test_gzipped_json_api_pagination_urls_are_rewritten(env: BrokerEnv) -> None:
    caller = await make_caller(env)
    headers = {"Accept": JSON_API, "Accept-Encoding": "gzip"}
    response, body = await fetch_raw(env.http, ASSIGNMENTS, {**caller.headers, **headers})
    assert response.status_code == 200, body
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-length"] == str(len(body))
    direct, direct_body = await _direct(env, ASSIGNMENTS, headers)
    assert direct.headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == _expected_body(
        gzip.decompress(direct_body), env.sim.base_url, BROKER
    )
