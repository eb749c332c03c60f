from __future__ import annotations

import gzip
import json
import uuid

import httpx

from tests.sim.conftest import AUTH

ASSIGNMENTS = "/api/v1/courses/1201/assignments"


async def raw_get(
    client: httpx.AsyncClient, path: str, headers: dict[str, str]
) -> tuple[httpx.Response, bytes]:
    """GET without httpx decoding the body, to see exactly the bytes sent."""
    async with client.stream("GET", path, headers=headers) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    return response, raw


async def test_large_json_is_gzipped_deterministically_when_accepted(
    client: httpx.AsyncClient,
) -> None:
    response, raw = await raw_get(client, ASSIGNMENTS, {**AUTH, "Accept-Encoding": "gzip"})

    assert response.headers["content-encoding"] == "gzip"
    document = json.loads(gzip.decompress(raw))
    assert len(document) == 10
    assert raw == gzip.compress(json.dumps(document, separators=(",", ":")).encode(), mtime=0)


async def test_json_is_not_gzipped_when_gzip_is_not_accepted(client: httpx.AsyncClient) -> None:
    response, raw = await raw_get(client, ASSIGNMENTS, {**AUTH, "Accept-Encoding": "identity"})

    assert "content-encoding" not in response.headers
    assert len(json.loads(raw)) == 10


async def test_gzip_with_zero_quality_is_not_accepted(client: httpx.AsyncClient) -> None:
    response, _ = await raw_get(client, ASSIGNMENTS, {**AUTH, "Accept-Encoding": "gzip;q=0"})

    assert "content-encoding" not in response.headers


async def test_small_json_is_not_gzipped(client: httpx.AsyncClient) -> None:
    response, raw = await raw_get(client, "/api/v1/users/self", {"Accept-Encoding": "gzip"})

    assert response.status_code == 401
    assert "content-encoding" not in response.headers
    assert raw == b'{"errors":[{"message":"Invalid access token."}]}'


async def test_every_response_carries_canvas_headers(client: httpx.AsyncClient) -> None:
    for response in (
        await client.get("/api/v1/users/self", headers=AUTH),
        await client.get("/api/v1/users/self"),
        await client.get("/api/v1/nowhere", headers=AUTH),
    ):
        headers = response.headers
        assert float(headers["x-request-cost"]) >= 0
        assert float(headers["x-rate-limit-remaining"]) >= 0
        assert uuid.UUID(headers["x-request-context-id"]).version == 4
        assert headers["set-cookie"].startswith("_normandy_session=")
        assert headers["set-cookie"].endswith("; path=/; HttpOnly")
        assert headers["cache-control"] == "max-age=0, private, must-revalidate"


async def test_file_download_redirects_to_the_file_storage_host(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/api/v1/files/9001/download", headers=AUTH)

    assert response.status_code == 302
    location = httpx.URL(response.headers["location"])
    assert location.host == "files.sim.invalid"
    assert location.path == "/files/9001/download"
    assert location.params["sig"]


async def test_course_file_url_points_at_the_file_storage_host(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/api/v1/courses/1201/files/9002", headers=AUTH)

    body = response.json()
    assert body["display_name"] == "dataset.csv"
    assert body["url"].startswith("http://files.sim.invalid/files/9002/download?sig=")


async def test_file_of_another_course_is_not_found(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/courses/1201/files/9003", headers=AUTH)

    assert response.status_code == 404


async def test_json_format_suffix_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/courses/1201.json", headers=AUTH)

    assert response.json()["id"] == 1201


async def test_course_is_found_by_sis_id_and_by_uuid(client: httpx.AsyncClient) -> None:
    by_id = (await client.get("/api/v1/courses/1202", headers=AUTH)).json()

    by_sis = await client.get("/api/v1/courses/sis_course_id:SIS-1202", headers=AUTH)
    by_uuid = await client.get(f"/api/v1/courses/uuid:{by_id['uuid']}", headers=AUTH)

    assert by_sis.json() == by_id
    assert by_uuid.json() == by_id


async def test_unknown_course_is_canvas_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/courses/9999/assignments", headers=AUTH)

    assert response.status_code == 404
    assert response.json() == {"errors": [{"message": "The specified resource does not exist."}]}


async def test_user_is_found_by_id(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/users/2", headers=AUTH)

    assert response.json()["sortable_name"] == "Turing, Alan"


async def test_enrollments_embed_their_user(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/courses/1203/enrollments", headers=AUTH)

    assert [(e["type"], e["user"]["id"]) for e in response.json()] == [
        ("TeacherEnrollment", 1),
        ("StudentEnrollment", 4),
    ]


async def test_session_token_answers_with_a_session_url_on_the_request_host(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/login/session_token", headers=AUTH)

    assert response.json()["session_url"].startswith("http://sim.test/login/session_token?token=")


async def test_graphql_answers_with_empty_data(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/graphql", json={"query": "{ allCourses { id } }"}, headers=AUTH
    )

    assert response.json() == {"data": {}}


async def test_malformed_json_body_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        ASSIGNMENTS, content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )

    assert response.status_code == 400
