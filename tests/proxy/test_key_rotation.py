"""Key rotation under a running broker, and a credential the broker cannot decrypt.

Contract: docs/storage-and-keys.md#key-rotation, docs/interfaces.md#operations.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import text

from broker import bootstrap
from broker.app import create_app
from broker.context import ProcessContext
from broker.keyring import Keyring, load_key_file, write_key_file
from broker.services.tokens import WORKER_TOKEN_PURPOSE
from broker.storage import credentials
from broker.storage.credentials import SealedToken
from broker.storage.database import head_revision
from broker.storage.models import utcnow
from tests.proxy.support import assert_refused, make_caller
from tests.support.env import WORKER_TOKEN, BrokerEnv

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from broker.config import Settings
    from broker.sim.server import SimServer

COURSE = "/api/v1/courses/1201"


async def _credential_id(env: BrokerEnv) -> str:
    async with env.context.sessions() as session:
        return (await credentials.get(session, "worker")).id


async def _seal_under_a_stranger_key(env: BrokerEnv) -> None:
    """Store the worker token under a key this broker's keyring does not have."""
    credential_id = await _credential_id(env)
    stranger = Keyring.generate("k9")
    sealed = SealedToken(
        *stranger.encrypt(
            WORKER_TOKEN.encode(), purpose=WORKER_TOKEN_PURPOSE, record_id=credential_id
        )
    )
    async with env.context.sessions.begin() as session:
        await credentials.reseal(session, credential_id, sealed, at=utcnow())


async def _bounded_until(check: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.05)
    return False


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[-1])
    return 0.0


async def test_a_credential_that_does_not_decrypt_is_a_503_audited_counted_and_not_ready(
    env: BrokerEnv,
) -> None:
    caller = await make_caller(env)
    await _seal_under_a_stranger_key(env)
    response = await env.http.get(COURSE, headers=caller.headers)
    event = await assert_refused(env, response, 503, "credential_unavailable", caller)
    assert event["credential_id"] == await _credential_id(env)
    assert "www-authenticate" not in response.headers  # the caller's token is not at fault
    assert WORKER_TOKEN not in response.text

    metrics = (await env.http.get("/metrics")).text
    assert _sample(metrics, "broker_credential_decrypt_failures_total") == 1
    assert 'broker_proxy_refusals_total{reason="credential_unavailable"} 1.0' in metrics

    ready = await env.http.get("/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert (body["status"], body["credentials"]) == ("not ready", "undecryptable")
    assert (body["database"], body["schema"], body["keyring"]) == ("ok", "ok", "ok")
    [problem] = body["problems"]
    assert "'k9'" in problem
    assert "BROKER_KEY_FILE or BROKER_KEYS" in problem


@pytest.fixture
async def file_env(
    settings: Settings, sim: SimServer, tmp_path: Path
) -> AsyncIterator[tuple[BrokerEnv, Settings]]:
    """A broker whose keyring comes from a key file, as `broker serve` loads it."""
    key_file = tmp_path / "broker.key"
    write_key_file(key_file, Keyring.generate())
    file_settings = settings.model_copy(update={"key_file": key_file})
    context = ProcessContext.from_settings(file_settings)
    transport = httpx.ASGITransport(app=create_app(context=context))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
            broker_env = BrokerEnv(context=context, http=http, sim=sim)
            await broker_env.provision()
            yield broker_env, file_settings
    finally:
        await context.aclose()


async def test_after_keys_rotate_a_running_broker_keeps_forwarding_with_the_new_key(
    file_env: tuple[BrokerEnv, Settings],
) -> None:
    env, settings = file_env
    before = await make_caller(env, "before")
    assert (await env.http.get(COURSE, headers=before.headers)).status_code == 200

    primary, count = await asyncio.to_thread(bootstrap.rotate_keys, settings)
    assert (primary, count) == ("k2", 1)

    # A token never seen before resolves from the database: the credential is now under k2.
    after = await make_caller(env, "after")
    for caller in (after, before):
        response = await env.http.get(COURSE, headers=caller.headers)
        assert response.status_code == 200, response.text
    assert env.context.keyring.primary_id == "k2"
    assert [r.header("authorization") for r in env.sim.state.received] == [
        f"Bearer {WORKER_TOKEN}"
    ] * 3
    ready = await env.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    report = await env.verify_audit()
    assert report["ok"], report["problem"]


async def test_a_primary_set_in_the_key_file_by_hand_is_used_with_no_new_key(
    file_env: tuple[BrokerEnv, Settings],
) -> None:
    # The procedure for replicas with key files of their own: stage the key everywhere, make
    # it primary everywhere, then re-encrypt once without generating yet another key.
    env, settings = file_env
    staged = load_key_file(settings.key_file).with_new_primary()
    write_key_file(
        settings.key_file, Keyring(primary_id="k1", keys=dict(staged.keys))
    )  # staged: known, not yet primary
    write_key_file(settings.key_file, staged)  # primary now
    primary, count = await asyncio.to_thread(bootstrap.rotate_keys, settings, new_key=False)
    assert (primary, count) == ("k2", 1)
    assert sorted(load_key_file(settings.key_file).keys) == ["k1", "k2"]
    caller = await make_caller(env)
    assert (await env.http.get(COURSE, headers=caller.headers)).status_code == 200
    assert env.context.keyring.primary_id == "k2"


async def test_a_rotation_reaches_a_running_broker_through_the_epoch_alone(
    file_env: tuple[BrokerEnv, Settings],
) -> None:
    env, settings = file_env
    caller = await make_caller(env)
    assert (await env.http.get(COURSE, headers=caller.headers)).status_code == 200  # polls now
    await asyncio.to_thread(bootstrap.rotate_keys, settings)
    assert await _bounded_until(lambda: env.context.keyring.primary_id == "k2")
    assert env.context.keys.reloads == 1
    metrics = (await env.http.get("/metrics")).text
    assert 'broker_keyring_reloads_total{result="reloaded"} 1.0' in metrics


async def test_readyz_is_503_naming_the_fix_when_the_schema_is_behind(env: BrokerEnv) -> None:
    async def set_revision(revision: str | None) -> None:
        async with env.context.sessions.begin() as session:
            await session.execute(
                text("UPDATE alembic_version SET version_num = :v"), {"v": revision}
            )

    await set_revision("0001")
    try:
        response = await env.http.get("/readyz")
    finally:
        await set_revision(head_revision())  # PostgreSQL test runs share one schema
    assert response.status_code == 503
    body = response.json()
    assert body["schema"] == "not_at_head"
    [problem] = body["problems"]
    assert problem.startswith("BROKER_DATABASE_URL points at a database at migration 0001")
    assert f"at migration 0001, not {head_revision()}" in problem
    assert "broker init" in problem


async def test_readyz_is_503_on_a_database_that_was_never_initialised(
    settings: Settings, tmp_path: Path
) -> None:
    empty = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'empty.db'}"})
    context = ProcessContext.from_settings(empty, keyring=Keyring.generate())
    transport = httpx.ASGITransport(app=create_app(context=context))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
            response = await http.get("/readyz")
    finally:
        await context.aclose()
    assert response.status_code == 503
    body = response.json()
    assert (body["database"], body["schema"]) == ("ok", "not_at_head")
    assert "never initialised): run `broker init`" in body["problems"][0]
