from __future__ import annotations

from typing import TYPE_CHECKING

from broker.sim import ReceivedRequest, SimState
from tests.sim.conftest import AUTH

if TYPE_CHECKING:
    import httpx


async def test_unauthenticated_request_is_recorded(
    client: httpx.AsyncClient, state: SimState
) -> None:
    response = await client.get("/api/v1/users/self")

    assert response.status_code == 401
    assert state.received_paths() == ["/api/v1/users/self"]


async def test_request_to_unknown_path_is_recorded(
    client: httpx.AsyncClient, state: SimState
) -> None:
    await client.get("/not/canvas", headers=AUTH)

    assert state.received_paths() == ["/not/canvas"]


async def test_recording_keeps_raw_path_query_and_body_exactly(
    client: httpx.AsyncClient, state: SimState
) -> None:
    body = b"assignment%5Bname%5D=R%C3%A9sum%C3%A9&x=1&x=2"
    await client.post(
        "/api/v1/courses/sis_course_id:SIS%2D1201/assignments?b=%20x&a=1&a=2&c=%2F",
        content=body,
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    )

    [received] = state.received
    assert received.method == "POST"
    assert received.raw_path == "/api/v1/courses/sis_course_id:SIS%2D1201/assignments"
    assert received.query_string == "b=%20x&a=1&a=2&c=%2F"
    assert received.body == body


async def test_recording_keeps_header_duplicates_in_order_with_lowercase_names(
    client: httpx.AsyncClient, state: SimState
) -> None:
    await client.get(
        "/api/v1/users/self",
        headers=[("Authorization", AUTH["Authorization"]), ("X-Dup", "one"), ("X-DUP", "two")],
    )

    [received] = state.received
    assert received.header_values("x-dup") == ["one", "two"]
    assert ("x-dup", "one") in received.headers
    assert received.header("authorization") == AUTH["Authorization"]
    assert all(name == name.lower() for name, _ in received.headers)


async def test_recording_keeps_wire_method_when_method_is_overridden(
    client: httpx.AsyncClient, state: SimState
) -> None:
    response = await client.post(
        "/api/v1/courses/1201/assignments/5001", data={"_method": "DELETE"}, headers=AUTH
    )

    assert response.headers["x-sim-method-override"] == "DELETE"
    assert state.received[0].method == "POST"


async def test_clear_forgets_received_requests(client: httpx.AsyncClient, state: SimState) -> None:
    await client.get("/api/v1/users/self", headers=AUTH)

    state.clear()

    assert state.received == []


def test_received_request_target_joins_path_and_query() -> None:
    with_query = ReceivedRequest("GET", "/api/v1/courses", "page=2", [], b"")
    without_query = ReceivedRequest("GET", "/api/v1/courses", "", [], b"")

    assert with_query.target == "/api/v1/courses?page=2"
    assert without_query.target == "/api/v1/courses"
