"""No secret is stored or logged in the clear: after a full flow, scan every table and log."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import select

from broker.storage.models import Base
from tests.support.env import WORKER_TOKEN, bearer

if TYPE_CHECKING:
    import pytest

    from tests.support.env import BrokerEnv


async def _dump_database(env: BrokerEnv) -> str:
    rows: list[str] = []
    async with env.context.sessions() as session:
        for table in Base.metadata.sorted_tables:
            for row in (await session.execute(select(table))).all():
                rows.extend(
                    value.decode("latin-1") if isinstance(value, bytes) else str(value)
                    for value in row
                )
    return "\n".join(rows)


async def test_no_secret_reaches_the_database_or_the_logs(
    env: BrokerEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client_id, client_secret = await env.client()
    token = await env.token(client_id, client_secret)
    other_admin = await env.http.post(
        "/broker/v1/admin-keys", headers=env.admin(), json={"name": "second", "role": "admin"}
    )
    second_key = other_admin.json()["key"]
    calls = [
        "/api/v1/courses/1201",
        "/api/v1/courses/1201?access_token=" + WORKER_TOKEN,
        f"/api/v1/courses/1201?password={client_secret}",
        "/api/v1/courses/1201/assignments/5001",
    ]
    for path in calls:
        await env.http.get(path, headers=bearer(token))
    await env.http.post(
        "/broker/v1/oauth/revoke", data={"token": token}, auth=(client_id, client_secret)
    )
    await env.http.post(
        "/broker/v1/credentials/worker/rotate",
        headers=env.admin(),
        json={"token": WORKER_TOKEN + "-rotated", "verify": False},
    )

    stored = await _dump_database(env)
    # httpx here is the test's own client logging what it sent; everything else is the broker.
    logged = "\n".join(
        f"{record.getMessage()} {record.exc_text or ''}"
        for record in caplog.records
        if not record.name.startswith("httpx")
    )
    secrets = {
        "worker token": WORKER_TOKEN,
        "client secret": client_secret,
        "proxy token": token,
        "admin key": env.admin_key,
        "auditor key": env.auditor_key,
        "second admin key": second_key,
    }
    for name, value in secrets.items():
        assert value not in stored, f"{name} is stored in the clear"
        assert value not in logged, f"{name} reached a log"
    assert "-rotated" not in stored
