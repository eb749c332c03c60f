from __future__ import annotations

from typing import TYPE_CHECKING

from tests.sim.conftest import AUTH

if TYPE_CHECKING:
    import httpx

    from broker.sim import SimState

ASSIGNMENTS = "/api/v1/courses/1201/assignments"


async def test_create_from_form_fields_returns_201_with_the_new_assignment(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        ASSIGNMENTS,
        data={
            "assignment[name]": "Essay",
            "assignment[points_possible]": "25",
            "assignment[submission_types][]": ["online_upload", "online_url"],
            "assignment[published]": "false",
        },
        headers=AUTH,
    )

    assert response.status_code == 201
    created = response.json()
    assert created["name"] == "Essay"
    assert created["points_possible"] == 25.0
    assert created["submission_types"] == ["online_upload", "online_url"]
    assert created["workflow_state"] == "unpublished"
    assert created["html_url"] == f"http://sim.test/courses/1201/assignments/{created['id']}"


async def test_create_from_json_is_then_listed(client: httpx.AsyncClient) -> None:
    created = await client.post(
        ASSIGNMENTS, json={"assignment": {"name": "From JSON"}}, headers=AUTH
    )

    listed = await client.get(ASSIGNMENTS, params={"per_page": "100"}, headers=AUTH)

    assert created.json()["id"] in [a["id"] for a in listed.json()]


async def test_create_without_a_name_is_400_and_creates_nothing(
    client: httpx.AsyncClient, state: SimState
) -> None:
    before = len(state.data.assignments)

    response = await client.post(
        ASSIGNMENTS, json={"assignment": {"points_possible": 3}}, headers=AUTH
    )

    assert response.status_code == 400
    assert len(state.data.assignments) == before


async def test_create_with_invalid_points_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        ASSIGNMENTS,
        json={"assignment": {"name": "Bad", "points_possible": "lots"}},
        headers=AUTH,
    )

    assert response.status_code == 400


async def test_put_updates_the_assignment(client: httpx.AsyncClient) -> None:
    response = await client.put(
        f"{ASSIGNMENTS}/5002",
        json={"assignment": {"name": "Renamed", "due_at": None}},
        headers=AUTH,
    )

    assert response.json()["name"] == "Renamed"
    assert response.json()["due_at"] is None


async def test_delete_marks_deleted_and_hides_the_assignment(client: httpx.AsyncClient) -> None:
    deleted = await client.delete(f"{ASSIGNMENTS}/5003", headers=AUTH)

    shown = await client.get(f"{ASSIGNMENTS}/5003", headers=AUTH)
    listed = await client.get(ASSIGNMENTS, params={"per_page": "100"}, headers=AUTH)

    assert deleted.json()["workflow_state"] == "deleted"
    assert shown.status_code == 404
    assert len(listed.json()) == 34


async def test_assignment_of_another_course_is_not_found(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/courses/1202/assignments/5001", headers=AUTH)

    assert response.status_code == 404
