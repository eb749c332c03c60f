"""Canvas's rate limit shared fairly across two replicas of `broker serve --workers 2`.

Contract: docs/proxy-rules.md#canvas-capacity. Four processes on one database (SQLite, or
PostgreSQL with BROKER_TEST_DATABASE_URL) in front of the simulator's Canvas throttle. Each
job holds its own keep-alive connections, so each is pinned to processes of its own: the
greedy job's to replica A, the two steady jobs' to replica B. The greedy job, alone on its
processes, must still be held back by what the steady ones ask on the others; nothing held
back reaches Canvas; Canvas's own 403s stay near zero; a job alone on its credential, its
calls spread over every process, still spends the whole bucket.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from broker.sim.server import SimServer
from broker.sim.state import SimState
from broker.sim.throttle import CanvasThrottle
from tests.support.env import WORKER_TOKEN
from tests.support.serve import free_port, init, serve, sqlite_env

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

V1 = "/broker/v1"
OUTFLOW = 20.0  # units a second, the throttle's and the broker's (BROKER_CANVAS_OUTFLOW)
STEADY_RATE = 4.0  # calls a second per steady job, each costing 1: under an equal share
LONE_TOKEN = "sim-lone-worker-token-5d1e"
ROSTER_COST = 30.0
DRAINED_WITHIN = 30.0  # seconds: the greedy job takes the bucket from 600 to the reserve (200)
SETTLE = 1.0  # seconds after the greedy job is first held back, before measuring
MEASURED = 8.0
SHARING_ROUND = 1.0  # seconds: twice the interval at which processes share their demand
COURSES = {"greedy": "/api/v1/courses/1201", "steady-1": "/api/v1/courses/1202"}
COURSES["steady-2"] = "/api/v1/courses/1203"
ROSTER = "/api/v1/courses/1201/users"


@pytest.fixture
def sim() -> Iterator[SimServer]:
    """A simulator of this test's own: it knows a second worker token, for the lone job."""
    with SimServer(SimState(tokens={WORKER_TOKEN, LONE_TOKEN})) as server:
        yield server


@dataclass
class Job:
    """One job's answers: (seconds since the start, status, error code)."""

    answers: list[tuple[float, int, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def statuses(self, since: float = 0.0, until: float = float("inf")) -> list[int]:
        return [status for at, status, _ in self.answers if since <= at < until]

    def first(self, status: int) -> float | None:
        return next((at for at, got, _ in list(self.answers) if got == status), None)


def _call(http: httpx.Client, path: str, token: str, job: Job, started: float) -> None:
    try:
        answer = http.get(path, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        job.failures.append(repr(exc))
        return
    error = answer.json().get("error", "") if answer.status_code == 429 else ""
    job.answers.append((time.monotonic() - started, answer.status_code, error))


def _run(
    url: str, path: str, token: str, job: Job, stop: threading.Event, started: float, rate: float
) -> None:
    """Calls on one keep-alive connection, ``rate`` a second (0: as fast as it can)."""
    next_at = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            _call(http, path, token, job, started)
            if rate:
                next_at += 1 / rate
                stop.wait(max(0.0, next_at - time.monotonic()))


def _client(url: str, admin: dict[str, str], name: str, credential: str, scope: str) -> str:
    created = httpx.post(
        f"{url}{V1}/clients",
        headers=admin,
        json={"name": name, "credential": credential, "scopes": [f"url:GET|{scope}"]},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    minted = httpx.post(
        f"{url}{V1}/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(created.json()["client_id"], created.json()["client_secret"]),
        timeout=10,
    )
    assert minted.status_code == 200, minted.text
    token: str = minted.json()["access_token"]
    return token


def _forwarded(sim: SimServer, path: str, worker_token: str) -> int:
    return sum(
        1
        for r in list(sim.state.received)
        if r.raw_path == path and r.header("authorization") == f"Bearer {worker_token}"
    )


def _assert_a_lone_job_spends_the_whole_bucket(replicas: list[str], token: str) -> None:
    """Alone on its credential, its calls over both replicas and (new connections) every
    worker: never held back, it spends the bucket until Canvas itself says no."""
    lone, started = Job(), time.monotonic()
    for n in range(60):
        with httpx.Client(base_url=replicas[n % 2], timeout=30) as http:
            _call(http, ROSTER, token, lone, started)
        if 403 in lone.statuses():
            break
    assert lone.failures == []
    assert 429 not in lone.statuses(), lone.answers
    assert 403 in lone.statuses(), lone.answers
    assert lone.statuses().count(200) >= (600 - 50) // ROSTER_COST - 1


def _await_asking(url: str, admin: dict[str, str], name: str) -> None:
    """Until the process answering at ``url`` counts client ``name`` as asking (at most 10 s),
    then one more sharing round, so every process of that replica has merged the demand."""
    for _ in range(100):
        got = httpx.get(f"{url}{V1}/clients/{name}", headers=admin, timeout=10)
        assert got.status_code == 200, got.text
        if got.json()["canvas_share"]["asking"]:
            time.sleep(SHARING_ROUND)
            return
        time.sleep(0.1)
    raise AssertionError(f"replica {url} never saw {name} asking")


def _three_jobs(
    replica_a: str, replica_b: str, tokens: dict[str, str], admin: dict[str, str]
) -> tuple[dict[str, Job], dict[str, Any], tuple[float, float]]:
    """Greedy (two connections to A, as fast as they go) and two steady (one connection each
    to B) on one credential; their answers, the greedy job's record as B shows it, and the
    window measured: from a moment after the greedy job was first held back (or the bound)."""
    jobs = {name: Job() for name in COURSES}
    stop, started = threading.Event(), time.monotonic()
    steady = [
        threading.Thread(
            target=_run,
            args=(replica_b, COURSES[name], tokens[name], jobs[name], stop),
            kwargs={"started": started, "rate": STEADY_RATE},
        )
        for name in ("steady-1", "steady-2")
    ]
    greedy = [
        threading.Thread(
            target=_run,
            args=(replica_a, COURSES["greedy"], tokens["greedy"], jobs["greedy"], stop),
            kwargs={"started": started, "rate": 0.0},
        )
        for _ in range(2)
    ]
    threads = steady + greedy
    for thread in steady:
        thread.start()
    try:
        # The greedy job arrives while the steady ones run, once replica A knows they ask.
        # Demand is shared twice a second (docs/proxy-rules.md#canvas-capacity): a greedy
        # job started in the same moment drains the bucket from the reserve to Canvas's own
        # refusals in about 0.2 s, before its processes can know it is not alone.
        _await_asking(replica_a, admin, "steady-1")
        for thread in greedy:
            thread.start()
        held_at = None
        while held_at is None and time.monotonic() - started < DRAINED_WITHIN:
            stop.wait(0.1)
            held_at = jobs["greedy"].first(429)
        since = (time.monotonic() - started if held_at is None else held_at) + SETTLE
        stop.wait(max(0.0, since + MEASURED - (time.monotonic() - started)))
        share = httpx.get(f"{replica_b}{V1}/clients/greedy", headers=admin, timeout=10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert share.status_code == 200, share.text
    record: dict[str, Any] = share.json()
    return jobs, record, (since, since + MEASURED)


def test_two_replicas_of_two_workers_hold_a_greedy_job_back_and_keep_the_steady_ones(
    tmp_path: Path, sim: SimServer, database_url: str
) -> None:
    sim.state.throttle = CanvasThrottle(
        outflow=OUTFLOW,
        default_cost=1.0,
        costs=(("GET", r"/api/v1/courses/[^/]+/users", ROSTER_COST),),
    )
    env = sqlite_env(tmp_path, BROKER_DATABASE_URL=database_url, BROKER_CANVAS_OUTFLOW=str(OUTFLOW))
    admin = init(env)
    ports = [free_port(), free_port()]
    replicas = [
        serve(env, ports[0], tmp_path / "a.log", workers=2),
        serve(env, ports[1], tmp_path / "b.log", workers=2),
    ]
    replica_a, replica_b = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        for path, body in [
            (f"{V1}/upstreams", {"name": "sim", "base_url": sim.base_url}),
            (f"{V1}/credentials", {"upstream": "sim", "name": "w", "token": WORKER_TOKEN}),
            (f"{V1}/credentials", {"upstream": "sim", "name": "lone", "token": LONE_TOKEN}),
        ]:
            made = httpx.post(replica_a + path, json=body, headers=admin, timeout=10)
            assert made.status_code == 201, made.text
        sim.state.received.clear()
        tokens = {
            name: _client(replica_a, admin, name, "w", path) for name, path in COURSES.items()
        }
        lone_token = _client(replica_a, admin, "lone", "lone", "/api/v1/courses/:id/users")

        _assert_a_lone_job_spends_the_whole_bucket([replica_a, replica_b], lone_token)
        jobs, share, window = _three_jobs(replica_a, replica_b, tokens, admin)
    finally:
        for replica in replicas:
            replica.terminate()
        for replica in replicas:
            replica.wait(timeout=30)

    for name, job in jobs.items():
        assert job.failures == [], (name, job.failures)
    greedy = jobs["greedy"]
    # Held back by the broker, with nothing of it forwarded: Canvas saw its admitted calls
    # and the ones it refused itself, not one of the 429s.
    held = [a for a in greedy.answers if a[1] == 429]
    assert held, "the greedy job was never held back"
    assert {error for _, _, error in held} == {"canvas_capacity"}
    sent = greedy.statuses().count(200) + greedy.statuses().count(403)
    assert _forwarded(sim, COURSES["greedy"], WORKER_TOKEN) == sent
    # Measured once the bucket is down to the reserve: the steady jobs get about what they
    # ask (each under an equal share), the greedy one about what is left, not all of it.
    for name in ("steady-1", "steady-2"):
        got = jobs[name].statuses(*window).count(200) / MEASURED
        assert got >= 0.6 * STEADY_RATE, (name, got, jobs[name].statuses(*window))
    greedy_rate = greedy.statuses(*window).count(200) / MEASURED
    assert greedy_rate <= 0.8 * OUTFLOW, greedy_rate
    # Canvas's own 403s that got through: near zero.
    canvas_403 = sum(job.statuses().count(403) for job in jobs.values())
    forwarded = sum(_forwarded(sim, path, WORKER_TOKEN) for path in COURSES.values())
    assert canvas_403 <= max(3, 0.02 * forwarded), (canvas_403, forwarded)
    # Replica B never served the greedy job, yet shows its share among three asking jobs.
    assert share["canvas_share"]["asking"] is True, share
    assert abs(share["canvas_share"]["share"] - 1 / 3) < 0.01, share
