"""The ``broker`` management commands, run as an admin runs them, against a live broker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import TYPE_CHECKING

import httpx

from broker import bootstrap
from broker.keyring import load_keyring
from tests.support.env import WORKER_TOKEN

if TYPE_CHECKING:
    from broker.sim.server import SimServer
    from tests.e2e.conftest import LiveBroker

SCOPE = "url:GET|/api/v1/courses/:course_id/assignments"


class Cli:
    """Runs ``broker`` with BROKER_URL and an admin key in the environment."""

    def __init__(self, url: str, admin_key: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        self.env.update(BROKER_URL=url, BROKER_ADMIN_KEY=admin_key)

    def __call__(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", *args],
            env={**self.env, **extra_env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def test_admin_provisions_checks_and_revokes_through_the_cli(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key)

    upstream = cli("upstreams", "create", "canvas-test", sim.base_url)
    assert upstream.returncode == 0, upstream.stderr
    assert json.loads(upstream.stdout)["base_url"] == sim.base_url

    credential = cli(
        "credentials",
        "create",
        "--upstream",
        "canvas-test",
        "--name",
        "worker2",
        BROKER_WORKER_TOKEN=WORKER_TOKEN,
    )
    assert credential.returncode == 0, credential.stderr
    assert json.loads(credential.stdout)["token_last4"] == WORKER_TOKEN[-4:]
    assert WORKER_TOKEN not in credential.stdout + credential.stderr
    # The token was checked with Canvas before it was stored.
    assert sim.state.received_paths() == ["/api/v1/users/self"]
    sim.state.received.clear()

    created = cli(
        "clients",
        "create",
        "--name",
        "grade-export",
        "--credential",
        "worker2",
        "--scope",
        SCOPE,
        "--constraint",
        "course_id=1201",
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert re.fullmatch(r"cbs_[0-9A-Za-z]{36}", secret)
    client_id = re.search(r'"client_id": "(cli_\w+)"', created.stderr)
    assert client_id is not None

    assert (
        cli(
            "clients", "check", "grade-export", "GET", "/api/v1/courses/1201/assignments"
        ).returncode
        == 0
    )
    refused = cli("clients", "check", "grade-export", "GET", "/api/v1/courses/1203/assignments")
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["reason"] == "constraint_violation"

    minted = cli("token", BROKER_CLIENT_ID=client_id.group(1), BROKER_CLIENT_SECRET=secret)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert re.fullmatch(r"cbt_[0-9A-Za-z]{36}", token)
    bearer = {"Authorization": f"Bearer {token}"}
    url = f"{live_broker.url}/api/v1/courses/1201/assignments"
    assert httpx.get(url, headers=bearer).status_code == 200

    listed = cli("tokens", "list", "--client", "grade-export")
    assert listed.returncode == 0, listed.stderr
    [live] = json.loads(listed.stdout)
    assert token not in listed.stdout
    assert cli("tokens", "revoke", live["id"]).returncode == 0
    assert httpx.get(url, headers=bearer).status_code == 401

    audit = cli("audit", "query", "--client", client_id.group(1), "--kind", "proxy")
    assert audit.returncode == 0, audit.stderr
    decisions = [e["decision"] for e in json.loads(audit.stdout)["events"]]
    assert decisions == ["deny", "allow"]
    assert token not in audit.stdout
    assert len(sim.state.received) == 1

    assert cli("clients", "disable", "grade-export").returncode == 0
    assert cli("credentials", "disable", "worker2").returncode == 0


def test_auditor_key_cannot_mutate_through_the_cli(live_broker: LiveBroker) -> None:
    auditor = bootstrap.create_admin_key(
        live_broker.settings, load_keyring(live_broker.settings), name="siem", role="auditor"
    )
    assert auditor is not None
    cli = Cli(live_broker.url, auditor)

    refused = cli("upstreams", "create", "other", "https://other.example")

    assert refused.returncode == 1
    assert "403" in refused.stderr
    assert cli("upstreams", "list").returncode == 0


def test_cli_without_admin_settings_says_what_to_set() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    result = subprocess.run(
        [sys.executable, "-m", "broker", "clients", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "BROKER_URL" in result.stderr


def test_cli_warns_about_unfamiliar_scopes_and_sets_client_flags(
    live_broker: LiveBroker,
) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key)
    typo = "url:GET|/api/v1/course/:id"
    created = cli("clients", "create", "--name", "flags", "--credential", "worker", "--scope", typo)
    assert created.returncode == 0, created.stderr
    assert f"warning: scope {typo!r}" in created.stderr
    assert re.fullmatch(r"cbs_[0-9A-Za-z]{36}", created.stdout.strip())
    assert '"allow_includes": false' in created.stderr

    changed = cli("clients", "set", "flags", "--allow-includes")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["allow_includes"] is True
    assert json.loads(changed.stdout)["allow_masquerade"] is False

    nothing = cli("clients", "set", "flags")
    assert nothing.returncode == 1
    assert "--allow-includes" in nothing.stderr

    inert = cli("clients", "grant", "flags", "--scope", "url:GET|/login/:action")
    assert inert.returncode != 0
    assert "url:GET|/login/:action" in inert.stderr
    assert cli("clients", "get", "flags").stdout.count(typo) == 1
