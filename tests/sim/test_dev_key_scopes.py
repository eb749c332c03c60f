"""Scope enforcement for tokens of a key with "Enforce Scopes", as Canvas matches them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from broker.sim.scopes import route_pattern, scopes_allow
from tests.sim.conftest import AUTH
from tests.sim.oauth_helpers import bearer, tokens_for

if TYPE_CHECKING:
    import httpx

    from broker.sim import SimState

INSUFFICIENT = {"errors": [{"message": "Insufficient scopes on access token."}]}


@pytest.mark.parametrize(
    ("scope", "method", "path", "allowed"),
    [
        # a :param is exactly one raw path segment
        (
            "url:GET|/api/v1/courses/:course_id/assignments",
            "GET",
            "/api/v1/courses/1201/assignments",
            True,
        ),
        (
            "url:GET|/api/v1/courses/:course_id/assignments",
            "GET",
            "/api/v1/courses/sis_course_id:X/assignments",
            True,
        ),
        (
            "url:GET|/api/v1/courses/:course_id/assignments",
            "GET",
            "/api/v1/courses/1/2/assignments",
            False,
        ),
        (
            "url:GET|/api/v1/courses/:course_id/assignments",
            "GET",
            "/api/v1/courses//assignments",
            False,
        ),
        # %2F is not a segment boundary: the raw path is matched
        (
            "url:GET|/api/v1/courses/:course_id/assignments",
            "GET",
            "/api/v1/courses/1%2F2/assignments",
            True,
        ),
        # a *glob takes slashes too
        ("url:GET|/api/v1/files/*path", "GET", "/api/v1/files/a/b/c", True),
        ("url:GET|/api/v1/files/*path", "GET", "/api/v1/files/", False),
        # an optional group
        ("url:GET|/api/v1/courses(/:course_id)", "GET", "/api/v1/courses", True),
        ("url:GET|/api/v1/courses(/:course_id)", "GET", "/api/v1/courses/5", True),
        ("url:GET|/api/v1/courses(/:course_id)", "GET", "/api/v1/courses/5/users", False),
        # any .format suffix
        ("url:GET|/api/v1/courses/:course_id", "GET", "/api/v1/courses/1201.json", True),
        ("url:GET|/api/v1/courses/:course_id", "GET", "/api/v1/courses/1201.xml", True),
        ("url:GET|/api/v1/courses", "GET", "/api/v1/courses.json/x", False),
        # HEAD counts as GET; methods must match
        ("url:GET|/api/v1/courses", "HEAD", "/api/v1/courses", True),
        ("url:GET|/api/v1/courses", "head", "/api/v1/courses", True),
        ("url:GET|/api/v1/courses", "POST", "/api/v1/courses", False),
        (
            "url:POST|/api/v1/courses/:course_id/assignments",
            "POST",
            "/api/v1/courses/1/assignments",
            True,
        ),
        # anchored at both ends
        ("url:GET|/api/v1/courses", "GET", "/x/api/v1/courses", False),
        ("url:GET|/api/v1/courses", "GET", "/api/v1/courses/1201", False),
        # the token endpoint is always allowed
        ("url:GET|/api/v1/courses", "DELETE", "/login/oauth2/token", True),
    ],
)
def test_scope_matching_table(scope: str, method: str, path: str, allowed: bool) -> None:
    assert scopes_allow([scope], method, path) is allowed


def test_route_pattern_is_canvas_regex() -> None:
    pattern = route_pattern("/api/v1/users/:user_id/custom_data(/*scope)")
    assert pattern is not None
    assert pattern.pattern == r"^/api/v1/users/[^/]+/custom_data(?:/.+|)(?:\.[^/]+|)$"
    assert scopes_allow(
        ["url:GET|/api/v1/users/:user_id/custom_data(/*scope)"],
        "GET",
        "/api/v1/users/1/custom_data/a/b",
    )


def test_param_directly_before_a_group_grants_nothing() -> None:
    # Canvas's `:[^/)]+` swallows the `(`; the regex is then unbalanced.
    assert route_pattern("/api/v1/courses/:course_id(/x)") is None
    assert not scopes_allow(["url:GET|/api/v1/courses/:course_id(/x)"], "GET", "/api/v1/courses/1")


async def _scoped_token(client: httpx.AsyncClient, state: SimState, scopes: list[str]) -> str:
    key = state.add_developer_key(
        secret="k",
        redirect_uris=["https://app.example.test/callback"],
        scopes=scopes,
        require_scopes=True,
    )
    return str((await tokens_for(client, key, scope=" ".join(scopes)))["access_token"])


async def test_call_inside_the_scopes_works(client: httpx.AsyncClient, state: SimState) -> None:
    token = await _scoped_token(client, state, ["url:GET|/api/v1/courses/:course_id/assignments"])

    response = await client.get("/api/v1/courses/1201/assignments", headers=bearer(token))
    head = await client.head("/api/v1/courses/1201/assignments.json", headers=bearer(token))

    assert response.status_code == 200
    assert head.status_code == 200


async def test_call_outside_the_scopes_is_401_without_challenge(
    client: httpx.AsyncClient, state: SimState
) -> None:
    token = await _scoped_token(client, state, ["url:GET|/api/v1/courses/:course_id/assignments"])

    response = await client.get("/api/v1/courses/1201", headers=bearer(token))
    users_self = await client.get("/api/v1/users/self", headers=bearer(token))
    post = await client.post(
        "/api/v1/courses/1201/assignments", data={"assignment[name]": "x"}, headers=bearer(token)
    )

    assert response.status_code == 401
    assert response.json() == INSUFFICIENT
    assert "www-authenticate" not in response.headers
    assert users_self.status_code == 401  # no endpoint is implicitly allowed
    assert post.status_code == 401


async def test_method_override_is_checked_under_the_wire_method(
    client: httpx.AsyncClient, state: SimState
) -> None:
    # Rails's request.method is the method before Rack's override, and validate_scopes reads it.
    token = await _scoped_token(
        client, state, ["url:DELETE|/api/v1/courses/:course_id/assignments/:id"]
    )

    response = await client.post(
        "/api/v1/courses/1201/assignments/5001", data={"_method": "DELETE"}, headers=bearer(token)
    )

    assert response.status_code == 401
    assert response.json() == INSUFFICIENT


async def test_scoped_token_may_always_log_out(client: httpx.AsyncClient, state: SimState) -> None:
    token = await _scoped_token(client, state, ["url:GET|/api/v1/courses"])

    response = await client.delete("/login/oauth2/token", headers=bearer(token))

    assert response.status_code == 200


async def test_key_without_enforcement_ignores_scopes(
    client: httpx.AsyncClient, state: SimState
) -> None:
    key = state.add_developer_key(
        secret="k",
        redirect_uris=["https://app.example.test/callback"],
        scopes=["url:GET|/api/v1/courses"],
    )
    token = (await tokens_for(client, key, scope="url:GET|/api/v1/courses"))["access_token"]

    response = await client.get("/api/v1/courses/1201", headers=bearer(token))

    assert response.status_code == 200


async def test_plain_tokens_are_unscoped(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/courses/1201", headers=AUTH)

    assert response.status_code == 200
