"""``broker credentials create/rotate`` verify the worker token with Canvas, as an admin runs
them against a live broker (docs/interfaces.md#worker-credentials)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from tests.e2e.test_cli_management import Cli
from tests.support.env import WORKER_TOKEN

if TYPE_CHECKING:
    from broker.sim.server import SimServer
    from tests.e2e.conftest import LiveBroker

WRONG_TOKEN = "typo-in-the-pasted-canvas-token"


def test_credentials_create_refuses_a_token_canvas_rejects_and_stores_nothing(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key, as_json=True)
    args = ("credentials", "create", "--upstream", "sim", "--name", "typo")
    refused = cli(*args, BROKER_WORKER_TOKEN=WRONG_TOKEN)
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert "422 canvas_rejected_token: Canvas rejected this token" in refused.stderr
    assert WRONG_TOKEN not in refused.stderr
    assert sim.state.received[-1].header("authorization") == f"Bearer {WRONG_TOKEN}"
    listed = json.loads(cli("credentials", "list").stdout)
    assert [c["name"] for c in listed] == ["worker"]

    offline = cli(*args, "--no-verify", BROKER_WORKER_TOKEN=WRONG_TOKEN)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["canvas_user_name"] is None


def test_credentials_list_shows_the_verified_canvas_user(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    cli = Cli(live_broker.url, live_broker.admin_key, as_json=True)
    rotated = cli("credentials", "rotate", "worker", "--yes", BROKER_WORKER_TOKEN=WORKER_TOKEN)
    assert rotated.returncode == 0, rotated.stderr
    [worker] = json.loads(cli("credentials", "list").stdout)
    assert (worker["canvas_user_id"], worker["canvas_user_name"]) == ("1", "Grace Hopper")


def test_an_oauth_credential_from_the_cli_create_authorize_and_record_scopes(
    live_broker: LiveBroker, sim: SimServer
) -> None:
    # The contract: docs/interfaces.md#oauth-worker-credentials.
    cli = Cli(live_broker.url, live_broker.admin_key, as_json=True)
    key_secret = "developer-key-secret-" + "x" * 24
    created = cli(
        "credentials",
        "create",
        "--upstream",
        "sim",
        "--name",
        "bot",
        "--developer-key-id",
        "10000000000007",
        "--key-scope",
        "url:GET|/api/v1/courses/:id",
        BROKER_DEVELOPER_KEY_SECRET=key_secret,
    )
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    assert (body["kind"], body["unavailable_reason"]) == ("oauth", "not_authorized")
    assert key_secret not in created.stdout + created.stderr

    human = Cli(live_broker.url, live_broker.admin_key, as_json=False)
    link = human("credentials", "authorize", "bot")
    assert link.returncode == 0, link.stderr
    assert f"{sim.base_url}/login/oauth2/auth?client_id=10000000000007" in link.stdout
    assert "/broker/v1/oauth/callback" in link.stdout

    scoped = cli(
        "credentials", "update", "bot", "--key-scope", "url:GET|/api/v1/courses/:course_id/users"
    )
    assert scoped.returncode == 0, scoped.stderr
    assert json.loads(scoped.stdout)["oauth"]["key_scopes"] == [
        "url:GET|/api/v1/courses/:course_id/users"
    ]
    manual = cli("credentials", "authorize", "worker")
    assert manual.returncode == 1
    assert "409 conflict" in manual.stderr
