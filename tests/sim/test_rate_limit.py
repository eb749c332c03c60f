from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.sim.conftest import AUTH, OTHER_TOKEN, FakeClock

if TYPE_CHECKING:
    import httpx

    from broker.sim import SimState


@pytest.fixture
def small_bucket(state: SimState) -> SimState:
    state.rate_limit_capacity = 3.0
    state.rate_limit_leak_per_second = 1.0
    return state


async def exhaust(client: httpx.AsyncClient, headers: dict[str, str]) -> list[httpx.Response]:
    return [await client.get("/api/v1/users/self", headers=headers) for _ in range(3)]


async def test_requests_within_capacity_report_remaining_budget(
    client: httpx.AsyncClient, small_bucket: SimState
) -> None:
    responses = await exhaust(client, AUTH)

    assert [r.headers["x-rate-limit-remaining"] for r in responses] == ["2.0", "1.0", "0.0"]
    assert all(r.headers["x-request-cost"] == "1.0" for r in responses)


async def test_request_overflowing_the_bucket_gets_403_rate_limit_exceeded(
    client: httpx.AsyncClient, small_bucket: SimState
) -> None:
    await exhaust(client, AUTH)

    response = await client.get("/api/v1/users/self", headers=AUTH)

    assert response.status_code == 403
    assert response.text == "Rate Limit Exceeded"
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["x-rate-limit-remaining"] == "0.0"


async def test_bucket_leaks_as_the_clock_advances(
    client: httpx.AsyncClient, small_bucket: SimState, clock: FakeClock
) -> None:
    await exhaust(client, AUTH)

    clock.advance(1.0)
    response = await client.get("/api/v1/users/self", headers=AUTH)

    assert response.status_code == 200
    assert response.headers["x-rate-limit-remaining"] == "0.0"


async def test_buckets_are_per_token(client: httpx.AsyncClient, small_bucket: SimState) -> None:
    await exhaust(client, AUTH)

    response = await client.get(
        "/api/v1/users/self", headers={"Authorization": f"Bearer {OTHER_TOKEN}"}
    )

    assert response.status_code == 200


async def test_request_cost_is_configurable(client: httpx.AsyncClient, state: SimState) -> None:
    state.request_cost = 0.25

    response = await client.get("/api/v1/users/self", headers=AUTH)

    assert response.headers["x-request-cost"] == "0.25"
    assert response.headers["x-rate-limit-remaining"] == "699.75"
