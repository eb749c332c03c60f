from __future__ import annotations

from typing import TYPE_CHECKING

from tests.sim.conftest import AUTH, TOKEN

if TYPE_CHECKING:
    import httpx


async def test_request_without_token_gets_canvas_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/users/self")

    assert response.status_code == 401
    assert response.json() == {"errors": [{"message": "Invalid access token."}]}
    assert response.headers["www-authenticate"] == 'Bearer realm="canvas-lms"'


async def test_unknown_bearer_token_gets_401(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/api/v1/users/self", headers={"Authorization": "Bearer not-a-token"}
    )

    assert response.status_code == 401


async def test_bearer_token_authenticates(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/users/self", headers=AUTH)

    assert response.status_code == 200
    assert response.json()["id"] == 1


async def test_access_token_in_query_string_authenticates(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/users/self", params={"access_token": TOKEN})

    assert response.status_code == 200


async def test_access_token_in_form_body_authenticates(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/courses/1201/assignments",
        data={"access_token": TOKEN, "assignment[name]": "Via form token"},
    )

    assert response.status_code == 201


async def test_unknown_path_without_token_gets_canvas_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/no/such/thing")

    assert response.status_code == 404
    assert response.json() == {"errors": [{"message": "The specified resource does not exist."}]}


async def test_unrouted_method_gets_canvas_404(client: httpx.AsyncClient) -> None:
    response = await client.delete("/api/v1/courses", headers=AUTH)

    assert response.status_code == 404
    assert response.json() == {"errors": [{"message": "The specified resource does not exist."}]}
