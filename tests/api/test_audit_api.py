"""Reviewing the audit log over HTTP: filters, newest first, stable cursor paging.

Contract: docs/audit.md#review.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from broker.core.tokens import SecretKind, generate_secret
from tests.support.env import bearer

if TYPE_CHECKING:
    from tests.support.env import BrokerEnv

AUDIT = "/broker/v1/audit"
COURSE = "/api/v1/courses/1201"
ASSIGNMENTS = "/api/v1/courses/1201/assignments"
USER = "/api/v1/users/1"


@dataclass
class Traffic:
    """Two clients' calls: allowed, refused by the grant, and with a bad token."""

    alpha_id: str
    beta_id: str
    alpha_token_id: str
    credential_id: str


async def token_id_of(env: BrokerEnv, client_id: str) -> str:
    """The id of a client's only live token."""
    [token] = (
        await env.http.get(f"/broker/v1/tokens?client={client_id}", headers=env.admin())
    ).json()
    value: str = token["id"]
    return value


@pytest.fixture
async def traffic(env: BrokerEnv) -> Traffic:
    alpha_id, alpha_secret = await env.client("alpha")
    beta_id, beta_secret = await env.client("beta")
    alpha = await env.token(alpha_id, alpha_secret)
    beta = await env.token(beta_id, beta_secret)
    calls = [
        await env.http.get(COURSE, headers=bearer(alpha)),
        await env.http.get(ASSIGNMENTS, headers=bearer(alpha)),
        await env.http.post(
            ASSIGNMENTS, headers=bearer(alpha), json={"assignment": {"name": "Essay"}}
        ),
        await env.http.delete(COURSE, headers=bearer(alpha)),
        await env.http.get(USER, headers=bearer(beta)),
        await env.http.get(COURSE, headers=bearer(generate_secret(SecretKind.PROXY_TOKEN))),
    ]
    assert [c.status_code for c in calls] == [200, 200, 201, 403, 200, 401]
    credential = (await env.http.get("/broker/v1/credentials/worker", headers=env.admin())).json()
    return Traffic(alpha_id, beta_id, await token_id_of(env, alpha_id), credential["id"])


async def query(env: BrokerEnv, **params: Any) -> list[dict[str, Any]]:
    """All events matching ``params`` (one page of up to 1000)."""
    return await env.audit(limit=1000, **params)


def calls(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(kind, method, path) of each event, oldest first."""
    return [(e["kind"], e["method"], e["path"]) for e in reversed(events)]


MINT = ("token", "POST", "/broker/v1/oauth/token")


# Filters -----------------------------------------------------------------------------------


async def test_filter_by_client_selects_its_admin_token_and_proxy_events(
    env: BrokerEnv, traffic: Traffic
) -> None:
    events = await query(env, client=traffic.alpha_id)
    assert {e["client_id"] for e in events} == {traffic.alpha_id}
    assert calls(events) == [
        ("admin", "POST", "/broker/v1/clients"),
        MINT,
        ("proxy", "GET", COURSE),
        ("proxy", "GET", ASSIGNMENTS),
        ("proxy", "POST", ASSIGNMENTS),
        ("proxy", "DELETE", COURSE),
    ]


async def test_filter_by_token_selects_the_events_of_that_token(
    env: BrokerEnv, traffic: Traffic
) -> None:
    events = await query(env, token=traffic.alpha_token_id)
    assert {e["token_id"] for e in events} == {traffic.alpha_token_id}
    assert len(events) == 5


async def test_filter_by_kind(env: BrokerEnv, traffic: Traffic) -> None:
    events = await query(env, kind="proxy")
    assert {e["kind"] for e in events} == {"proxy"}
    assert len(events) == 6
    assert len(await query(env, kind="token")) == 2
    actions = {e["action"] for e in await query(env, kind="admin")}
    assert actions == {"admin_key.create", "upstream.create", "credential.create", "client.create"}


async def test_filter_by_decision(env: BrokerEnv, traffic: Traffic) -> None:
    events = await query(env, decision="deny")
    assert [(e["status"], e["reason"]) for e in reversed(events)] == [
        (403, "scope_not_granted"),
        (401, "unknown_token"),
    ]


async def test_filter_by_status(env: BrokerEnv, traffic: Traffic) -> None:
    assert calls(await query(env, status=201)) == [("proxy", "POST", ASSIGNMENTS)]
    assert calls(await query(env, status=403)) == [("proxy", "DELETE", COURSE)]


async def test_filter_by_method(env: BrokerEnv, traffic: Traffic) -> None:
    assert calls(await query(env, method="DELETE")) == [("proxy", "DELETE", COURSE)]
    assert calls(await query(env, method="POST", kind="proxy")) == [("proxy", "POST", ASSIGNMENTS)]


async def test_filter_by_path_prefix(env: BrokerEnv, traffic: Traffic) -> None:
    events = await query(env, path_prefix=f"{COURSE}/")
    assert calls(events) == [("proxy", "GET", ASSIGNMENTS), ("proxy", "POST", ASSIGNMENTS)]


@pytest.mark.parametrize("prefix", ["/api/v1/courses/12_1", "/api/v1/courses/12%", "/api/v1/%"])
async def test_path_prefix_wildcards_match_literally(
    env: BrokerEnv, traffic: Traffic, prefix: str
) -> None:
    assert await query(env, path_prefix=prefix) == []


async def test_filter_by_credential_and_upstream(env: BrokerEnv, traffic: Traffic) -> None:
    by_credential = await query(env, credential=traffic.credential_id, kind="proxy")
    assert len(by_credential) == 5
    by_upstream = await query(env, upstream="sim", kind="proxy")
    assert by_upstream == by_credential


async def test_filters_combine(env: BrokerEnv, traffic: Traffic) -> None:
    events = await query(env, client=traffic.alpha_id, decision="allow", method="GET", kind="proxy")
    assert calls(events) == [("proxy", "GET", COURSE), ("proxy", "GET", ASSIGNMENTS)]


async def test_since_selects_events_at_or_after_a_time(env: BrokerEnv, traffic: Traffic) -> None:
    everything = await query(env)
    pivot = everything[len(everything) // 2]["time"]
    selected = await query(env, since=pivot)
    assert selected == [e for e in everything if e["time"] >= pivot]
    assert 0 < len(selected) < len(everything)


async def test_until_selects_events_before_a_time(env: BrokerEnv, traffic: Traffic) -> None:
    everything = await query(env)
    pivot = everything[len(everything) // 2]["time"]
    selected = await query(env, until=pivot)
    assert selected == [e for e in everything if e["time"] < pivot]
    assert 0 < len(selected) < len(everything)


async def test_since_accepts_an_offset_time(env: BrokerEnv, traffic: Traffic) -> None:
    everything = await query(env)
    assert await query(env, since="2000-01-01T02:00:00+02:00") == everything
    assert await query(env, since="2999-01-01T00:00:00+00:00") == []


@pytest.mark.parametrize("param", ["since", "until"])
async def test_time_without_offset_is_refused(env: BrokerEnv, param: str) -> None:
    response = await env.http.get(
        AUDIT, params={param: "2024-01-01T00:00:00"}, headers=env.auditor()
    )
    assert response.status_code == 422
    assert param in response.json()["message"]


async def test_admin_actions_on_a_client_are_found_by_client(
    env: BrokerEnv, traffic: Traffic
) -> None:
    await env.http.post(f"/broker/v1/clients/{traffic.alpha_id}/disable", headers=env.admin())
    events = await query(env, client=traffic.alpha_id, kind="admin")
    assert [e["action"] for e in events] == ["client.disable", "client.create"]


async def test_admin_revocation_is_found_by_token(env: BrokerEnv, traffic: Traffic) -> None:
    revoke = f"/broker/v1/tokens/{traffic.alpha_token_id}/revoke"
    assert (await env.http.post(revoke, headers=env.admin())).status_code == 200
    [latest, *_] = await query(env, token=traffic.alpha_token_id)
    assert latest["kind"] == "admin"
    assert latest["action"] == "token.revoke"
    assert latest["client_id"] == traffic.alpha_id


async def test_admin_actions_on_a_credential_are_found_by_credential(
    env: BrokerEnv, traffic: Traffic
) -> None:
    await env.http.post("/broker/v1/credentials/worker/disable", headers=env.admin())
    events = await query(env, credential=traffic.credential_id, kind="admin")
    assert events[0]["action"] == "credential.disable"
    assert "credential.create" in {e["action"] for e in events}


async def test_admin_actions_on_an_upstream_are_found_by_upstream(
    env: BrokerEnv, traffic: Traffic
) -> None:
    await env.http.post("/broker/v1/upstreams/sim/disable", headers=env.admin())
    events = await query(env, upstream="sim", kind="admin")
    assert [e["action"] for e in events][:1] == ["upstream.disable"]
    assert "upstream.create" in {e["action"] for e in events}


async def test_filter_by_action(env: BrokerEnv, traffic: Traffic) -> None:
    events = await query(env, action="token.mint")
    assert [e["client_id"] for e in reversed(events)] == [traffic.alpha_id, traffic.beta_id]
    assert {e["kind"] for e in await query(env, action="client.create")} == {"admin"}


async def test_filter_by_reason_looks_at_the_outcome(env: BrokerEnv, traffic: Traffic) -> None:
    assert calls(await query(env, reason="scope_not_granted")) == [("proxy", "DELETE", COURSE)]
    assert calls(await query(env, reason="unknown_token")) == [("proxy", "GET", COURSE)]


async def test_filter_by_request_id_finds_the_call_a_script_reported(
    env: BrokerEnv, traffic: Traffic
) -> None:
    token = await env.client_token("reporter")
    response = await env.http.get(USER, headers=bearer(token))
    [event] = await query(env, request_id=response.headers["x-request-id"])
    assert (event["path"], event["status"]) == (USER, 200)


async def test_filter_by_actor_finds_what_one_admin_key_did(
    env: BrokerEnv, traffic: Traffic
) -> None:
    created = await env.http.post(
        "/broker/v1/admin-keys", headers=env.admin(), json={"name": "ops", "role": "admin"}
    )
    ops = {"Authorization": f"Bearer {created.json()['key']}"}
    await env.http.post(f"/broker/v1/clients/{traffic.beta_id}/disable", headers=ops)
    events = await query(env, actor=created.json()["id"])
    assert [(e["action"], e["client_id"]) for e in events] == [("client.disable", traffic.beta_id)]


async def test_filter_by_query_contains_matches_literally(env: BrokerEnv, traffic: Traffic) -> None:
    token = await env.client_token("paging")
    await env.http.get(f"{ASSIGNMENTS}?per_page=5&page=2", headers=bearer(token))
    [event] = await query(env, query_contains="page=2")
    assert event["query"] == "per_page=5&page=2"
    assert await query(env, query_contains="per%page") == []


@pytest.mark.parametrize(
    "param",
    [
        "client",
        "token",
        "credential",
        "upstream",
        "kind",
        "method",
        "path_prefix",
        "action",
        "reason",
        "request_id",
        "actor",
        "query_contains",
    ],
)
async def test_filter_with_nul_is_400(env: BrokerEnv, param: str) -> None:
    response = await env.http.get(AUDIT, params={param: "a\x00b"}, headers=env.auditor())
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


# Order and paging --------------------------------------------------------------------------


async def test_events_are_newest_first(env: BrokerEnv, traffic: Traffic) -> None:
    seqs = [e["seq"] for e in await query(env)]
    assert len(seqs) > 2
    assert seqs == sorted(seqs, reverse=True)
    assert len(set(seqs)) == len(seqs)


async def test_cursor_pages_return_every_event_once_while_new_events_arrive(
    env: BrokerEnv, traffic: Traffic
) -> None:
    token = await env.client_token("late")
    expected = [e["seq"] for e in await query(env)]
    seen: list[int] = []
    cursor: str | None = None
    for _page in range(len(expected)):
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = await env.http.get(AUDIT, params=params, headers=env.auditor())
        assert response.status_code == 200
        page = response.json()
        assert len(page["events"]) <= 2
        seen += [e["seq"] for e in page["events"]]
        assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected
    assert len(await query(env)) > len(expected)


async def test_first_page_then_cursor_pages_cover_the_log_exactly(
    env: BrokerEnv, traffic: Traffic
) -> None:
    expected = [e["seq"] for e in await query(env)]
    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await env.http.get(AUDIT, params=params, headers=env.auditor())).json()
        seen += [e["seq"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected


async def test_cursor_paging_respects_filters(env: BrokerEnv, traffic: Traffic) -> None:
    expected = [e["seq"] for e in await query(env, kind="proxy")]
    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {
            "kind": "proxy",
            "limit": 4,
            **({"cursor": cursor} if cursor else {}),
        }
        page = (await env.http.get(AUDIT, params=params, headers=env.auditor())).json()
        seen += [e["seq"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected


async def test_last_page_has_no_next_cursor(env: BrokerEnv, traffic: Traffic) -> None:
    total = len(await query(env))
    response = await env.http.get(AUDIT, params={"limit": total}, headers=env.auditor())
    assert response.json()["next_cursor"] is None
    assert len(response.json()["events"]) == total


def _cursor(payload: str) -> str:
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "%%%",
        _cursor("[1]"),
        _cursor('{"after": 5}'),
        _cursor('{"before": "5"}'),
        _cursor('{"before": 5.5}'),
        _cursor('{"before": true}'),
        _cursor('{"before": -1}'),
        _cursor(json.dumps({"before": 10**30})),
        _cursor("\xff\xfe"),
    ],
)
async def test_bad_cursor_is_400_json_error(env: BrokerEnv, traffic: Traffic, cursor: str) -> None:
    response = await env.http.get(AUDIT, params={"cursor": cursor}, headers=env.auditor())
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_request"
    assert "cursor" in body["message"]
    assert body["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("status", ["9223372036854775808", "2147483648", "-1", "99", "600"])
async def test_status_filter_outside_http_statuses_is_422_json_error(
    env: BrokerEnv, status: str
) -> None:
    response = await env.http.get(AUDIT, params={"status": status}, headers=env.auditor())
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    assert "status" in body["message"]


@pytest.mark.parametrize("limit", ["0", "1001", "two"])
async def test_bad_limit_is_422(env: BrokerEnv, limit: str) -> None:
    response = await env.http.get(AUDIT, params={"limit": limit}, headers=env.auditor())
    assert response.status_code == 422
    assert "limit" in response.json()["message"]
