"""Client updates through the ``broker`` command line (docs/interfaces.md#command-line): only
what is named changes, every change is printed as ``field: old -> new``, and clearing
constraints takes ``--clear-constraints``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from tests.e2e.test_cli_management import Cli

if TYPE_CHECKING:
    from tests.e2e.conftest import LiveBroker

COURSES = "url:GET|/api/v1/courses/:course_id/assignments"
USERS = "url:GET|/api/v1/users/:user_id"


def _create(cli: Cli) -> None:
    created = cli(
        "clients",
        "create",
        "--name",
        "grade-export",
        "--credential",
        "worker",
        "--scope",
        COURSES,
        "--scope",
        USERS,
        "--constraint",
        "course_id=1201",
        "--rate-limit",
        "5",
        "--burst",
        "20",
    )
    assert created.returncode == 0, created.stderr


def test_grant_keeps_constraints_refuses_typos_and_clears_only_when_told(
    live_broker: LiveBroker,
) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key, as_json=True)
    _create(cli)

    typo = cli("clients", "grant", "grade-export", "--constraint", "courseid=1201")
    assert typo.returncode == 1
    assert "'courseid'" in typo.stderr
    assert "course_id, user_id" in typo.stderr

    narrowed = cli("clients", "grant", "grade-export", "--scope", COURSES)
    assert narrowed.returncode == 0, narrowed.stderr
    assert json.loads(narrowed.stdout)["constraints"] == {"course_id": ["1201"]}
    assert f'scopes: ["{COURSES}", "{USERS}"] -> ["{COURSES}"]' in narrowed.stderr
    assert "constraints:" not in narrowed.stderr

    orphaned = cli("clients", "grant", "grade-export", "--scope", USERS)
    assert orphaned.returncode == 1
    assert "--clear-constraints" in orphaned.stderr
    assert json.loads(cli("clients", "get", "grade-export").stdout)["scopes"] == [COURSES]

    both = cli(
        "clients", "grant", "grade-export", "--constraint", "course_id=1", "--clear-constraints"
    )
    assert both.returncode == 2
    assert "not both" in both.stderr

    cleared = cli("clients", "grant", "grade-export", "--scope", USERS, "--clear-constraints")
    assert cleared.returncode == 0, cleared.stderr
    assert 'constraints: {"course_id": ["1201"]} -> {}' in cleared.stderr
    assert json.loads(cleared.stdout)["constraints"] == {}

    again = cli("clients", "grant", "grade-export", "--scope", USERS)
    assert again.returncode == 0, again.stderr
    assert "no changes to grade-export" in again.stderr


def test_update_changes_only_the_settings_named_and_prints_each_change(
    live_broker: LiveBroker,
) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key, as_json=True)
    _create(cli)
    before = json.loads(cli("clients", "get", "grade-export").stdout)

    updated = cli(
        "clients",
        "update",
        "grade-export",
        "--token-ttl",
        "600",
        "--cidr",
        "10.0.0.0/8",
        "--cidr",
        "192.168.1.7",
        "--allow-masquerade",
    )
    assert updated.returncode == 0, updated.stderr
    assert updated.stderr.splitlines() == [
        "token_ttl: 900 -> 600",
        "allow_masquerade: false -> true",
        'allowed_cidrs: [] -> ["10.0.0.0/8", "192.168.1.7/32"]',
    ]
    after = json.loads(updated.stdout)
    # canvas_share is live state, not a setting: only `clients get` computes it.
    assert set(after) - {"canvas_share"} == set(before) - {"canvas_share"}
    differing = {
        k for k in before if k not in {"updated_at", "canvas_share"} and after[k] != before[k]
    }
    assert differing == {"token_ttl", "allowed_cidrs", "allow_masquerade"}
    assert after["constraints"] == {"course_id": ["1201"]}

    rate = cli("clients", "update", "grade-export", "--rate-limit", "8")
    assert rate.returncode == 0, rate.stderr
    assert rate.stderr.splitlines() == ["rate_limit: 5.0 -> 8.0"]
    assert json.loads(rate.stdout)["rate_burst"] == 20

    unlimited = cli("clients", "update", "grade-export", "--no-rate-limit", "--clear-cidrs")
    assert unlimited.returncode == 0, unlimited.stderr
    assert "rate_limit: 8.0 -> null" in unlimited.stderr
    assert "rate_burst: 20 -> null" in unlimited.stderr
    assert 'allowed_cidrs: ["10.0.0.0/8", "192.168.1.7/32"] -> []' in unlimited.stderr

    nothing = cli("clients", "update", "grade-export")
    assert nothing.returncode == 2
    assert "--token-ttl" in nothing.stderr

    conflicting = cli("clients", "update", "grade-export", "--rate-limit", "1", "--no-rate-limit")
    assert conflicting.returncode == 2

    flags = cli("clients", "set", "grade-export", "--allow-includes")
    assert flags.returncode == 0, flags.stderr
    assert flags.stderr.splitlines() == ["allow_includes: false -> true"]

    events = live_broker.http.get("/broker/v1/audit", params={"action": "client.update"})
    changes = [event["details"]["changes"] for event in events.json()["events"]]
    assert changes[-1]["token_ttl"] == {"old": 900, "new": 600}
    assert changes[0] == {"allow_includes": {"old": False, "new": True}}


def test_enable_says_earlier_tokens_stay_revoked(live_broker: LiveBroker) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key, as_json=True)
    caller = live_broker.caller([COURSES], {"course_id": ["1201"]})
    ref = caller.client_id
    disabled = cli("clients", "disable", ref, "--yes")
    assert disabled.returncode == 0, disabled.stderr
    assert "enabled: true -> false" in disabled.stderr
    assert "revoked 1 live token(s)" in disabled.stderr
    enabled = cli("clients", "enable", ref)
    assert enabled.returncode == 0, enabled.stderr
    assert "enabled: false -> true" in enabled.stderr
    assert "tokens minted before it was disabled stay revoked; mint new ones" in enabled.stderr
    assert json.loads(enabled.stdout)["enabled"] is True


def test_canvas_weight_is_set_at_creation_changed_and_shown_with_the_share(
    live_broker: LiveBroker,
) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key, as_json=True)
    created = cli(
        "clients",
        "create",
        "--name",
        "bulk-export",
        "--credential",
        "worker",
        "--scope",
        COURSES,
        "--canvas-weight",
        "0.5",
    )
    assert created.returncode == 0, created.stderr

    refused = cli("clients", "update", "bulk-export", "--canvas-weight", "0")
    assert refused.returncode == 1
    assert "canvas_weight" in refused.stderr

    changed = cli("clients", "update", "bulk-export", "--canvas-weight", "2")
    assert changed.returncode == 0, changed.stderr
    assert "canvas_weight: 0.5 -> 2.0" in changed.stderr

    shown = json.loads(cli("clients", "get", "bulk-export").stdout)
    assert shown["canvas_weight"] == 2.0
    assert shown["canvas_share"]["weight"] == 2.0
    assert shown["canvas_share"]["asking"] is False
