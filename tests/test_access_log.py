"""The access log: one JSON line per request, secrets redacted (docs/deployment.md#access-log)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import pytest

from broker.access_log import LOGGER_NAME
from broker.config import Settings

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support.env import BrokerEnv

SECRET = "pasted-canvas-token-0f9e8d7c"


@pytest.fixture
def settings(database_url: str, request: pytest.FixtureRequest) -> Settings:
    """The test broker's settings; parametrize indirectly with ``access_log``'s value."""
    return Settings(
        database_url=database_url,
        keys=None,
        public_url=None,
        access_log=getattr(request, "param", True),
        audit_sensitive_params="sis_login",
    )


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def access() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_a_proxied_call_is_one_json_line_with_ids_status_duration_and_redacted_query(
    env: BrokerEnv, access: _Lines
) -> None:
    client_id, secret = await env.client()
    token = await env.token(client_id, secret)
    access.lines.clear()
    response = await env.http.get(
        "/api/v1/courses/1201/assignments",
        params={"per_page": "2", "access_token": SECRET, "sis_login": "ghopper"},
        headers={"Authorization": f"Bearer {token}"},
    )
    [line] = access.records()
    assert line["request_id"] == response.headers["x-request-id"]
    assert (line["method"], line["path"], line["status"]) == (
        "GET",
        "/api/v1/courses/1201/assignments",
        response.status_code,
    )
    assert line["query"] == "per_page=2&access_token=[redacted]&sis_login=[redacted]"
    assert line["client_id"] == client_id
    assert isinstance(line["duration_ms"], float)
    assert line["duration_ms"] >= 0
    assert SECRET not in access.lines[0]
    assert token not in access.lines[0]
    assert "ghopper" not in access.lines[0]


async def test_a_management_call_names_the_admin_key(env: BrokerEnv, access: _Lines) -> None:
    keys = (await env.http.get("/broker/v1/admin-keys", headers=env.admin())).json()
    [admin] = [k for k in keys if k["name"] == "test-admin"]
    access.lines.clear()
    response = await env.http.get("/broker/v1/clients", headers=env.admin())
    [line] = access.records()
    assert (line["path"], line["status"], line["admin_key_id"]) == (
        "/broker/v1/clients",
        200,
        admin["id"],
    )
    assert line["request_id"] == response.headers["x-request-id"]
    assert line["client_id"] is None
    assert env.admin_key not in access.lines[0]


@pytest.mark.parametrize("settings", [False], indirect=True)
async def test_broker_access_log_false_writes_no_lines(env: BrokerEnv, access: _Lines) -> None:
    response = await env.http.get("/healthz")
    assert response.status_code == 200
    assert access.lines == []


def test_a_line_is_json_for_any_path_query_and_ids() -> None:
    from broker.access_log import line  # noqa: PLC0415

    scope = {
        "type": "http",
        "method": "GET",
        "path": '/api/v1/"quoted"\\back\u00e9\u2028\x00',
        "query_string": b"q=%22x%22&access_token=abc",
        "client": ("::1", 1),
        "state": {"actor_key_id": 'ak"1'},
        "broker.client_id": "cl\n1",
    }
    record = json.loads(
        line(
            scope,
            request_id=None,
            status=None,
            duration_ms=0.0004,
            sensitive=frozenset({"access_token"}),
        )
    )
    assert record["path"] == scope["path"]
    assert record["query"] == "q=%22x%22&access_token=[redacted]"
    assert (record["client_id"], record["admin_key_id"], record["peer"]) == ("cl\n1", 'ak"1', "::1")
    assert (record["request_id"], record["status"], record["duration_ms"]) == (None, None, 0.0)
    assert record["time"].endswith("Z")
    assert len(record["time"]) == len("2026-12-02T19:43:10.855Z")


async def test_default_handler_writes_the_lines_of_one_loop_turn_to_stderr_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import asyncio  # noqa: PLC0415

    from broker import access_log  # noqa: PLC0415

    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.propagate, logger.level)
    for handler in saved[0]:
        logger.removeHandler(handler)
    try:
        access_log.enable()
        access_log.write('{"n":1}')
        access_log.write('{"n":2}')
        assert capsys.readouterr().err == ""  # not before the end of the turn
        await asyncio.sleep(0)
        assert capsys.readouterr().err == '{"n":1}\n{"n":2}\n'
        logger.setLevel(logging.WARNING)
        access_log.write('{"n":3}')
        await asyncio.sleep(0)
        assert capsys.readouterr().err == ""
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.propagate, logger.level = saved[1], saved[2]
