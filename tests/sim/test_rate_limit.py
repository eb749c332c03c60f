"""The simulator's throttles: Canvas's request throttle by default, the simple bucket as an option.

Canvas's model is app/middleware/request_throttle.rb (docs/simulator.md#rate-limit).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from broker.sim.throttle import CanvasThrottle, SimpleThrottle
from tests.sim.conftest import AUTH, OTHER_TOKEN, TOKEN, FakeClock

if TYPE_CHECKING:
    import httpx

    from broker.sim import SimState

SELF = "/api/v1/users/self"


# --- Canvas's throttle -------------------------------------------------------------------


async def test_each_answer_reports_its_cost_and_the_high_water_mark_minus_the_count(
    client: httpx.AsyncClient, state: SimState
) -> None:
    responses = [await client.get(SELF, headers=AUTH) for _ in range(3)]

    assert [r.headers["x-request-cost"] for r in responses] == ["1.0", "1.0", "1.0"]
    assert [r.headers["x-rate-limit-remaining"] for r in responses] == ["599.0", "598.0", "597.0"]


async def test_endpoints_cost_what_the_table_says(
    client: httpx.AsyncClient, state: SimState
) -> None:
    response = await client.get("/api/v1/accounts/1/courses", headers=AUTH)

    assert response.headers["x-request-cost"] == "5.0"
    assert response.headers["x-rate-limit-remaining"] == "595.0"


async def test_the_bucket_leaks_at_the_outflow(
    client: httpx.AsyncClient, state: SimState, clock: FakeClock
) -> None:
    state.throttle = CanvasThrottle(default_cost=100.0)
    await client.get(SELF, headers=AUTH)
    await client.get(SELF, headers=AUTH)

    clock.advance(5.0)  # 10 units a second
    response = await client.get(SELF, headers=AUTH)

    assert response.headers["x-rate-limit-remaining"] == str(600.0 - 300.0 + 50.0)


async def test_a_full_bucket_answers_403_rate_limit_exceeded_without_a_cost(
    client: httpx.AsyncClient, state: SimState, clock: FakeClock
) -> None:
    state.throttle = CanvasThrottle(default_cost=200.0)
    allowed = [await client.get(SELF, headers=AUTH) for _ in range(3)]
    assert [r.status_code for r in allowed] == [200, 200, 200]  # 600 after the third settles

    refused = await client.get(SELF, headers=AUTH)

    assert refused.status_code == 403
    assert refused.text == "403 Forbidden (Rate Limit Exceeded)\n"
    assert refused.headers["content-type"] == "text/plain; charset=utf-8"
    assert "x-request-cost" not in refused.headers
    # The up-front cost is credited back once the refusal is answered.
    assert refused.headers["x-rate-limit-remaining"] == "0.0"
    clock.advance(6.0)  # 600 - 60 + 50 is under the mark again
    assert (await client.get(SELF, headers=AUTH)).status_code == 200


async def test_calls_in_flight_together_pay_the_up_front_cost_together(
    client: httpx.AsyncClient, state: SimState
) -> None:
    # 600 / 50: the twelfth call in flight finds the bucket at the high-water mark.
    state.latency = 0.2
    responses = await asyncio.gather(*(client.get(SELF, headers=AUTH) for _ in range(14)))

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 11 + [403] * 3
    # Once all are answered only their real costs remain.
    state.latency = 0.0
    after = await client.get(SELF, headers=AUTH)
    assert after.headers["x-rate-limit-remaining"] == "588.0"


async def test_buckets_are_per_token(client: httpx.AsyncClient, state: SimState) -> None:
    state.throttle = CanvasThrottle(default_cost=700.0)
    await client.get(SELF, headers=AUTH)
    assert (await client.get(SELF, headers=AUTH)).status_code == 403

    other = await client.get(SELF, headers={"Authorization": f"Bearer {OTHER_TOKEN}"})

    assert other.status_code == 200


def test_the_count_never_exceeds_the_maximum_so_remaining_bottoms_out() -> None:
    throttle = CanvasThrottle(default_cost=5000.0)
    admission = throttle.admit(TOKEN, "GET", SELF, 0.0)
    assert throttle.settle(admission, "GET", SELF, 0.0) == (5000.0, 600.0 - 800.0)
    assert throttle.remaining(TOKEN, 2.0) == 600.0 - 780.0


def test_head_costs_what_get_does() -> None:
    throttle = CanvasThrottle()
    assert throttle.cost_of("HEAD", "/api/v1/accounts/1/courses") == 5.0
    assert throttle.cost_of("POST", "/api/v1/courses/1/assignments") == 2.0


# --- the simple bucket -------------------------------------------------------------------


@pytest.fixture
def small_bucket(state: SimState) -> SimState:
    state.throttle = SimpleThrottle(capacity=3.0, leak_per_second=1.0)
    return state


async def exhaust(client: httpx.AsyncClient, headers: dict[str, str]) -> list[httpx.Response]:
    return [await client.get(SELF, headers=headers) for _ in range(3)]


async def test_simple_requests_within_capacity_report_remaining_budget(
    client: httpx.AsyncClient, small_bucket: SimState
) -> None:
    responses = await exhaust(client, AUTH)

    assert [r.headers["x-rate-limit-remaining"] for r in responses] == ["2.0", "1.0", "0.0"]
    assert all(r.headers["x-request-cost"] == "1.0" for r in responses)


async def test_simple_request_overflowing_the_bucket_gets_403_rate_limit_exceeded(
    client: httpx.AsyncClient, small_bucket: SimState
) -> None:
    await exhaust(client, AUTH)

    response = await client.get(SELF, headers=AUTH)

    assert response.status_code == 403
    assert response.text == "Rate Limit Exceeded"
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["x-rate-limit-remaining"] == "0.0"


async def test_simple_bucket_leaks_as_the_clock_advances(
    client: httpx.AsyncClient, small_bucket: SimState, clock: FakeClock
) -> None:
    await exhaust(client, AUTH)

    clock.advance(1.0)
    response = await client.get(SELF, headers=AUTH)

    assert response.status_code == 200
    assert response.headers["x-rate-limit-remaining"] == "0.0"


async def test_simple_request_cost_is_configurable(
    client: httpx.AsyncClient, state: SimState
) -> None:
    state.throttle = SimpleThrottle(request_cost=0.25)

    response = await client.get(SELF, headers=AUTH)

    assert response.headers["x-request-cost"] == "0.25"
    assert response.headers["x-rate-limit-remaining"] == "699.75"
