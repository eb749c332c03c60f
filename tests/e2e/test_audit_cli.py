"""The security team's ``broker audit`` commands, run as an investigator runs them, against a
live broker: hash a leaked value from stdin, search for it, export, verify."""

from __future__ import annotations

import csv
import io
import json
import secrets
from typing import TYPE_CHECKING

import httpx
import pytest

from broker import bootstrap
from broker.keyring import parse_keys_setting
from tests.support.audit import local_env, run_broker

if TYPE_CHECKING:
    from tests.e2e.conftest import LiveBroker

COURSE = "/api/v1/courses/1201"


@pytest.fixture
def investigator(live_broker: LiveBroker) -> dict[str, str]:
    """The environment of an investigator's shell: the broker's URL and an auditor key."""
    key = bootstrap.create_admin_key(
        live_broker.settings,
        parse_keys_setting(live_broker.settings.keys or ""),
        name="siem",
        role="auditor",
    )
    assert key is not None
    env = local_env(
        live_broker.settings.database_url, parse_keys_setting(live_broker.settings.keys or "")
    )
    return {**env, "BROKER_URL": live_broker.url, "BROKER_ADMIN_KEY": key}


def test_leaked_token_is_hashed_from_stdin_and_found_with_query_contains(
    live_broker: LiveBroker, investigator: dict[str, str]
) -> None:
    client_id, secret = live_broker.client(["url:GET|/api/v1/courses/:id"], {})
    token = live_broker.token(client_id, secret)
    leaked = "leaked-" + secrets.token_hex(16)
    refused = httpx.get(
        f"{live_broker.url}{COURSE}?access_token={leaked}",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert refused.status_code == 403

    hashed = run_broker(["audit", "hash", "--json"], investigator, stdin=leaked + "\n")
    assert hashed.returncode == 0, hashed.stderr
    assert leaked not in hashed.stdout + hashed.stderr
    [value] = json.loads(hashed.stdout)["hashes"].values()
    assert value.startswith("hmac-sha256:")

    found = run_broker(["audit", "query", "--query-contains", value, "--json"], investigator)
    assert found.returncode == 0, found.stderr
    [event] = json.loads(found.stdout)["events"]
    assert event["request_id"] == refused.headers["x-request-id"]
    assert event["reason"] == "credential_param_denied"
    assert event["query"] == f"access_token={value}"


def test_hash_without_a_value_fails(investigator: dict[str, str]) -> None:
    result = run_broker(["audit", "hash"], investigator, stdin="")
    assert result.returncode == 1
    assert "no value given" in result.stderr


def test_every_call_of_a_client_in_a_window_exports_as_csv_and_ndjson(
    live_broker: LiveBroker, investigator: dict[str, str]
) -> None:
    client_id, secret = live_broker.client(["url:GET|/api/v1/courses/:id"], {})
    token = live_broker.token(client_id, secret)
    bearer = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{live_broker.url}{COURSE}", headers=bearer).status_code == 200
    assert httpx.delete(f"{live_broker.url}{COURSE}", headers=bearer).status_code == 403
    window = ["--client", client_id, "--since", "2000-01-01", "--until", "2999-01-01"]

    query = run_broker(["audit", "query", *window, "--limit", "1000", "--json"], investigator)
    assert query.returncode == 0, query.stderr
    events = json.loads(query.stdout)["events"]
    assert [(e["kind"], e["method"]) for e in events] == [
        ("proxy", "DELETE"),
        ("proxy", "GET"),
        ("token", "POST"),
        ("admin", "POST"),
    ]

    ndjson = run_broker(["audit", "export", "--format", "ndjson", *window], investigator)
    assert ndjson.returncode == 0, ndjson.stderr
    assert [json.loads(line) for line in ndjson.stdout.splitlines()] == events
    assert ndjson.stderr.strip() == f"exported {len(ndjson.stdout.encode())} bytes"

    refused = run_broker(
        ["audit", "export", "--format", "csv", *window, "--decision", "deny"], investigator
    )
    assert refused.returncode == 0, refused.stderr
    [row] = list(csv.DictReader(io.StringIO(refused.stdout)))
    assert (row["method"], row["status"], row["reason"]) == ("DELETE", "403", "scope_not_granted")


def test_export_refusal_is_reported(investigator: dict[str, str]) -> None:
    result = run_broker(
        ["audit", "export"], {**investigator, "BROKER_ADMIN_KEY": "cba_" + "A" * 36}
    )
    assert result.returncode == 1
    assert "401 invalid_admin_key" in result.stderr
    bad = run_broker(["audit", "export", "--format", "xml"], investigator)
    assert bad.returncode == 2


def test_every_refusal_and_admin_action_is_found_and_the_log_verifies(
    live_broker: LiveBroker, investigator: dict[str, str]
) -> None:
    client_id, _secret = live_broker.client(["url:GET|/api/v1/courses/:id"], {})
    assert live_broker.http.post(f"/broker/v1/clients/{client_id}/disable").is_success
    assert httpx.get(f"{live_broker.url}{COURSE}").status_code == 401

    refusals = run_broker(["--json", "audit", "query", "--decision", "deny"], investigator)
    assert [e["reason"] for e in json.loads(refusals.stdout)["events"]] == ["missing_token"]
    admin = run_broker(
        ["--json", "audit", "query", "--kind", "admin", "--client", client_id], investigator
    )
    actions = [e["action"] for e in json.loads(admin.stdout)["events"]]
    assert actions == ["client.disable", "client.create"]

    verified = run_broker(["audit", "verify"], investigator)
    assert verified.returncode == 0, verified.stdout
    assert verified.stdout.startswith("audit log OK\n")


def test_export_draws_progress_on_a_terminal_and_keeps_stdout_the_export(
    live_broker: LiveBroker, investigator: dict[str, str]
) -> None:
    import os  # noqa: PLC0415
    import pty  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from tests.support.audit import BROKER  # noqa: PLC0415

    live_broker.client(["url:GET|/api/v1/courses/:id"], {})
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [*BROKER, "audit", "export"],
            env=investigator,
            stdout=subprocess.PIPE,
            stderr=terminal,
            timeout=120,
            check=False,
        )
        os.close(terminal)
        drawn = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the other end is closed: everything was read
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(controller)
    assert result.returncode == 0, drawn
    events = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert events
    assert b"\x1b" not in result.stdout
    assert "exporting audit events" in drawn.decode(errors="replace")
    assert f"exported {len(result.stdout)} bytes" in drawn.decode(errors="replace")
