"""A keyless job end to end: the admin sets it up with ``broker``, the job exchanges its
platform's token with ``broker token --subject-token-file`` and calls Canvas with canvasapi.

The platform is an OIDC issuer on loopback (tests/support/oidc_issuer.py); the broker is a
real server, the simulator is Canvas. Refused exchanges must leave the simulator untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from canvasapi import Canvas

from tests.support.oidc_issuer import OIDCIssuer, github_claims
from tests.support.serve import free_port

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from broker.sim.server import SimServer
    from tests.e2e.conftest import LiveBroker

pytestmark = pytest.mark.filterwarnings("ignore:.*HTTP.*:UserWarning")  # loopback is http
AUDIENCE = "https://canvas-broker.example.edu"
REPO = "example-org/canvas-sync"
SCOPE = "url:GET|/api/v1/courses/:id"


@pytest.fixture
def issuer() -> Iterator[OIDCIssuer]:
    with OIDCIssuer() as server:
        yield server


def broker_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def test_keyless_job_calls_canvas_with_canvasapi_and_is_refused_off_policy(
    make_live_broker: Callable[..., LiveBroker],
    sim: SimServer,
    issuer: OIDCIssuer,
    tmp_path: Path,
) -> None:
    broker = make_live_broker(workload_allow_loopback_http=True)
    admin = {"BROKER_URL": broker.url, "BROKER_ADMIN_KEY": broker.admin_key}
    added = broker_cli("--json", "issuers", "add", issuer.url, "--description", "CI", env=admin)
    assert added.returncode == 0, added.stderr
    created = broker_cli(
        "clients",
        "create",
        "--name",
        "canvas-sync",
        "--credential",
        "worker",
        "--scope",
        SCOPE,
        "--constraint",
        "id=1201",
        "--trust-issuer",
        issuer.url,
        "--trust-audience",
        AUDIENCE,
        "--claim",
        f"sub=repo:{REPO}:ref:refs/heads/main",
        "--claim-pattern",
        "workflow=sync|nightly",
        env=admin,
    )
    assert created.returncode == 0, created.stderr
    client_id = created.stdout.strip()
    shown = broker_cli("--json", "clients", "get", client_id, env=admin)
    [policy] = json.loads(shown.stdout)["trust_policies"]
    assert policy["claims"]["workflow"] == {"pattern": "sync|nightly"}

    job = {"BROKER_URL": broker.url, "BROKER_CLIENT_ID": client_id}
    id_token = tmp_path / "id-token"
    id_token.write_text(issuer.sign({"aud": AUDIENCE, **github_claims(REPO)}) + "\n")
    minted = broker_cli("token", "--subject-token-file", str(id_token), env=job)
    assert minted.returncode == 0, minted.stderr
    canvas = Canvas(broker.url, minted.stdout.strip())
    assert canvas.get_course(1201).id == 1201
    assert [r.target for r in sim.state.received] == ["/api/v1/courses/1201"]

    sim.state.received.clear()
    refusals = {
        "another branch": issuer.sign(
            {"aud": AUDIENCE, **github_claims(REPO, ref="refs/heads/feature")}
        ),
        "another repository": issuer.sign(
            {"aud": AUDIENCE, **github_claims("example-org/canvas-sync-fork")}
        ),
        "another audience": issuer.sign({"aud": "https://other.example", **github_claims(REPO)}),
        "expired": issuer.sign({"aud": AUDIENCE, **github_claims(REPO)}, lifetime=-120),
        "replayed": id_token.read_text().strip(),
    }
    for case, token in refusals.items():
        id_token.write_text(token)
        refused = broker_cli("token", "--subject-token-file", str(id_token), env=job)
        assert refused.returncode == 1, case
        assert refused.stdout == "", case
        assert "invalid_request" in refused.stderr, (case, refused.stderr)
    assert sim.state.received == []
    events = broker.http.get(
        "/broker/v1/audit", params={"action": "token.exchange", "limit": 20}
    ).json()["events"]
    reasons = [e["reason"] for e in events]
    assert reasons[: len(refusals)] == [
        "subject_token_replayed",
        "subject_token_expired",
        "audience_mismatch",
        "claim_mismatch",
        "claim_mismatch",
    ]
    assert all(e["details"]["issuer"] == issuer.url for e in events)
    assert events[-1]["decision"] == "allow"


def test_keyless_job_fails_closed_when_its_issuer_is_down(
    make_live_broker: Callable[..., LiveBroker], sim: SimServer, tmp_path: Path
) -> None:
    broker = make_live_broker(workload_allow_loopback_http=True)
    down = f"http://127.0.0.1:{free_port()}"
    with OIDCIssuer() as signer:
        token = signer.sign({"aud": AUDIENCE, **github_claims(REPO), "iss": down})
    assert broker.http.post(
        "/broker/v1/trusted-issuers", json={"issuer": down, "verify": False}
    ).is_success
    created = broker.http.post(
        "/broker/v1/clients",
        json={
            "name": "offline-job",
            "credential": "worker",
            "scopes": [SCOPE],
            "auth_method": "workload_identity",
            "trust_policies": [
                {"issuer": down, "audience": AUDIENCE, "claims": {"repository": REPO}}
            ],
            "verify": False,
        },
    )
    assert created.status_code == 201, created.text
    id_token = tmp_path / "id-token"
    id_token.write_text(token)
    job = {"BROKER_URL": broker.url, "BROKER_CLIENT_ID": created.json()["client_id"]}
    refused = broker_cli("token", "--subject-token-file", str(id_token), env=job)
    assert refused.returncode == 1
    assert "temporarily_unavailable" in refused.stderr
    assert sim.state.received == []


def test_admin_edits_trust_policies_and_the_allowlist_with_the_cli(
    live_broker: LiveBroker, tmp_path: Path
) -> None:
    admin = {"BROKER_URL": live_broker.url, "BROKER_ADMIN_KEY": live_broker.admin_key}
    github = "https://token.actions.githubusercontent.com"
    added = broker_cli("--json", "issuers", "add", github, "--no-verify", env=admin)
    assert added.returncode == 0, added.stderr
    client_id, _secret = live_broker.client([SCOPE], {})
    trusted = broker_cli(
        "--json",
        "clients",
        "trust",
        client_id,
        "--issuer",
        github,
        "--audience",
        AUDIENCE,
        "--claim",
        f"repository={REPO}",
        "--claim-pattern",
        "ref=refs/heads/(main|release)",
        "--no-verify",
        env=admin,
    )
    assert trusted.returncode == 0, trusted.stderr
    assert "trust_policies: [] -> " in trusted.stderr
    [policy] = json.loads(trusted.stdout)["trust_policies"]
    assert policy["claims"] == {"repository": REPO, "ref": {"pattern": "refs/heads/(main|release)"}}

    too_wide = broker_cli(
        "clients", "trust", client_id, "--issuer", github, "--audience", AUDIENCE,
        "--claim-pattern", "sub=.*", "--no-verify", env=admin,
    )  # fmt: skip
    assert too_wide.returncode == 1
    assert "would accept almost anyone" in too_wide.stderr

    untrusted = broker_cli("--json", "clients", "untrust", client_id, "0", env=admin)
    assert untrusted.returncode == 0, untrusted.stderr
    assert json.loads(untrusted.stdout)["trust_policies"] == []
    removed = broker_cli("issuers", "remove", github, "--yes", env=admin)
    assert removed.returncode == 0, removed.stderr
    listed = broker_cli("--json", "issuers", "list", env=admin)
    assert json.loads(listed.stdout) == []

    job = {"BROKER_URL": live_broker.url, "BROKER_CLIENT_ID": client_id}
    missing = broker_cli("token", "--subject-token-file", str(tmp_path / "absent"), env=job)
    assert missing.returncode == 1
    assert "cannot read the subject token" in missing.stderr
