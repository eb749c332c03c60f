"""Canvas's capacity per worker credential, shared by weight below the reserve (pure).

Contract: docs/proxy-rules.md#canvas-capacity.
"""

from __future__ import annotations

import pytest

from broker.core.capacity import (
    CANVAS_UP_FRONT_COST,
    FRESH,
    WINDOW,
    Budget,
    Demand,
    Sighting,
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


def demand(client: str, **values: float) -> Demand:
    """Another process's demand of ``client`` (asking, weight 1, nothing spent unless given)."""
    fields: dict[str, float] = {"asked": 1.0, "spent": 0.0, "spent_total": 0.0, **values}
    return Demand(
        client_id=client,
        weight=fields.get("weight", 1.0),
        asked=fields["asked"],
        spent=fields["spent"],
        spent_total=fields["spent_total"],
        in_flight=int(fields.get("in_flight", 0)),
        asking=True,
    )


def run_processes(
    jobs: list[tuple[str, int, float]], seconds: float, *, sync: bool
) -> tuple[dict[str, int], int]:
    """Jobs ``(client, process, calls a second)`` on two processes' Budgets of one credential.

    Canvas's bucket (high-water mark 600, outflow 10) answers every admitted call, cost 1,
    at once; with ``sync`` the processes merge each other's demand every 0.5 s. The calls
    each client got in the second half, and how many calls Canvas would have refused.
    """
    budgets = [Budget(), Budget()]
    count, refused, step = 0.0, 0, 0.01
    got = {client: 0 for client, _, _ in jobs}
    due = [0.0] * len(jobs)
    for tick in range(round(seconds / step)):
        now = tick * step
        count = max(0.0, count - OUTFLOW * step)
        if sync and tick % 50 == 0:
            for budget, other in ((budgets[0], budgets[1]), (budgets[1], budgets[0])):
                seen = other.sighting()
                budget.merge(now, other.demand(now), [] if seen is None else [seen])
        for n, (client, process, rate) in enumerate(jobs):
            if now < due[n]:
                continue
            due[n] = now + 1 / rate
            budget = budgets[process]
            decision = budget.admit(now, client, 1.0, reserve=RESERVE, outflow=OUTFLOW)
            if not decision.allowed:
                continue
            if count + CANVAS_UP_FRONT_COST >= 600.0:  # request_throttle.rb: over the mark
                refused += 1
                budget.settle(now, client, decision, cost=None, remaining=600.0 - count)
                continue
            count += 1.0
            budget.settle(now, client, decision, cost=1.0, remaining=600.0 - count)
            if now >= seconds / 2:
                got[client] += 1
    return got, refused


def test_a_greedy_client_alone_on_its_process_is_held_back_once_processes_share_demand() -> None:
    jobs = [("greedy", 0, 100.0), ("steady-1", 1, 5.0), ("steady-2", 1, 5.0)]
    # Each process on its own: the greedy job is "alone" on process 0 and never held back.
    unshared, _ = run_processes(jobs, 120.0, sync=False)
    assert unshared["greedy"] / 60 > 6.0
    got, refused = run_processes(jobs, 120.0, sync=True)
    per_second = {client: calls / 60 for client, calls in got.items()}
    assert per_second["greedy"] == pytest.approx(OUTFLOW / 3, rel=0.25)
    assert per_second["steady-1"] == pytest.approx(OUTFLOW / 3, rel=0.25)
    assert per_second["steady-2"] == pytest.approx(OUTFLOW / 3, rel=0.25)
    assert refused == 0


def test_a_client_alone_across_processes_is_never_held_back() -> None:
    # One job whose calls go to both processes: it has the whole outflow.
    got, _refused = run_processes([("bulk", 0, 50.0), ("bulk", 1, 50.0)], 60.0, sync=True)
    assert got["bulk"] / 30 >= OUTFLOW * 0.95


def test_another_process_s_client_asking_means_this_one_is_not_alone() -> None:
    budget = Budget()
    budget.observe(0.0, 100.0)
    budget.merge(0.0, [demand("steady", asked=5.0, spent=5.0)])
    outcomes = [call(budget, 0.0, "bulk", 10.0, 100.0) for _ in range(40)]
    assert False in outcomes  # held back although the only client this process serves
    assert budget.held_back > 0


def test_a_client_s_spend_in_other_processes_counts_against_its_allowance() -> None:
    budget = Budget()
    budget.observe(0.0, 100.0)
    call(budget, 0.0, "light", 0.1, 100.0)
    # "bulk" already spends the whole outflow elsewhere: here it gets nothing more.
    budget.merge(0.0, [demand("bulk", asked=50.0, spent=OUTFLOW)])
    assert not call(budget, 0.0, "bulk", 1.0, 100.0)
    assert call(budget, 0.0, "light", 0.1, 100.0)


def test_calls_in_flight_elsewhere_hold_their_up_front_cost_here() -> None:
    budget = Budget()
    budget.observe(0.0, 400.0)
    budget.merge(0.0, [demand("a", in_flight=2), demand("a", in_flight=1)])
    assert budget.estimate(0.0, OUTFLOW) == 400.0 - 3 * CANVAS_UP_FRONT_COST


def test_what_others_published_counts_only_while_fresh() -> None:
    budget = Budget()
    budget.observe(0.0, 600.0)
    budget.observe(0.0, 100.0)
    budget.merge(0.0, [demand("steady", asked=5.0, in_flight=1)])
    assert budget.estimate(0.0, OUTFLOW) == 100.0 - CANVAS_UP_FRONT_COST
    later = FRESH + 0.1
    assert budget.estimate(later, OUTFLOW) == pytest.approx(100.0 + OUTFLOW * later)
    budget.observe(later, 100.0)
    # No fresh word of "steady": "bulk" is alone again.
    assert all(call(budget, later, "bulk", 10.0, 100.0) for _ in range(20))


def test_a_newer_sighting_elsewhere_moves_the_estimate_an_older_one_does_not() -> None:
    budget = Budget()
    budget.observe(5.0, 500.0)
    budget.merge(6.0, [], [Sighting(remaining=300.0, seen_at=4.0, ceiling=600.0)])
    assert budget.estimate(6.0, OUTFLOW) == 510.0
    budget.merge(6.0, [], [Sighting(remaining=300.0, seen_at=6.0, ceiling=600.0)])
    assert budget.estimate(6.0, OUTFLOW) == 300.0
    assert budget.ceiling == 600.0


def test_a_process_that_never_called_learns_the_bucket_from_the_others() -> None:
    budget = Budget()
    assert budget.estimate(1.0, OUTFLOW) is None
    budget.merge(1.0, [], [Sighting(remaining=150.0, seen_at=1.0, ceiling=600.0)])
    assert budget.estimate(1.0, OUTFLOW) == 150.0


def test_demand_lists_the_clients_with_any_and_share_sums_every_process() -> None:
    budget = Budget()
    first = budget.admit(0.0, "a", 1.0, reserve=RESERVE, outflow=OUTFLOW)
    [published] = budget.demand(0.0)
    assert (published.client_id, published.in_flight, published.asking) == ("a", 1, True)
    budget.settle(0.0, "a", first, cost=2.0, remaining=598.0)
    assert budget.demand(10 * WINDOW) == []  # long idle: nothing to publish
    budget.merge(0.0, [demand("a", spent=1.0, spent_total=8.0), demand("b", weight=2.0)])
    share = budget.share_of(0.0, "a")
    assert share is not None
    assert share.share == pytest.approx(1 / 3)
    assert share.spent_total == 10.0
    assert share.spent_per_second == pytest.approx(1.0 + 2.0 / WINDOW, abs=0.01)
    remote_only = budget.share_of(0.0, "b")
    assert remote_only is not None
    assert (remote_only.weight, remote_only.asking) == (2.0, True)


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
