from __future__ import annotations

from typing import TYPE_CHECKING

from tests.sim.conftest import AUTH

if TYPE_CHECKING:
    import httpx

    from broker.sim import SimState

ASSIGNMENT = "/api/v1/courses/1201/assignments/5001"


async def test_as_user_id_in_query_makes_users_self_that_user(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/users/self", params={"as_user_id": "3"}, headers=AUTH)

    assert response.json()["id"] == 3
    assert response.headers["x-sim-acting-user"] == "3"


async def test_as_user_id_accepts_sis_user_id(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/api/v1/users/self", params={"as_user_id": "sis_user_id:U-0004"}, headers=AUTH
    )

    assert response.json()["id"] == 4


async def test_without_as_user_id_the_token_owner_acts(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/users/self", headers=AUTH)

    assert response.headers["x-sim-acting-user"] == "1"


async def test_as_user_id_in_json_body_is_recorded_on_created_assignment(
    client: httpx.AsyncClient, state: SimState
) -> None:
    response = await client.post(
        "/api/v1/courses/1201/assignments",
        json={"as_user_id": 2, "assignment": {"name": "Masqueraded"}},
        headers=AUTH,
    )

    created = response.json()
    assert created["sim_created_by_user_id"] == 2
    assert state.data.assignments[created["id"]].created_by_user_id == 2


async def test_as_user_id_in_form_body_changes_the_acting_user(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/courses/1201/assignments",
        data={"as_user_id": "5", "assignment[name]": "Form masquerade"},
        headers=AUTH,
    )

    assert response.headers["x-sim-acting-user"] == "5"


async def test_as_user_id_changes_which_courses_are_listed(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/courses", params={"as_user_id": "4"}, headers=AUTH)

    assert [course["id"] for course in response.json()] == [1201, 1203]
    assert response.json()[0]["enrollments"][0]["type"] == "student"


async def test_unknown_as_user_id_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/users/self", params={"as_user_id": "999"}, headers=AUTH)

    assert response.status_code == 401
    assert response.json() == {"errors": [{"message": "Invalid as_user_id"}]}


async def test_post_with_method_delete_in_form_deletes_the_assignment(
    client: httpx.AsyncClient, state: SimState
) -> None:
    response = await client.post(ASSIGNMENT, data={"_method": "DELETE"}, headers=AUTH)

    assert response.status_code == 200
    assert response.json()["workflow_state"] == "deleted"
    assert state.data.assignments[5001].deleted


async def test_post_with_method_delete_in_query_deletes_the_assignment(
    client: httpx.AsyncClient, state: SimState
) -> None:
    await client.post(ASSIGNMENT, params={"_method": "delete"}, headers=AUTH)

    assert state.data.assignments[5001].deleted


async def test_post_with_method_delete_in_multipart_deletes_the_assignment(
    client: httpx.AsyncClient, state: SimState
) -> None:
    await client.post(ASSIGNMENT, files={"_method": (None, "DELETE")}, headers=AUTH)

    assert state.data.assignments[5001].deleted


async def test_method_override_header_turns_post_into_put(
    client: httpx.AsyncClient, state: SimState
) -> None:
    response = await client.post(
        ASSIGNMENT,
        data={"assignment[name]": "Renamed"},
        headers={**AUTH, "X-HTTP-Method-Override": "PUT"},
    )

    assert response.headers["x-sim-method-override"] == "PUT"
    assert state.data.assignments[5001].name == "Renamed"


async def test_method_field_in_json_body_is_not_an_override(
    client: httpx.AsyncClient, state: SimState
) -> None:
    # Rack::MethodOverride reads form bodies only; a JSON `_method` stays a POST.
    response = await client.post(ASSIGNMENT, json={"_method": "DELETE"}, headers=AUTH)

    assert response.status_code == 404
    assert not state.data.assignments[5001].deleted


async def test_method_override_only_applies_to_post(
    client: httpx.AsyncClient, state: SimState
) -> None:
    response = await client.get(ASSIGNMENT, params={"_method": "DELETE"}, headers=AUTH)

    assert response.status_code == 200
    assert not state.data.assignments[5001].deleted
