"""Audit review never fails silently (docs/audit.md#review): a value no event can hold is a
400 naming the allowed values, and ``client``/``credential`` take an id or a name."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from broker.core.audit_values import REASONS, REVIEWED_ACTIONS, Decision, Kind, State
from tests.support.env import bearer

if TYPE_CHECKING:
    from tests.support.env import BrokerEnv

AUDIT = "/broker/v1/audit"
EXPORT = "/broker/v1/audit/export"
COURSE = "/api/v1/courses/1201"


@pytest.mark.parametrize(
    ("param", "value", "allowed"),
    [
        ("decision", "maybe", sorted(Decision)),
        ("kind", "Proxy", sorted(Kind)),
        ("state", "done", sorted(State)),
        ("action", "client.updated", sorted(REVIEWED_ACTIONS)),
        ("action", "proxy.complete", sorted(REVIEWED_ACTIONS)),  # shown merged, never alone
        ("reason", "scope_not_grantd", sorted(REASONS)),
    ],
)
@pytest.mark.parametrize("endpoint", [AUDIT, EXPORT])
async def test_an_unknown_value_of_a_closed_filter_is_a_400_listing_the_allowed_values(
    env: BrokerEnv, endpoint: str, param: str, value: str, allowed: list[str]
) -> None:
    response = await env.http.get(endpoint, params={param: value}, headers=env.auditor())
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    assert body["message"] == f"{param}: not a value the audit log holds; use one of " + (
        ", ".join(allowed)
    )


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("decision", "deny"),
        ("kind", "proxy"),
        ("state", "pending"),
        ("action", "client.update"),
        ("reason", "scope_not_granted"),
    ],
)
async def test_a_known_value_of_a_closed_filter_is_accepted(
    env: BrokerEnv, param: str, value: str
) -> None:
    response = await env.http.get(AUDIT, params={param: value}, headers=env.auditor())
    assert response.status_code == 200, response.text


async def test_client_and_credential_filters_take_names_as_ids(env: BrokerEnv) -> None:
    client_id, secret = await env.client("grade-export")
    token = await env.token(client_id, secret)
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200
    by_id = await env.audit(client=client_id, kind="proxy")
    by_name = await env.audit(client="grade-export", kind="proxy")
    assert by_id == by_name
    assert [e["client_id"] for e in by_name] == [client_id]
    credential_id = (
        await env.http.get("/broker/v1/credentials/worker", headers=env.admin())
    ).json()["id"]
    assert await env.audit(credential="worker", kind="proxy") == await env.audit(
        credential=credential_id, kind="proxy"
    )


@pytest.mark.parametrize("param", ["client", "credential"])
@pytest.mark.parametrize("endpoint", [AUDIT, EXPORT])
async def test_an_unknown_client_or_credential_is_a_404_not_an_empty_answer(
    env: BrokerEnv, endpoint: str, param: str
) -> None:
    response = await env.http.get(endpoint, params={param: "grade-exprot"}, headers=env.auditor())
    assert response.status_code == 404, response.text
    label = "client" if param == "client" else "credential"
    assert response.json()["message"] == f"no {label} 'grade-exprot'"
