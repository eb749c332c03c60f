"""Canvas's rate limit per worker credential, shared fairly (docs/proxy-rules.md#canvas-capacity).

The simulator runs Canvas's throttle (broker/sim/throttle.py) with costs chosen so a bulk job
drains the credential's bucket in a few calls; the broker must hold it back before Canvas
would refuse, keep serving a light job on the same credential, and never forward what it held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.sim.throttle import CanvasThrottle
from tests.support.env import bearer

if TYPE_CHECKING:
    from tests.support.env import BrokerEnv

ASSIGNMENTS = "/api/v1/courses/1201/assignments"
COURSE = "/api/v1/courses/1201"
BULK_SCOPES = ("url:GET|/api/v1/courses/:course_id/assignments",)
LIGHT_SCOPES = ("url:GET|/api/v1/courses/:id",)


def expensive_assignments() -> CanvasThrottle:
    """Canvas's throttle where a course's assignment list costs 60 and the rest 0.1."""
    return CanvasThrottle(
        default_cost=0.1, costs=(("GET", r"/api/v1/courses/[^/]+/assignments", 60.0),)
    )


def forwarded(env: BrokerEnv, path: str) -> int:
    return sum(1 for r in env.sim.state.received if r.raw_path == path)


async def test_a_bulk_job_is_held_back_before_canvas_refuses_and_a_light_job_is_served(
    env: BrokerEnv,
) -> None:
    env.sim.state.throttle = expensive_assignments()
    bulk = await env.client_token("bulk", scopes=BULK_SCOPES)
    light = await env.client_token("light", scopes=LIGHT_SCOPES)
    assert (await env.http.get(COURSE, headers=bearer(light))).status_code == 200

    statuses = []
    for _ in range(12):
        statuses.append((await env.http.get(ASSIGNMENTS, headers=bearer(bulk))).status_code)
        if statuses[-1] == 429:
            break
    # Seven calls at 60 take Canvas's 600 under the reserve of 200; the next one waits.
    assert statuses == [200] * 7 + [429]
    assert forwarded(env, ASSIGNMENTS) == 7
    held = await env.http.get(ASSIGNMENTS, headers=bearer(bulk))
    assert held.status_code == 429
    assert held.json()["error"] == "canvas_capacity"
    assert 1 <= int(held.headers["retry-after"]) <= 60
    assert forwarded(env, ASSIGNMENTS) == 7  # nothing held back reached Canvas

    for _ in range(5):
        assert (await env.http.get(COURSE, headers=bearer(light))).status_code == 200
    assert forwarded(env, COURSE) == 6

    [denied, *_] = await env.audit(reason="canvas_capacity")
    assert (denied["decision"], denied["status"], denied["path"]) == ("deny", 429, ASSIGNMENTS)
    metrics = (await env.http.get("/metrics")).text
    assert 'broker_canvas_held_back_total{client="' in metrics
    assert "broker_canvas_capacity_remaining" in metrics


async def test_a_client_alone_gets_canvas_s_own_403_relayed_as_sent(env: BrokerEnv) -> None:
    env.sim.state.throttle = CanvasThrottle(default_cost=300.0)
    token = await env.client_token("alone", scopes=BULK_SCOPES)

    responses = [await env.http.get(ASSIGNMENTS, headers=bearer(token)) for _ in range(3)]

    assert [r.status_code for r in responses] == [200, 200, 403]
    refused = responses[2]
    assert refused.text == "403 Forbidden (Rate Limit Exceeded)\n"
    assert float(refused.headers["x-rate-limit-remaining"]) < 1.0
    assert forwarded(env, ASSIGNMENTS) == 3
    [last, *_] = await env.audit(kind="proxy")
    assert (last["decision"], last["reason"], last["status"]) == (
        "allow",
        "canvas_rate_limited",
        403,
    )
    assert last["upstream_status"] == 403
    metrics = (await env.http.get("/metrics")).text
    assert "broker_canvas_throttled_total{" in metrics


async def test_each_completion_records_what_the_call_cost_canvas(env: BrokerEnv) -> None:
    env.sim.state.throttle = expensive_assignments()
    token = await env.client_token("job", scopes=BULK_SCOPES)

    assert (await env.http.get(ASSIGNMENTS, headers=bearer(token))).status_code == 200

    [call] = await env.audit(kind="proxy")
    assert call["details"] == {"canvas_request_cost": 60.0}
    metrics = (await env.http.get("/metrics")).text
    assert "broker_canvas_request_cost_total" in metrics


async def test_clients_get_shows_the_weight_and_the_share(env: BrokerEnv) -> None:
    heavy_id, heavy_secret = await env.client("heavy", scopes=BULK_SCOPES, canvas_weight=3.0)
    light_id, light_secret = await env.client("light", scopes=BULK_SCOPES)
    for client_id, secret in ((heavy_id, heavy_secret), (light_id, light_secret)):
        token = await env.token(client_id, secret)
        assert (await env.http.get(ASSIGNMENTS, headers=bearer(token))).status_code == 200

    body = (await env.http.get(f"/broker/v1/clients/{heavy_id}", headers=env.admin())).json()

    assert body["canvas_weight"] == 3.0
    share = body["canvas_share"]
    assert (share["weight"], share["share"], share["asking"]) == (3.0, 0.75, True)
    assert share["spent_total"] == 1.0
    assert share["credential_remaining"] is not None


async def test_a_weight_must_be_positive_and_its_change_is_reported(env: BrokerEnv) -> None:
    refused = await env.http.post(
        "/broker/v1/clients",
        headers=env.admin(),
        json={"name": "w", "credential": "worker", "scopes": list(BULK_SCOPES), "canvas_weight": 0},
    )
    assert refused.status_code == 422
    assert "canvas_weight" in refused.text
    client_id, _ = await env.client("w", scopes=BULK_SCOPES)

    changed = await env.http.patch(
        f"/broker/v1/clients/{client_id}", headers=env.admin(), json={"canvas_weight": 2.5}
    )

    assert changed.status_code == 200, changed.text
    assert changed.json()["changes"]["canvas_weight"] == {"old": 1.0, "new": 2.5}
