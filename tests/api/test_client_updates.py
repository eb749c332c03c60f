"""Changing a client (docs/interfaces.md#management-api, docs/grants.md#constraints): fields
the request does not name stay as they are, a constraint must name a parameter of the grant's
scopes, the response and the audit event say what changed, old and new."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from broker.storage import clients
from tests.support.env import bearer

if TYPE_CHECKING:
    from tests.support.env import BrokerEnv

V1 = "/broker/v1"
COURSE_SCOPE = "url:GET|/api/v1/courses/:course_id/assignments"
USER_SCOPE = "url:GET|/api/v1/users/:user_id"
COURSE_CALL = "/api/v1/courses/{}/assignments"
JOB = {
    "scopes": [COURSE_SCOPE, USER_SCOPE],
    "constraints": {"course_id": ["1201"]},
    "token_ttl": 300,
    "max_token_ttl": 1800,
    "allow_masquerade": True,
    "allow_includes": True,
    "allowed_cidrs": ["127.0.0.0/8"],
    "rate_limit": 5,
    "rate_burst": 20,
    "description": "grade export",
}
SETTINGS = (*JOB, "enabled", "name")


async def make_job(env: BrokerEnv, **overrides: Any) -> dict[str, Any]:
    response = await env.http.post(
        f"{V1}/clients",
        headers=env.admin(),
        json={"name": "job", "credential": "worker", **JOB, **overrides},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def patch(env: BrokerEnv, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = await env.http.patch(f"{V1}/clients/job", headers=env.admin(), json=body)
    assert response.status_code == status, response.text
    result: dict[str, Any] = response.json()
    return result


async def shown(env: BrokerEnv) -> dict[str, Any]:
    response = await env.http.get(f"{V1}/clients/job", headers=env.auditor())
    body: dict[str, Any] = response.json()
    return body


def settings_of(client: dict[str, Any]) -> dict[str, Any]:
    return {name: client[name] for name in SETTINGS}


# Constraints naming no parameter ------------------------------------------------------------


async def test_creating_a_client_with_a_constraint_no_scope_has_is_refused_naming_both(
    env: BrokerEnv,
) -> None:
    response = await env.http.post(
        f"{V1}/clients",
        headers=env.admin(),
        json={
            "name": "job",
            "credential": "worker",
            "scopes": [COURSE_SCOPE, USER_SCOPE],
            "constraints": {"courseid": ["1201"]},
        },
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_field"
    assert body["message"].startswith("constraints: constraint 'courseid' names no parameter")
    assert "they have course_id, user_id" in body["message"]
    listed = await env.http.get(f"{V1}/clients", headers=env.auditor())
    assert listed.json() == []


async def test_a_constraint_on_a_grant_without_parameters_is_refused_saying_so(
    env: BrokerEnv,
) -> None:
    response = await env.http.post(
        f"{V1}/clients",
        headers=env.admin(),
        json={
            "name": "job",
            "credential": "worker",
            "scopes": ["url:GET|/api/v1/users/self"],
            "constraints": {"user_id": ["5"]},
        },
    )
    assert response.status_code == 422, response.text
    assert "no parameters" in response.json()["message"]


async def test_updating_constraints_to_one_no_scope_has_is_refused_and_changes_nothing(
    env: BrokerEnv,
) -> None:
    created = await make_job(env)
    refused = await patch(env, {"constraints": {"courseid": ["1201"]}}, status=422)
    assert "'courseid'" in refused["message"]
    assert "course_id, user_id" in refused["message"]
    assert settings_of(await shown(env)) == settings_of(created)


async def test_changing_scopes_alone_keeps_the_constraints(env: BrokerEnv) -> None:
    await make_job(env)
    changed = await patch(env, {"scopes": [COURSE_SCOPE]})
    assert changed["constraints"] == {"course_id": ["1201"]}
    assert changed["changes"] == {
        "scopes": {"old": [COURSE_SCOPE, USER_SCOPE], "new": [COURSE_SCOPE]}
    }
    check = await env.http.post(
        f"{V1}/clients/job/check",
        headers=env.admin(),
        json={"method": "GET", "path": COURSE_CALL.format(1203)},
    )
    assert check.json()["reason"] == "constraint_violation"


async def test_new_scopes_that_lose_a_kept_constraints_parameter_are_refused_saying_what_to_do(
    env: BrokerEnv,
) -> None:
    created = await make_job(env)
    refused = await patch(env, {"scopes": [USER_SCOPE]}, status=422)
    message = refused["message"]
    assert "'course_id'" in message
    assert "they have user_id" in message
    assert '"constraints": {}' in message
    assert "--clear-constraints" in message
    assert settings_of(await shown(env)) == settings_of(created)


async def test_constraints_are_cleared_only_by_an_explicit_empty_object(env: BrokerEnv) -> None:
    await make_job(env)
    kept = await patch(env, {"constraints": None})
    assert kept["constraints"] == {"course_id": ["1201"]}
    assert kept["changes"] == {}
    cleared = await patch(env, {"scopes": [USER_SCOPE], "constraints": {}})
    assert cleared["constraints"] == {}
    assert cleared["changes"]["constraints"] == {"old": {"course_id": ["1201"]}, "new": {}}


# Fields the request does not name ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "changed"),
    [
        ({"constraints": {"course_id": ["1201", "1202"]}}, "constraints"),
        ({"scopes": [COURSE_SCOPE]}, "scopes"),
        ({"token_ttl": 600}, "token_ttl"),
        ({"max_token_ttl": 2400}, "max_token_ttl"),
        ({"allowed_cidrs": ["10.0.0.0/8"]}, "allowed_cidrs"),
        ({"allowed_cidrs": []}, "allowed_cidrs"),
        ({"rate_limit": 8}, "rate_limit"),
        ({"rate_burst": 9}, "rate_burst"),
        ({"allow_masquerade": False}, "allow_masquerade"),
        ({"allow_includes": False}, "allow_includes"),
        ({"description": "nightly"}, "description"),
        ({"name": "job2"}, "name"),
    ],
)
async def test_an_update_naming_one_field_leaves_every_other_field_equal(
    env: BrokerEnv, body: dict[str, Any], changed: str
) -> None:
    before = settings_of(await make_job(env))
    result = await patch(env, body)
    after = settings_of(result)
    assert {k for k in after if after[k] != before[k]} == {changed}
    assert result["changes"] == {changed: {"old": before[changed], "new": after[changed]}}


async def test_removing_the_rate_limit_removes_its_burst_and_nothing_else(
    env: BrokerEnv,
) -> None:
    before = settings_of(await make_job(env))
    result = await patch(env, {"rate_limit": None})
    assert result["changes"] == {
        "rate_limit": {"old": 5, "new": None},
        "rate_burst": {"old": 20, "new": None},
    }
    after = settings_of(result)
    assert {k for k in after if after[k] != before[k]} == {"rate_limit", "rate_burst"}


async def test_a_first_rate_limit_gets_the_default_burst(env: BrokerEnv) -> None:
    await make_job(env, rate_limit=None, rate_burst=None)
    result = await patch(env, {"rate_limit": 2.5})
    assert result["changes"] == {
        "rate_limit": {"old": None, "new": 2.5},
        "rate_burst": {"old": None, "new": 3},
    }


@pytest.mark.parametrize("action", ["disable", "enable"])
async def test_enabling_or_disabling_leaves_every_other_field_equal(
    env: BrokerEnv, action: str
) -> None:
    before = settings_of(await make_job(env))
    if action == "enable":
        await env.http.post(f"{V1}/clients/job/disable", headers=env.admin())
        before["enabled"] = False
    response = await env.http.post(f"{V1}/clients/job/{action}", headers=env.admin())
    after = settings_of(response.json())
    assert {k for k in after if after[k] != before[k]} == {"enabled"}
    assert response.json()["changes"] == {
        "enabled": {"old": action == "disable", "new": action == "enable"}
    }


async def test_an_update_that_changes_nothing_says_so_and_keeps_live_tokens_working(
    env: BrokerEnv,
) -> None:
    created = await make_job(env, allowed_cidrs=[])
    token = await env.token(created["client_id"], created["client_secret"])
    result = await patch(env, {"token_ttl": 300, "scopes": [COURSE_SCOPE, USER_SCOPE]})
    assert result["changes"] == {}
    assert settings_of(result) == settings_of(created)
    answered = await env.http.get(COURSE_CALL.format(1201), headers=bearer(token))
    assert answered.status_code == 200, answered.text
    [event, *_] = await env.audit(kind="admin")
    assert (event["action"], event["details"]["changes"]) == ("client.update", {})


# Audit -------------------------------------------------------------------------------------


async def test_every_grant_change_is_audited_with_before_and_after(env: BrokerEnv) -> None:
    created = await make_job(env)
    await patch(env, {"scopes": [COURSE_SCOPE], "constraints": {"course_id": ["1202"]}})
    [event, *_] = await env.audit(kind="admin")
    assert event["action"] == "client.update"
    assert event["client_id"] == created["client_id"]
    assert event["details"]["changes"] == {
        "scopes": {"old": [COURSE_SCOPE, USER_SCOPE], "new": [COURSE_SCOPE]},
        "constraints": {"old": {"course_id": ["1201"]}, "new": {"course_id": ["1202"]}},
    }
    assert created["client_secret"] not in str(event)


async def test_grant_version_moves_by_one_per_change(env: BrokerEnv) -> None:
    await make_job(env)
    management = env.management
    first = await management.get_client("job")
    await patch(env, {"token_ttl": 600})
    await patch(env, {"token_ttl": 700})
    assert (await management.get_client("job")).grant_version == first.grant_version + 2


async def test_a_constraint_saved_before_the_check_is_named_in_the_warnings_of_an_update(
    env: BrokerEnv,
) -> None:
    await make_job(env)
    async with env.context.sessions.begin() as session:
        stored = await clients.get(session, "job")
        await clients.change(session, stored.id, {"constraints": {"courseid": ["1201"]}})
    result = await patch(env, {"token_ttl": 600})
    [warning] = result["warnings"]
    assert warning.startswith("constraint 'courseid' names no parameter")
