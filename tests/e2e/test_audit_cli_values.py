"""``broker audit query`` and ``export`` never answer a mistaken filter with silence
(docs/audit.md#review): unknown values exit 2 naming the allowed ones, names work as ids."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx
import pytest

from broker.core.audit_values import Decision, Kind
from tests.e2e.test_cli_management import Cli

if TYPE_CHECKING:
    from tests.e2e.conftest import LiveBroker


@pytest.mark.parametrize("command", ["query", "export"])
def test_unknown_filter_values_exit_2_naming_the_allowed_values(
    live_broker: LiveBroker, command: str
) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key, as_json=True)
    # A wide terminal, so the error box does not wrap the list.
    decision = cli("audit", command, "--decision", "maybe", COLUMNS="300")
    assert decision.returncode == 2
    assert "--decision" in decision.stderr
    assert ", ".join(sorted(Decision)) in decision.stderr
    assert decision.stdout == ""
    kind = cli("audit", command, "--kind", "Proxy", COLUMNS="300")
    assert kind.returncode == 2
    assert ", ".join(sorted(Kind)) in kind.stderr


def test_client_names_select_as_ids_and_unknown_names_are_errors(
    live_broker: LiveBroker,
) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key, as_json=True)
    caller = live_broker.caller(["url:GET|/api/v1/courses/:id"], {})
    name = live_broker.http.get(f"/broker/v1/clients/{caller.client_id}").json()["name"]
    answered = httpx.get(
        f"{live_broker.url}/api/v1/courses/1201",
        headers={"Authorization": f"Bearer {caller.token}"},
    )
    assert answered.status_code == 200
    by_name = cli("audit", "query", "--client", name, "--kind", "proxy")
    assert by_name.returncode == 0, by_name.stderr
    events = json.loads(by_name.stdout)["events"]
    assert [e["client_id"] for e in events] == [caller.client_id]

    unknown = cli("audit", "query", "--client", "grade-exprot")
    assert unknown.returncode == 1
    assert "404 not_found: no client 'grade-exprot'" in unknown.stderr
    exported = cli("audit", "export", "--credential", "nobody")
    assert exported.returncode == 1
    assert "no credential 'nobody'" in exported.stderr
    assert exported.stdout == ""
