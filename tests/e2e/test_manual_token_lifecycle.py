"""Manual tokens with a lifecycle, end to end against the simulator's Access Tokens API.

Contract: docs/interfaces.md#manual-tokens-with-a-lifecycle. A manual token's expiry, purpose
and Canvas id are read when it is stored; ``rotate --regenerate`` and the rotation schedule have
Canvas regenerate it (once across replicas); a call racing a regeneration is resent; an expired
token is refused before anything is sent.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import update

from broker.errors import ValidationFailedError
from broker.services.management import ManagementService
from broker.services.manual_tokens import (
    EXPIRY_WARNING,
    ManualTokenService,
    parse_rotate_every,
)
from broker.services.revocation import CacheEpoch
from broker.services.tokens import WORKER_TOKEN_PURPOSE
from broker.storage import credentials, models
from broker.storage.credentials import SealedToken
from tests.e2e.test_cli_management import Cli
from tests.support.env import bearer

if TYPE_CHECKING:
    from collections.abc import Sequence

    from broker.sim.credentials import AccessToken
    from broker.sim.server import SimServer
    from broker.upstream import Forwarder, UpstreamResponse
    from tests.e2e.conftest import LiveBroker
    from tests.support.env import BrokerEnv

V1 = "/broker/v1"
COURSE = "/api/v1/courses/1201"
SCOPES = ["url:GET|/api/v1/courses/:id"]
SELF = "/api/v1/users/self"
TOKENS = "/api/v1/users/self/tokens/"


def _now() -> datetime:
    return datetime.now(UTC)


async def _store(
    env: BrokerEnv,
    *,
    expires_in: timedelta | None = timedelta(days=60),
    name: str = "rotating",
    **options: Any,
) -> tuple[AccessToken, dict[str, Any]]:
    """A manual token at the simulator, stored as credential ``name`` through the API."""
    record = env.sim.state.add_manual_token(
        purpose="broker worker",
        expires_at=None if expires_in is None else _now() + expires_in,
    )
    response = await env.http.post(
        f"{V1}/credentials",
        headers=env.admin(),
        json={"upstream": "sim", "name": name, "token": record.value, **options},
    )
    assert response.status_code == 201, response.text
    return record, response.json()


async def _client_token(env: BrokerEnv, credential: str = "rotating") -> str:
    client_id, secret = await env.client(f"job-{credential}", scopes=SCOPES, credential=credential)
    return await env.token(client_id, secret)


def _rotator(env: BrokerEnv) -> ManualTokenService:
    """Another process's rotation loop on the same database (its own epoch: another replica)."""
    context = env.context
    return ManualTokenService(context.sessions, context.keyring, CacheEpoch(), context.forwarder)


async def _make_due(env: BrokerEnv, credential_id: str) -> None:
    async with env.context.sessions.begin() as session:
        await session.execute(
            update(models.WorkerCredential)
            .where(models.WorkerCredential.id == credential_id)
            .values(rotate_due_at=_now() - timedelta(seconds=1))
        )


def _puts(sim: SimServer) -> list[str]:
    return [r.raw_path for r in sim.state.received if r.method == "PUT"]


def _canvas_answer(sim: SimServer, token: str) -> int:
    """What the simulator answers ``token`` at GET /api/v1/users/self."""
    return httpx.get(sim.base_url + SELF, headers=bearer(token)).status_code


def _no_value_in(events: Sequence[dict[str, Any]], *values: str) -> None:
    text = json.dumps(list(events))
    for value in values:
        assert value not in text


async def test_expiry_purpose_and_canvas_id_are_recorded_when_the_token_is_stored(
    env: BrokerEnv,
) -> None:
    record, created = await _store(env)
    assert created["token_purpose"] == "broker worker"
    assert created["canvas_token_id"] == str(record.id)
    assert record.permanent_expires_at is not None
    stored = datetime.fromisoformat(created["token_expires_at"])
    assert abs(stored - record.permanent_expires_at) < timedelta(seconds=1)
    assert created["warnings"] == []
    # Looked up by its hint (the first five characters), as Canvas's tokens API allows.
    assert f"{TOKENS}{record.value[:5]}" in env.sim.state.received_paths()
    _no_value_in(await env.audit(action="credential.create"), record.value)


class _NoTokensApi:
    """A Canvas without the Access Tokens API: its paths answer 404 (an unknown route)."""

    def __init__(self, inner: Forwarder) -> None:
        self._inner = inner

    async def send(
        self, method: str, url: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> UpstreamResponse:
        return await self._inner.send(
            method, url.replace(TOKENS, "/api/v1/no_such_api/"), headers, body
        )

    async def aclose(self) -> None:
        """The inner pool is the app's."""


async def test_a_canvas_without_the_tokens_api_still_gets_the_token_stored_with_a_warning(
    env: BrokerEnv,
) -> None:
    record = env.sim.state.add_manual_token(expires_at=_now() + timedelta(days=30))
    context = env.context
    service = ManagementService(
        context.sessions,
        context.keyring,
        context.settings,
        forwarder=_NoTokensApi(context.forwarder),
    )
    warnings: list[str] = []
    from tests.support.env import LOCAL  # noqa: PLC0415

    credential = await service.create_credential(
        LOCAL, upstream="sim", name="old-canvas", token=record.value, warnings=warnings
    )
    assert credential.canvas_user_id == "1"
    assert credential.token_expires_at is None
    assert credential.canvas_token_id is None
    [warning] = warnings
    assert "expiry is unknown" in warning
    assert "404" in warning
    assert record.value not in warning


async def test_rotate_regenerate_stores_the_new_value_and_kills_the_old(env: BrokerEnv) -> None:
    record, created = await _store(env)
    token = await _client_token(env)
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200
    old = record.value
    rotated = await env.http.post(
        f"{V1}/credentials/rotating/rotate", headers=env.admin(), json={"regenerate": True}
    )
    assert rotated.status_code == 200, rotated.text
    new = record.value
    assert new != old
    body = rotated.json()
    assert body["token_last4"] == new[-4:]
    assert body["rotated_at"] is not None
    assert body["canvas_token_id"] == created["canvas_token_id"]
    assert body["token_expires_at"] == created["token_expires_at"]  # regenerating keeps it
    assert old not in rotated.text
    assert new not in rotated.text
    assert _canvas_answer(env.sim, old) == 401
    assert _canvas_answer(env.sim, new) == 200
    # The PUT was authenticated by the token itself and addressed its Canvas id.
    [put] = [r for r in env.sim.state.received if r.method == "PUT"]
    assert put.raw_path == f"{TOKENS}{record.id}"
    assert put.header("authorization") == f"Bearer {old}"
    for _ in range(3):
        response = await env.http.get(COURSE, headers=bearer(token))
        assert response.status_code == 200, response.text
        assert env.sim.state.received[-1].header("authorization") == f"Bearer {new}"
    [event] = await env.audit(action="credential.rotate")
    assert event["details"]["changes"]["regenerated"] is True
    assert event["details"]["changes"]["token_last4"] == new[-4:]
    _no_value_in([event], old, new)
    report = await env.verify_audit()
    assert report["ok"] is True, report


async def test_a_regeneration_canvas_refuses_changes_nothing(env: BrokerEnv) -> None:
    record, created = await _store(env)
    token = await _client_token(env)
    env.sim.state.delete_token(record)  # revoked at Canvas: it can no longer manage itself
    refused = await env.http.post(
        f"{V1}/credentials/rotating/rotate", headers=env.admin(), json={"regenerate": True}
    )
    assert refused.status_code == 502, refused.text
    error = refused.json()
    assert error["error"] == "canvas_refused_regenerate"
    assert "401" in error["message"]
    assert "nothing changed" in error["message"]
    assert record.value not in refused.text
    after = (await env.http.get(f"{V1}/credentials/rotating", headers=env.admin())).json()
    assert after["token_last4"] == created["token_last4"]
    assert after["rotated_at"] is None
    assert await env.audit(action="credential.rotate") == []
    del token


async def test_regenerate_and_a_token_together_are_refused(env: BrokerEnv) -> None:
    record, _created = await _store(env)
    response = await env.http.post(
        f"{V1}/credentials/rotating/rotate",
        headers=env.admin(),
        json={"regenerate": True, "token": record.value},
    )
    assert response.status_code == 422, response.text
    missing = await env.http.post(f"{V1}/credentials/rotating/rotate", headers=env.admin(), json={})
    assert missing.status_code == 422, missing.text


async def test_the_schedule_rotates_once_across_replicas(env: BrokerEnv) -> None:
    record, created = await _store(env, rotate_every="2h")
    assert created["rotate_every"] == 7200
    due = datetime.fromisoformat(created["rotate_due_at"])
    assert timedelta(hours=1, minutes=59) < due - _now() <= timedelta(hours=2)
    token = await _client_token(env)
    old = record.value
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200
    env.sim.state.received.clear()

    replicas = [_rotator(env), _rotator(env)]
    stopping = asyncio.Event()
    # Nothing is due yet: the loops run and regenerate nothing.
    loops = [asyncio.ensure_future(r.run(stopping)) for r in replicas]
    await asyncio.sleep(0.3)
    assert _puts(env.sim) == []
    await _make_due(env, created["id"])
    for replica in replicas:
        replica.wake()
    statuses = []
    try:
        for _ in range(10):
            statuses.append((await env.http.get(COURSE, headers=bearer(token))).status_code)
            await asyncio.sleep(0.1)
        # Both try at once as well: the lease lets one through.
        await asyncio.gather(*(r.run_once() for r in replicas))
    finally:
        stopping.set()
        await asyncio.gather(*loops)
    assert _puts(env.sim) == [f"{TOKENS}{record.id}"]
    assert set(statuses) == {200}
    assert record.value != old
    assert _canvas_answer(env.sim, old) == 401
    listed = (await env.http.get(f"{V1}/credentials/rotating", headers=env.admin())).json()
    assert listed["token_last4"] == record.value[-4:]
    next_due = datetime.fromisoformat(listed["rotate_due_at"])
    assert timedelta(hours=1, minutes=59) < next_due - _now() <= timedelta(hours=2)
    [event] = await env.audit(action="credential.rotate")
    assert event["details"]["changes"]["regenerated"] is True
    assert event["details"]["changes"]["scheduled"] is True
    assert event["actor_key_id"] is None
    _no_value_in([event], old, record.value)


async def _cached(env: BrokerEnv, token: str) -> None:
    """Call until the proxy serves ``token`` from its cache (its revocation epoch is polled)."""
    for _ in range(2):
        assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200
        await asyncio.sleep(0.4)


async def test_a_call_racing_a_rotation_by_another_replica_is_resent_and_succeeds(
    env: BrokerEnv,
) -> None:
    record, created = await _store(env)
    token = await _client_token(env)
    await _cached(env, token)
    old = record.value
    # Another replica is rotating: it holds the lease and Canvas has just regenerated the
    # token (the old value is dead), but the new one is not stored yet.
    now = _now()
    async with env.context.sessions.begin() as session:
        assert await credentials.ROTATION_LEASE.take(
            session,
            created["id"],
            holder="other-replica",
            now=now,
            until=now + timedelta(seconds=30),
            due_by=None,
        )
    env.sim.state.regenerate(record)
    new = record.value
    env.sim.state.received.clear()

    async def other_replica_stores() -> None:
        await asyncio.sleep(0.3)
        seal = env.context.keyring.encrypt
        async with env.context.sessions.begin() as session:
            await credentials.replace_token(
                session,
                created["id"],
                SealedToken(
                    *seal(new.encode(), purpose=WORKER_TOKEN_PURPOSE, record_id=created["id"])
                ),
                last4=new[-4:],
                at=_now(),
            )

    storing = asyncio.ensure_future(other_replica_stores())
    response = await env.http.get(COURSE, headers=bearer(token))
    await storing
    assert response.status_code == 200, response.text
    sent = [r.header("authorization") for r in env.sim.state.received]
    assert sent == [f"Bearer {old}", f"Bearer {new}"]


async def test_a_call_after_another_replica_regenerated_uses_the_new_token(
    env: BrokerEnv,
) -> None:
    record, created = await _store(env)
    token = await _client_token(env)
    await _cached(env, token)
    await _rotator(env).regenerate(created["id"], actor_key_id=None)
    env.sim.state.received.clear()
    for _ in range(3):
        response = await env.http.get(COURSE, headers=bearer(token))
        assert response.status_code == 200, response.text
    assert env.sim.state.received[-1].header("authorization") == f"Bearer {record.value}"


async def test_an_expired_manual_token_is_refused_before_anything_is_sent(
    env: BrokerEnv,
) -> None:
    await _store(env, expires_in=timedelta(seconds=2))
    token = await _client_token(env)
    await asyncio.sleep(2.2)
    env.sim.state.received.clear()
    response = await env.http.get(COURSE, headers=bearer(token))
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "credential_expired"
    assert [r for r in env.sim.state.received if r.raw_path != SELF] == []
    [refusal] = await env.audit(reason="credential_expired")
    assert refusal["status"] == 503
    listed = (await env.http.get(f"{V1}/credentials/rotating", headers=env.admin())).json()
    [warning] = listed["warnings"]
    assert "expired" in warning
    assert "credential_expired" in warning
    metrics = (await env.http.get("/metrics")).text
    assert (
        'broker_credential_unavailable{credential="rotating",reason="credential_expired"} 1.0'
        in metrics
    )
    ready = (await env.http.get("/readyz")).json()
    [unavailable] = ready["unavailable_credentials"]
    assert (unavailable["name"], unavailable["reason"]) == ("rotating", "credential_expired")
    assert "broker credentials rotate NAME" in unavailable["action"]


async def test_credentials_list_warns_of_a_token_near_expiry_and_metrics_show_it(
    env: BrokerEnv,
) -> None:
    assert timedelta(days=14) == EXPIRY_WARNING
    await _store(env, expires_in=timedelta(days=3, hours=1))
    await _store(env, name="far", expires_in=timedelta(days=60))
    listed = (await env.http.get(f"{V1}/credentials", headers=env.admin())).json()
    warnings = {c["name"]: c["warnings"] for c in listed}
    [near] = warnings["rotating"]
    assert near.startswith("token expires in 3 days")
    assert "broker credentials rotate rotating --regenerate" in near
    assert warnings["far"] == []
    assert warnings["worker"] == []  # the simulator's plain token never expires
    one = (await env.http.get(f"{V1}/credentials/rotating", headers=env.admin())).json()
    assert one["warnings"] == [near]
    metrics = (await env.http.get("/metrics")).text
    [line] = [
        m
        for m in metrics.splitlines()
        if m.startswith('broker_credential_token_expires_seconds{credential="rotating"}')
    ]
    seconds = float(line.split()[-1])
    assert timedelta(days=3) < timedelta(seconds=seconds) <= timedelta(days=3, hours=1)


async def test_the_schedule_is_set_and_removed_with_update(env: BrokerEnv) -> None:
    _record, created = await _store(env)
    assert created["rotate_every"] is None
    changed = await env.http.patch(
        f"{V1}/credentials/rotating", headers=env.admin(), json={"rotate_every": "P30D"}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["rotate_every"] == 30 * 86400
    too_short = await env.http.patch(
        f"{V1}/credentials/rotating", headers=env.admin(), json={"rotate_every": "30m"}
    )
    assert too_short.status_code == 422, too_short.text
    removed = await env.http.patch(
        f"{V1}/credentials/rotating", headers=env.admin(), json={"rotate_every": None}
    )
    assert removed.json()["rotate_every"] is None
    assert removed.json()["rotate_due_at"] is None


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        ("30d", 30 * 86400),
        ("12h", 12 * 3600),
        ("90m", 5400),
        ("2w", 14 * 86400),
        ("3600", 3600),
        (7200, 7200),
        ("P30D", 30 * 86400),
        ("PT1H", 3600),
        ("P1DT12H", 36 * 3600),
        (None, None),
    ],
)
def test_rotate_every_accepts_seconds_short_and_iso_durations(
    given: int | str | None, seconds: int | None
) -> None:
    assert parse_rotate_every(given) == seconds


@pytest.mark.parametrize("given", ["59m", "3599", "P", "PT", "monthly", "-1h", "", True])
def test_rotate_every_refuses_less_than_an_hour_and_nonsense(given: Any) -> None:
    with pytest.raises(ValidationFailedError):
        parse_rotate_every(given)


def test_cli_regenerate_and_rotate_every(live_broker: LiveBroker, sim: SimServer) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key, as_json=True)
    record = sim.state.add_manual_token(purpose="cli worker", expires_at=_now() + timedelta(days=5))
    created = cli(
        "credentials",
        "create",
        "--upstream",
        "sim",
        "--name",
        "cli-rotating",
        "--rotate-every",
        "30d",
        BROKER_WORKER_TOKEN=record.value,
    )
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    assert body["rotate_every"] == 30 * 86400
    assert body["token_purpose"] == "cli worker"
    [warning] = body["warnings"]
    assert "broker credentials rotate cli-rotating --regenerate" in warning
    old = record.value
    rotated = cli("credentials", "rotate", "cli-rotating", "--regenerate", "--yes")
    assert rotated.returncode == 0, rotated.stderr
    assert record.value != old
    assert json.loads(rotated.stdout)["token_last4"] == record.value[-4:]
    assert old not in rotated.stdout + rotated.stderr
    assert record.value not in rotated.stdout + rotated.stderr
    assert _canvas_answer(sim, old) == 401
    unscheduled = cli("credentials", "update", "cli-rotating", "--rotate-every", "never")
    assert unscheduled.returncode == 0, unscheduled.stderr
    assert json.loads(unscheduled.stdout)["rotate_every"] is None
    refused = cli("credentials", "rotate", "cli-rotating", "--regenerate", "--no-verify", "--yes")
    assert refused.returncode != 0
