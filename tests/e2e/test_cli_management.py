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
from broker.core.tokens import SecretKind, generate_secret
from broker.keyring import load_keyring
from tests.support.env import WORKER_TOKEN

if TYPE_CHECKING:
    from broker.sim.server import SimServer
    from tests.e2e.conftest import LiveBroker

SCOPE = "url:GET|/api/v1/courses/:course_id/assignments"


class Cli:
    """Runs ``broker`` with BROKER_URL and an admin key in the environment."""

    def __init__(self, url: str, admin_key: str, *, as_json: bool = False) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        self.env.update(BROKER_URL=url, BROKER_ADMIN_KEY=admin_key)
        # Tests that read what commands print as data ask for the API's JSON, as scripts do.
        self.options = ["--json"] if as_json else []

    def __call__(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", *self.options, *args],
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

    upstream = cli("upstreams", "create", "canvas-test", sim.base_url, "--json")
    assert upstream.returncode == 0, upstream.stderr
    assert json.loads(upstream.stdout)["base_url"] == sim.base_url

    credential = cli(
        "--json",
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
    # The token was checked with Canvas before it was stored, and its record read.
    assert sim.state.received_paths() == [
        "/api/v1/users/self",
        f"/api/v1/users/self/tokens/{WORKER_TOKEN[:5]}",
    ]
    sim.state.received.clear()

    created = cli(
        "--json",
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
    refused = cli(
        "--json", "clients", "check", "grade-export", "GET", "/api/v1/courses/1203/assignments"
    )
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["reason"] == "constraint_violation"

    minted = cli("token", BROKER_CLIENT_ID=client_id.group(1), BROKER_CLIENT_SECRET=secret)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert re.fullmatch(r"cbt_[0-9A-Za-z]{36}", token)
    bearer = {"Authorization": f"Bearer {token}"}
    url = f"{live_broker.url}/api/v1/courses/1201/assignments"
    assert httpx.get(url, headers=bearer).status_code == 200

    listed = cli("tokens", "list", "--client", "grade-export", "--json")
    assert listed.returncode == 0, listed.stderr
    [live] = json.loads(listed.stdout)
    assert token not in listed.stdout
    assert cli("tokens", "revoke", live["id"], "--yes").returncode == 0
    assert httpx.get(url, headers=bearer).status_code == 401

    audit = cli("audit", "query", "--client", client_id.group(1), "--kind", "proxy", "--json")
    assert audit.returncode == 0, audit.stderr
    decisions = [e["decision"] for e in json.loads(audit.stdout)["events"]]
    assert decisions == ["deny", "allow"]
    assert token not in audit.stdout
    # Canvas saw the one allowed call, besides each credential's verification when stored.
    paths = [r.raw_path for r in sim.state.received]
    assert [p for p in paths if p != "/api/v1/users/self"] == ["/api/v1/courses/1201/assignments"]

    assert cli("clients", "disable", "grade-export", "--yes").returncode == 0
    assert cli("credentials", "disable", "worker2", "--yes").returncode == 0


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
    created = cli(
        "--json", "clients", "create", "--name", "flags", "--credential", "worker", "--scope", typo
    )
    assert created.returncode == 0, created.stderr
    assert f"warning: scope {typo!r}" in created.stderr
    assert re.fullmatch(r"cbs_[0-9A-Za-z]{36}", created.stdout.strip())
    assert '"allow_includes": false' in created.stderr

    changed = cli("clients", "set", "flags", "--allow-includes", "--json")
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


COURSE_SCOPE = "url:GET|/api/v1/courses/:id"


def _free_url() -> str:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_resources_print_as_tables_by_default_and_as_the_apis_json_with_json(
    live_broker: LiveBroker,
) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key)
    api = live_broker.http.get("/broker/v1/upstreams").json()

    table = cli("upstreams", "list")
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[1]
    assert [c.strip() for c in header.split("┃")[1:-1]] == ["id", "name", "base_url", "enabled"]
    assert api[0]["id"] in table.stdout
    assert "{" not in table.stdout

    assert json.loads(cli("--json", "upstreams", "list").stdout) == api
    assert json.loads(cli("upstreams", "list", "--json").stdout) == api
    one = cli("upstreams", "get", "sim")
    assert re.search(r"base_url\s+" + re.escape(api[0]["base_url"]), one.stdout), one.stdout


def test_upstream_disable_needs_yes_off_a_terminal_and_enable_re_enables(
    live_broker: LiveBroker,
) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key)

    def enabled() -> bool:
        return bool(live_broker.http.get("/broker/v1/upstreams/sim").json()["enabled"])

    refused = cli("upstreams", "disable", "sim")
    assert refused.returncode == 1
    assert "refusing to disable upstream 'sim'" in refused.stderr
    assert "--yes" in refused.stderr
    assert enabled()

    assert cli("upstreams", "disable", "sim", "--yes").returncode == 0
    assert not enabled()
    back = cli("upstreams", "enable", "sim", "--json")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["enabled"] is True
    assert enabled()


def test_confirmation_on_a_terminal_cancels_on_no_and_proceeds_on_yes(
    live_broker: LiveBroker,
) -> None:
    import pty  # noqa: PLC0415

    caller = live_broker.caller([COURSE_SCOPE], {})
    cli = Cli(live_broker.url, live_broker.admin_key)

    def answer(reply: bytes) -> tuple[int, str]:
        controller, terminal = pty.openpty()
        try:
            os.write(controller, reply)
            result = subprocess.run(
                [sys.executable, "-m", "broker", "clients", "revoke-tokens", caller.client_id],
                env=cli.env,
                stdin=terminal,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            os.close(terminal)
            os.close(controller)
        return result.returncode, result.stderr

    def live() -> int:
        listed = live_broker.http.get("/broker/v1/tokens", params={"client": caller.client_id})
        return len(listed.json())

    code, stderr = answer(b"n\n")
    assert code == 1
    assert f"Revoke every live token of client {caller.client_id!r}?" in stderr
    assert "nothing was changed" in stderr
    assert live() == 1
    code, stderr = answer(b"y\n")
    assert code == 0, stderr
    assert live() == 0


def test_leaked_token_is_introspected_and_revoked_from_stdin_and_never_echoed(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    caller = live_broker.caller([COURSE_SCOPE], {})
    cli = Cli(live_broker.url, live_broker.admin_key)

    def run(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "broker", *args],
            env=cli.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert caller.token not in result.stdout + result.stderr
        return result

    active = run("--json", "tokens", "introspect", "--stdin", stdin=caller.token + "\n")
    assert active.returncode == 0, active.stderr
    answer = json.loads(active.stdout)
    assert (answer["active"], answer["jti"], answer["client_id"]) == (
        True,
        caller.token_id,
        caller.client_id,
    )
    assert run("tokens", "introspect", stdin=caller.token).returncode == 1  # no --stdin, no tty

    revoked = run("tokens", "revoke", "--stdin", "--yes", "--json", stdin=caller.token + "\n")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["id"] == caller.token_id
    assert json.loads(revoked.stdout)["revoked_at"] is not None

    bearer = {"Authorization": f"Bearer {caller.token}"}
    assert httpx.get(f"{live_broker.url}/api/v1/courses/1201", headers=bearer).status_code == 401
    assert [r for r in sim.state.received if r.raw_path != "/api/v1/users/self"] == []
    inactive = run("--json", "tokens", "introspect", "--stdin", stdin=caller.token)
    assert (inactive.returncode, json.loads(inactive.stdout)) == (1, {"active": False})
    events = live_broker.http.get("/broker/v1/audit", params={"action": "token.revoke"}).json()
    [event] = events["events"]
    assert event["token_id"] == caller.token_id
    assert caller.token not in json.dumps(events)

    garbled = run("tokens", "revoke", "--stdin", "--yes", stdin="cbt_" + "0" * 36)
    assert garbled.returncode == 1
    assert "422 invalid_field: token: not a proxy token value" in garbled.stderr
    unknown = run(
        "tokens", "revoke", "--stdin", "--yes", stdin=generate_secret(SecretKind.PROXY_TOKEN)
    )
    assert unknown.returncode == 1
    assert "404 not_found: no proxy token has that value" in unknown.stderr


def test_token_value_on_the_command_line_is_refused_and_not_sent(live_broker: LiveBroker) -> None:
    caller = live_broker.caller([COURSE_SCOPE], {})
    cli = Cli(live_broker.url, live_broker.admin_key)

    result = cli("tokens", "revoke", caller.token, "--yes")

    assert result.returncode == 1
    assert "--stdin" in result.stderr
    assert caller.token not in result.stderr + result.stdout
    [token] = live_broker.http.get("/broker/v1/tokens", params={"client": caller.client_id}).json()
    assert token["revoked_at"] is None


def test_admin_keys_are_created_over_http_listed_and_revoked(live_broker: LiveBroker) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key)
    created = cli("admin-key", "create", "--via-api", "--name", "siem", "--role", "auditor")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert re.fullmatch(r"cba_[0-9A-Za-z]{36}", key)

    listed = cli("admin-key", "list", "--json")
    assert key not in listed.stdout
    [siem] = [k for k in json.loads(listed.stdout) if k["name"] == "siem"]
    assert siem["role"] == "auditor"
    assert Cli(live_broker.url, key)("upstreams", "list").returncode == 0

    assert cli("admin-key", "revoke", siem["id"]).returncode == 1  # no --yes, no terminal
    revoked = cli("admin-key", "revoke", siem["id"], "--yes", "--json")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked_at"] is not None
    refused = Cli(live_broker.url, key)("upstreams", "list")
    assert refused.returncode == 1
    assert "401" in refused.stderr
    assert "BROKER_ADMIN_KEY" in refused.stderr


def test_credential_metadata_is_shown_and_changed_and_rotation_asks(
    live_broker: LiveBroker,
) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key)
    changed = cli("credentials", "update", "worker", "--notes", "owned by registrar", "--json")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["notes"] == "owned by registrar"
    shown = cli("credentials", "get", "worker")
    assert re.search(r"notes\s+owned by registrar", shown.stdout), shown.stdout
    assert WORKER_TOKEN not in shown.stdout

    refused = cli("credentials", "rotate", "worker", BROKER_WORKER_TOKEN="new-token-1234")
    assert refused.returncode == 1
    assert "--yes" in refused.stderr
    stored = live_broker.http.get("/broker/v1/credentials/worker").json()
    assert stored["token_last4"] == WORKER_TOKEN[-4:]


def test_errors_name_the_setting_that_is_wrong(live_broker: LiveBroker, sim: SimServer) -> None:
    not_a_broker = Cli(sim.base_url, live_broker.admin_key)("upstreams", "list")
    assert not_a_broker.returncode == 1
    assert f"BROKER_URL={sim.base_url} does not look like a Canvas Token Broker" in (
        not_a_broker.stderr
    )

    nobody = _free_url()
    refused = Cli(nobody, live_broker.admin_key)("upstreams", "list")
    assert refused.returncode == 1
    assert f"cannot connect to the broker at BROKER_URL={nobody}" in refused.stderr

    wrong_key = Cli(live_broker.url, "cba_" + "A" * 36)("upstreams", "list")
    assert wrong_key.returncode == 1
    assert "401 invalid_admin_key" in wrong_key.stderr
    assert "BROKER_ADMIN_KEY" in wrong_key.stderr

    not_a_broker_token = Cli(sim.base_url, live_broker.admin_key)(
        "token", BROKER_CLIENT_ID="cli_x", BROKER_CLIENT_SECRET="cbs_x"
    )
    assert not_a_broker_token.returncode == 1
    assert "does not look like a Canvas Token Broker" in not_a_broker_token.stderr
