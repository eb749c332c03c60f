"""Operations endpoints (docs/interfaces.md#operations)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import httpx

from broker.app import create_app
from broker.config import Settings
from broker.context import ProcessContext
from broker.keyring import Keyring

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.env import BrokerEnv


async def test_healthz_answers_without_credentials(env: BrokerEnv) -> None:
    response = await env.http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["x-request-id"]


async def test_readyz_reports_database_schema_keyring_and_credentials(env: BrokerEnv) -> None:
    response = await env.http.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "database": "ok",
        "schema": "ok",
        "keyring": "ok",
        "credentials": "ok",
        "audit": "ok",
    }


async def test_readyz_is_503_when_the_database_is_unreachable() -> None:
    # A PostgreSQL port nothing listens on, rather than a SQLite file that cannot be opened:
    # aiosqlite finishes a failed connect in its own thread after the caller has moved on, and
    # under load reports into this test's event loop after it has closed.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(database_url=f"postgresql://broker@127.0.0.1:{port}/broker")
    context = ProcessContext.from_settings(settings, keyring=Keyring.generate())
    transport = httpx.ASGITransport(app=create_app(context=context))
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
        response = await http.get("/readyz")
    await context.aclose()
    assert response.status_code == 503
    assert response.json()["database"] == "unavailable"


async def test_metrics_exposes_prometheus_text_with_live_tokens(env: BrokerEnv) -> None:
    await env.client_token()
    response = await env.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "broker_live_tokens 1.0" in response.text
    assert "broker_audit_write_seconds" in response.text


def _sample(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} "):
            return float(line.split()[-1])
    return 0.0


async def test_metrics_count_proxied_requests_by_client_and_outcome_and_time_upstream_and_audit(
    env: BrokerEnv,
) -> None:
    client_id, secret = await env.client()
    bearer = {"Authorization": f"Bearer {await env.token(client_id, secret)}"}
    assert (await env.http.get("/api/v1/courses/1201", headers=bearer)).status_code == 200
    assert (await env.http.get("/api/v1/courses/1201", headers=bearer)).status_code == 200
    assert (await env.http.delete("/api/v1/courses/1201", headers=bearer)).status_code == 403
    assert (await env.http.get("/api/v1/courses/1201")).status_code == 401

    text = (await env.http.get("/metrics")).text
    client = f'client="{client_id}"'
    assert _sample(text, "broker_proxy_requests_total", f'{{{client},outcome="allow"}}') == 2
    assert (
        _sample(text, "broker_proxy_requests_total", f'{{{client},outcome="scope_not_granted"}}')
        == 1
    )
    assert _sample(text, "broker_proxy_requests_total", '{client="-",outcome="missing_token"}') == 1
    assert _sample(text, "broker_upstream_latency_seconds_count") == 2
    assert _sample(text, "broker_audit_write_seconds_count") == 4
    assert _sample(text, "broker_audit_write_failures_total") == 0


async def test_metrics_count_refusals_by_reason_across_clients(env: BrokerEnv) -> None:
    alpha = {"Authorization": f"Bearer {await env.client_token('alpha')}"}
    beta = {"Authorization": f"Bearer {await env.client_token('beta')}"}
    assert (await env.http.delete("/api/v1/courses/1201", headers=alpha)).status_code == 403
    assert (await env.http.delete("/api/v1/courses/1202", headers=beta)).status_code == 403
    assert (await env.http.get("/api/v1//courses", headers=beta)).status_code == 400
    assert (await env.http.get("/api/v1/courses/1201")).status_code == 401
    assert (await env.http.get("/api/v1/courses/1201", headers=alpha)).status_code == 200

    text = (await env.http.get("/metrics")).text
    refusals = {
        line.split('reason="')[1].split('"')[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("broker_proxy_refusals_total{")
    }
    assert refusals == {"scope_not_granted": 2, "non_canonical_path": 1, "missing_token": 1}


async def test_metrics_time_audit_group_commits_and_count_their_events(env: BrokerEnv) -> None:
    token = await env.client_token()
    bearer = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        assert (await env.http.get("/api/v1/courses/1201", headers=bearer)).status_code == 200
    assert (await env.http.get("/api/v1/courses/1201")).status_code == 401
    await env.context.audit_writer.flush()

    text = (await env.http.get("/metrics")).text
    # Through the writer: a pending event and its completion per forwarded call, one per refusal.
    assert _sample(text, "broker_audit_batch_events_sum") == 3 * 2 + 1
    commits = _sample(text, "broker_audit_commit_seconds_count")
    assert 1 <= commits == _sample(text, "broker_audit_batch_events_count")
    assert _sample(text, "broker_audit_commit_seconds_sum") > 0


async def test_a_worker_whose_audit_hub_is_gone_is_neither_healthy_nor_ready(
    settings: Settings, tmp_path: Path
) -> None:
    # A worker of `broker serve --workers N` whose supervisor (and with it the hub) is gone:
    # it can audit nothing and will not recover (docs/deployment.md#processes).
    from broker.services.audit_hub import AuditHub  # noqa: PLC0415
    from broker.storage.database import Database  # noqa: PLC0415

    keyring = Keyring.generate()
    hub = AuditHub(Database(settings.async_database_url), keyring, tmp_path / "audit.sock")
    hub.start()
    worker = settings.model_copy(update={"audit_socket": hub.path})
    context = ProcessContext.from_settings(worker, keyring=keyring)
    transport = httpx.ASGITransport(app=create_app(context=context))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).json()["audit"] == "ok"
            hub.stop()
            health = await http.get("/healthz")
            ready = await http.get("/readyz")
    finally:
        await context.aclose()
    assert health.status_code == 503
    assert "audit hub" in health.json()["problem"]
    assert ready.status_code == 503
    assert ready.json()["audit"] == "unavailable"
    assert any("restart `broker serve`" in problem for problem in ready.json()["problems"])
