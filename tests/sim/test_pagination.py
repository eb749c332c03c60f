from __future__ import annotations

import re
from typing import TYPE_CHECKING

from tests.sim.conftest import AUTH, TOKEN

if TYPE_CHECKING:
    import httpx

ASSIGNMENTS = "/api/v1/courses/1201/assignments"
_LINK_ENTRY = re.compile(r'^<([^>]+)>; rel="([a-z]+)"$')


def parse_link(header: str) -> dict[str, str]:
    """Parse a Canvas Link header strictly: entries joined by a bare comma."""
    links: dict[str, str] = {}
    for entry in header.split(","):
        match = _LINK_ENTRY.match(entry)
        assert match, f"malformed Link entry {entry!r}"
        links[match.group(2)] = match.group(1)
    return links


async def test_35_assignments_at_per_page_10_make_four_pages(client: httpx.AsyncClient) -> None:
    response = await client.get(ASSIGNMENTS, params={"per_page": "10"}, headers=AUTH)

    links = parse_link(response.headers["link"])
    assert len(response.json()) == 10
    assert links["last"] == f"http://sim.test{ASSIGNMENTS}?page=4&per_page=10"


async def test_link_header_lists_rels_in_canvas_order_without_spaces(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(ASSIGNMENTS, params={"page": "2"}, headers=AUTH)

    base = f"http://sim.test{ASSIGNMENTS}"
    assert response.headers["link"] == (
        f'<{base}?page=2&per_page=10>; rel="current",'
        f'<{base}?page=3&per_page=10>; rel="next",'
        f'<{base}?page=1&per_page=10>; rel="prev",'
        f'<{base}?page=1&per_page=10>; rel="first",'
        f'<{base}?page=4&per_page=10>; rel="last"'
    )


async def test_first_page_has_no_prev_and_last_page_has_no_next(
    client: httpx.AsyncClient,
) -> None:
    first = await client.get(ASSIGNMENTS, headers=AUTH)
    last = await client.get(ASSIGNMENTS, params={"page": "4"}, headers=AUTH)

    assert set(parse_link(first.headers["link"])) == {"current", "next", "first", "last"}
    assert set(parse_link(last.headers["link"])) == {"current", "prev", "first", "last"}
    assert len(last.json()) == 5


async def test_following_next_links_visits_every_assignment_once(
    client: httpx.AsyncClient,
) -> None:
    url: str | None = f"{ASSIGNMENTS}?per_page=10"
    seen: list[int] = []
    pages = 0
    while url is not None and pages < 10:
        response = await client.get(url, headers=AUTH)
        seen.extend(item["id"] for item in response.json())
        url = parse_link(response.headers["link"]).get("next")
        pages += 1

    assert pages == 4
    assert len(seen) == 35
    assert len(set(seen)) == 35


async def test_per_page_is_capped_at_100(client: httpx.AsyncClient) -> None:
    response = await client.get(ASSIGNMENTS, params={"per_page": "500"}, headers=AUTH)

    links = parse_link(response.headers["link"])
    assert len(response.json()) == 35
    assert links["current"].endswith("page=1&per_page=100")
    assert "next" not in links


async def test_page_past_the_end_is_empty(client: httpx.AsyncClient) -> None:
    response = await client.get(ASSIGNMENTS, params={"page": "9"}, headers=AUTH)

    assert response.json() == []
    assert parse_link(response.headers["link"])["last"].endswith("page=4&per_page=10")


async def test_link_urls_keep_other_parameters_but_not_access_token(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(
        ASSIGNMENTS, params={"order_by": "due_at", "access_token": TOKEN, "page": "1"}
    )

    current = parse_link(response.headers["link"])["current"]
    assert current == f"http://sim.test{ASSIGNMENTS}?order_by=due_at&page=1&per_page=10"


async def test_link_urls_honour_x_forwarded_host_and_proto(client: httpx.AsyncClient) -> None:
    response = await client.get(
        ASSIGNMENTS,
        headers={**AUTH, "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"},
    )

    links = parse_link(response.headers["link"])
    assert all(url.startswith("https://evil.example/api/v1/") for url in links.values())


async def test_json_api_accept_wraps_list_with_meta_pagination(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(
        ASSIGNMENTS,
        params={"page": "2"},
        headers={**AUTH, "Accept": "application/vnd.api+json"},
    )

    body = response.json()
    pagination = body["meta"]["pagination"]
    base = f"http://sim.test{ASSIGNMENTS}"
    assert len(body["assignments"]) == 10
    assert pagination == {
        "current": f"{base}?page=2&per_page=10",
        "next": f"{base}?page=3&per_page=10",
        "prev": f"{base}?page=1&per_page=10",
        "first": f"{base}?page=1&per_page=10",
        "last": f"{base}?page=4&per_page=10",
        "page": 2,
        "per_page": 10,
        "count": 35,
    }


async def test_course_lists_are_paginated(client: httpx.AsyncClient) -> None:
    for path in (
        "/api/v1/courses",
        "/api/v1/accounts/1/courses",
        "/api/v1/courses/1201/users",
        "/api/v1/courses/1201/enrollments",
    ):
        response = await client.get(path, params={"per_page": "2"}, headers=AUTH)

        assert len(response.json()) == 2, path
        assert "next" in parse_link(response.headers["link"]), path
