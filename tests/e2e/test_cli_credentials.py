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
