"""Canvas's capacity per worker credential, shared by weight below the reserve (pure).

Contract: docs/proxy-rules.md#canvas-capacity.
"""

from __future__ import annotations

import pytest

from broker.core.capacity import (
    CANVAS_UP_FRONT_COST,
    WINDOW,
    Budget,
    canvas_throttled,
    parse_number,
    water_fill,
)

RESERVE = 200.0
OUTFLOW = 10.0


def admit(budget: Budget, now: float, client: str, weight: float = 1.0) -> bool:
    decision = budget.admit(now, client, weight, reserve=RESERVE, outflow=OUTFLOW)
    if decision.allowed:
        budget.settle(now, client, decision, cost=None, remaining=None)
    return decision.allowed


def call(budget: Budget, now: float, client: str, cost: float, remaining: float) -> bool:
    """One call that Canvas answers with ``cost`` and ``remaining``, if admitted."""
    decision = budget.admit(now, client, 1.0, reserve=RESERVE, outflow=OUTFLOW)
    if decision.allowed:
        budget.settle(now, client, decision, cost=cost, remaining=remaining)
    return decision.allowed


def test_before_canvas_reports_anything_every_call_goes() -> None:
    budget = Budget()
    assert all(admit(budget, 0.0, name) for name in ("a", "b", "a", "b"))
    assert budget.estimate(0.0, OUTFLOW) is None


def test_at_or_above_the_reserve_every_call_goes() -> None:
    budget = Budget()
    budget.observe(0.0, RESERVE)
    assert all(call(budget, 0.0, name, 50.0, RESERVE) for name in ("a", "b") * 5)


def test_a_reserve_of_zero_turns_sharing_off_even_past_an_empty_bucket() -> None:
    # Canvas's X-Rate-Limit-Remaining goes negative, down to hwm - maximum (-200).
    budget = Budget()
    budget.observe(0.0, -150.0)
    for n in range(20):
        name = ("bulk", "light")[n % 2]
        decision = budget.admit(0.01 * n, name, 1.0, reserve=0.0, outflow=OUTFLOW)
        assert decision.allowed
        budget.settle(0.01 * n, name, decision, cost=1.0, remaining=-150.0 - n)
    assert budget.held_back == 0


def test_a_client_alone_is_never_held_back() -> None:
    budget = Budget()
    budget.observe(0.0, 600.0)
    assert all(call(budget, 0.1 * i, "bulk", 100.0, max(0.0, 500.0 - 100 * i)) for i in range(10))
    assert budget.held_back == 0


def test_below_the_reserve_the_greedy_client_is_held_back_and_the_light_one_served() -> None:
    budget = Budget()
    budget.observe(0.0, 600.0)
    assert call(budget, 0.0, "light", 0.1, 599.9)
    remaining = 599.9
    outcomes = []
    for i in range(10):
        allowed = call(budget, 0.01 * i, "bulk", 60.0, remaining - 60.0)
        remaining -= 60.0 if allowed else 0.0
        outcomes.append(allowed)
    # The bulk job spends freely down to the reserve, then is held back.
    assert outcomes[:7] == [True] * 7
    assert outcomes[7:] == [False] * 3
    assert remaining == pytest.approx(179.9)
    held = budget.admit(0.1, "bulk", 1.0, reserve=RESERVE, outflow=OUTFLOW)
    assert not held.allowed
    assert 1 <= held.retry_after <= 60
    # The light job still goes, again and again.
    assert all(call(budget, 0.1 + 0.01 * i, "light", 0.1, 179.9) for i in range(5))
    assert budget.held_back == 4


def test_weights_split_the_outflow() -> None:
    allocation = water_fill(9.0, {"a": (2.0, 100.0), "b": (1.0, 100.0)})
    assert allocation == pytest.approx({"a": 6.0, "b": 3.0})


def test_a_client_asking_less_than_its_share_gets_all_it_asks_and_the_rest_goes_on() -> None:
    allocation = water_fill(10.0, {"light": (1.0, 0.5), "bulk": (1.0, 100.0), "mid": (1.0, 3.0)})
    assert allocation == pytest.approx({"light": 0.5, "mid": 3.0, "bulk": 6.5})


def test_the_estimate_ages_by_the_outflow_up_to_the_most_canvas_reported() -> None:
    budget = Budget()
    budget.observe(0.0, 600.0)
    budget.observe(1.0, 100.0)
    assert budget.estimate(1.0, OUTFLOW) == 100.0
    assert budget.estimate(11.0, OUTFLOW) == 200.0
    assert budget.estimate(1000.0, OUTFLOW) == 600.0


def test_calls_in_flight_hold_canvas_s_up_front_cost() -> None:
    budget = Budget()
    budget.observe(0.0, 300.0)
    first = budget.admit(0.0, "a", 1.0, reserve=RESERVE, outflow=OUTFLOW)
    second = budget.admit(0.0, "a", 1.0, reserve=RESERVE, outflow=OUTFLOW)
    assert first.allowed
    assert second.allowed
    assert budget.estimate(0.0, OUTFLOW) == 300.0 - 2 * CANVAS_UP_FRONT_COST
    budget.settle(0.0, "a", first, cost=1.0, remaining=299.0)
    budget.settle(0.0, "a", second, cost=None, remaining=None)
    assert budget.in_flight == 0


def test_a_client_that_stopped_asking_leaves_the_sharing() -> None:
    budget = Budget()
    budget.observe(0.0, 600.0)
    call(budget, 0.0, "other", 1.0, 150.0)
    later = WINDOW + 1.0
    budget.observe(later, 100.0)
    # "other" asked more than a window ago: "bulk" is alone again.
    assert all(call(budget, later, "bulk", 100.0, 100.0) for _ in range(5))


def test_share_reports_weight_share_and_spend() -> None:
    budget = Budget()
    call(budget, 0.0, "a", 2.0, 598.0)
    budget.admit(0.0, "b", 3.0, reserve=RESERVE, outflow=OUTFLOW)
    share = budget.share_of(0.0, "a")
    assert share is not None
    assert share.weight == 1.0
    assert share.share == pytest.approx(0.25)
    assert share.asking
    assert share.spent_total == 2.0
    assert budget.share_of(0.0, "nobody") is None


def test_canvas_throttled_is_the_403_without_a_cost() -> None:
    throttled = [(b"X-Rate-Limit-Remaining", b"0.0"), (b"Content-Type", b"text/plain")]
    permission = [(b"x-rate-limit-remaining", b"512.3"), (b"x-request-cost", b"0.02")]
    assert canvas_throttled(403, throttled)
    assert not canvas_throttled(403, permission)
    assert not canvas_throttled(200, throttled)
    assert not canvas_throttled(403, [])


@pytest.mark.parametrize(
    ("raw", "number"),
    [
        (b"0.25", 0.25),
        (b"-150.0", -150.0),
        (b"nan", None),
        (b"inf", None),
        (b"x", None),
        (None, None),
    ],
)
def test_header_numbers(raw: bytes | None, number: float | None) -> None:
    assert parse_number(raw) == number
