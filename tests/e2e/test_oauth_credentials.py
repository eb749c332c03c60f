"""OAuth worker credentials end to end, against an independent stub of Canvas's OAuth2 provider.

Contract: docs/interfaces.md#oauth-worker-credentials. The stub (tests/support/canvas_oauth_stub.py)
is not the project's simulator: it is a second reading of Canvas's endpoints, so the broker is
not only checked against the simulator it ships.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from broker.core.worker_oauth import challenge_of
from broker.keyring import Keyring
from broker.services.keys import reencrypt_credentials
from broker.services.revocation import CacheEpoch
from broker.services.worker_oauth import WorkerOAuthService
from broker.storage import credentials, oauth_grants
from broker.storage.leases import Lease
from broker.storage.models import utcnow
from tests.support.canvas_oauth_stub import StubServer, StubState
from tests.support.env import bearer

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support.env import BrokerEnv

V1 = "/broker/v1"
COURSE = "/api/v1/courses/1201"
SCOPES = ["url:GET|/api/v1/courses/:id"]


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with StubServer(StubState()) as server:
        yield server


@pytest.fixture
async def oauth(env: BrokerEnv, stub: StubServer) -> dict[str, Any]:
    """An upstream on the stub, an OAuth credential on it (not authorised) and a client."""
    created = await env.http.post(
        f"{V1}/upstreams", headers=env.admin(), json={"name": "stub", "base_url": stub.base_url}
    )
    assert created.status_code == 201, created.text
    response = await env.http.post(
        f"{V1}/credentials",
        headers=env.admin(),
        json={
            "upstream": "stub",
            "name": "bot",
            "developer_key": {
                "client_id": stub.state.client_id,
                "client_secret": stub.state.client_secret,
                "scopes": SCOPES,
            },
        },
    )
    assert response.status_code == 201, response.text
    client_id, secret = await env.client("oauth-job", scopes=SCOPES, credential="bot")
    return {"credential": response.json(), "client_id": client_id, "secret": secret}


async def authorize(env: BrokerEnv, stub: StubServer) -> httpx.Response:
    """Start the authorisation, let the stub consent, and follow Canvas's redirect back."""
    started = await env.http.post(f"{V1}/credentials/bot/authorize", headers=env.admin())
    assert started.status_code == 200, started.text
    async with httpx.AsyncClient() as browser:
        consent = await browser.get(started.json()["authorization_url"])
    assert consent.status_code == 302, consent.text
    back = urlsplit(consent.headers["location"])
    return await env.http.get(f"{back.path}?{back.query}")


def refresher(env: BrokerEnv, epoch: CacheEpoch | None = None) -> WorkerOAuthService:
    """Another process's refresher on the same database (its own epoch: another replica)."""
    context = env.context
    return WorkerOAuthService(
        context.sessions, context.keyring, epoch or CacheEpoch(), context.forwarder
    )


def no_secret_in(text: str, stub: StubServer) -> None:
    for secret in stub.state.issued():
        assert secret not in text


async def test_an_unauthorised_credential_is_refused_before_anything_is_sent(
    env: BrokerEnv, stub: StubServer, oauth: dict[str, Any]
) -> None:
    assert oauth["credential"]["kind"] == "oauth"
    assert oauth["credential"]["unavailable_reason"] == "not_authorized"
    assert oauth["credential"]["oauth"]["authorized"] is False
    assert "client_secret" not in json.dumps(oauth["credential"])
    token = await env.token(oauth["client_id"], oauth["secret"])
    response = await env.http.get(COURSE, headers=bearer(token))
    assert response.status_code == 503
    assert response.json()["error"] == "credential_unavailable"
    assert stub.state.api_calls == []
    ready = (await env.http.get("/readyz")).json()
    assert ready["unavailable_credentials"][0]["name"] == "bot"


async def test_the_authorisation_url_carries_state_pkce_and_the_key_scopes(
    env: BrokerEnv, stub: StubServer, oauth: dict[str, Any]
) -> None:
    started = await env.http.post(f"{V1}/credentials/bot/authorize", headers=env.admin())
    url = urlsplit(started.json()["authorization_url"])
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert url.path == "/login/oauth2/auth"
    assert query["client_id"] == stub.state.client_id
    assert query["response_type"] == "code"
    assert query["code_challenge_method"] == "S256"
    assert len(query["code_challenge"]) == 43  # base64url of a SHA-256, unpadded
    assert query["scope"] == SCOPES[0]
    assert query["redirect_uri"] == started.json()["redirect_uri"]
    assert query["redirect_uri"].endswith("/broker/v1/oauth/callback")
    assert len(query["state"]) >= 40
    assert challenge_of("a" * 43) != query["code_challenge"]
    [event, *_] = await env.audit(action="credential.authorize_start")
    assert query["state"] not in json.dumps(event)


async def test_authorised_once_then_calls_go_through_and_nothing_secret_is_shown(
    env: BrokerEnv, stub: StubServer, oauth: dict[str, Any]
) -> None:
    page = await authorize(env, stub)
    assert page.status_code == 200, page.text
    assert "Authorised" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    token = await env.token(oauth["client_id"], oauth["secret"])
    response = await env.http.get(COURSE, headers=bearer(token))
    assert response.status_code == 200, response.text
    [access] = stub.state.live
    assert stub.state.api_calls == [access]
    credential = (await env.http.get(f"{V1}/credentials/bot", headers=env.admin())).json()
    assert credential["unavailable_reason"] is None
    assert credential["canvas_user_id"] == "77"
    assert credential["oauth"]["authorized"] is True
    assert credential["token_expires_at"] is not None
    export = await env.http.get(f"{V1}/audit/export", headers=env.auditor())
    for shown in (page.text, json.dumps(credential), export.text):
        no_secret_in(shown, stub)
    [done] = await env.audit(action="credential.authorize", decision="allow")
    assert done["credential_id"] == credential["id"]


async def test_the_callback_refuses_a_replayed_or_foreign_state(
    env: BrokerEnv, stub: StubServer, oauth: dict[str, Any]
) -> None:
    started = await env.http.post(f"{V1}/credentials/bot/authorize", headers=env.admin())
    async with httpx.AsyncClient() as browser:
        consent = await browser.get(started.json()["authorization_url"])
    back = urlsplit(consent.headers["location"])
    first = await env.http.get(f"{back.path}?{back.query}")
    assert first.status_code == 200
    replay = await env.http.get(f"{back.path}?{back.query}")
    assert replay.status_code == 400
    assert "already used" in replay.text
    foreign = await env.http.get(f"{back.path}?code=x&state=not-a-state-this-broker-issued")
    assert foreign.status_code == 400
    assert "did not issue" in foreign.text
    denied = await env.http.get(f"{back.path}?error=access_denied")
    assert denied.status_code == 400
    refusals = await env.audit(action="credential.authorize", decision="deny")
    assert [e["details"]["cause"] for e in refusals] == ["refused", "unknown", "replayed"]
    token_exchanges = [r for r in stub.state.token_requests if r]
    assert len(token_exchanges) == 1  # the replay and the forgery never reached Canvas


async def test_a_wrong_pkce_verifier_is_refused_by_canvas_and_nothing_is_stored(
    env: BrokerEnv, stub: StubServer, oauth: dict[str, Any]
) -> None:
    started = await env.http.post(f"{V1}/credentials/bot/authorize", headers=env.admin())
    url = started.json()["authorization_url"]
    tampered = url.replace("code_challenge=", "code_challenge=x", 1)
    async with httpx.AsyncClient() as browser:
        consent = await browser.get(tampered)
    back = urlsplit(consent.headers["location"])
    page = await env.http.get(f"{back.path}?{back.query}")
    assert page.status_code == 400
    assert "Canvas refused the authorisation code" in page.text
    credential = (await env.http.get(f"{V1}/credentials/bot", headers=env.admin())).json()
    assert credential["unavailable_reason"] == "not_authorized"


async def test_one_refresh_per_expiry_across_processes(
    env: BrokerEnv, stub: StubServer, oauth: dict[str, Any]
) -> None:
    stub.state.expires_in = 2  # refreshed a second before expiry
    assert (await authorize(env, stub)).status_code == 200
    token = await env.token(oauth["client_id"], oauth["secret"])
    processes = [refresher(env) for _ in range(4)]
    stopping = asyncio.Event()
    started = time.monotonic()
    loops = [asyncio.ensure_future(p.run(stopping)) for p in processes]
    statuses = []
    try:
        for _ in range(30):  # about 4.5 s: a renewal a second (half of the two-second life)
            statuses.append((await env.http.get(COURSE, headers=bearer(token))).status_code)
            await asyncio.sleep(0.15)
    finally:
        stopping.set()
        await asyncio.gather(*loops)
    elapsed = time.monotonic() - started
    assert set(statuses) == {200}
    refreshed = stub.state.refreshes
    assert 2 <= refreshed <= elapsed + 2, (refreshed, elapsed)  # about one a second, not four
    events = await env.audit(action="credential.refresh")
    assert len(events) == refreshed
    times = sorted(datetime.fromisoformat(e["time"]) for e in events)
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]
    assert min(gaps) > 0.5, gaps  # each expiry renewed once, by one of the four processes


async def test_a_refresh_committed_between_the_two_reads_of_a_refused_call_is_used(
    env: BrokerEnv, stub: StubServer, oauth: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Canvas refused the cached token; the broker reads the refresh lease, then the stored
    # token (renewal.newer_token). A refresh elsewhere commits its token and releases its
    # lease between those two reads: the new token must be found, not the call refused. On
    # PostgreSQL each statement sees the latest commit, so the order of the reads decides.
    assert (await authorize(env, stub)).status_code == 200
    credential_id = oauth["credential"]["id"]
    old = await refresher(env).renewed_token(credential_id, "not-the-stored-token")
    assert old is not None
    elsewhere = refresher(env)
    now = utcnow()
    async with env.context.sessions.begin() as session:
        assert await oauth_grants.REFRESH_LEASE.take(
            session,
            credential_id,
            holder=elsewhere._holder,
            now=now,
            until=now + timedelta(seconds=30),
            due_by=None,
        )
    reads: list[str] = []
    real_live, real_token = Lease.live, credentials.sealed_token

    async def committed_after_the_first_read() -> None:
        if len(reads) == 1:
            # Canvas answers elsewhere's refresh; it stores the token and releases the lease.
            await elsewhere._refresh_leased(credential_id, now)

    async def live(self: Lease, *args: Any) -> bool:
        answer = await real_live(self, *args)
        reads.append("lease")
        await committed_after_the_first_read()
        return answer

    async def sealed_token(*args: Any) -> Any:
        answer = await real_token(*args)
        reads.append("token")
        await committed_after_the_first_read()
        return answer

    monkeypatch.setattr(Lease, "live", live)
    monkeypatch.setattr(credentials, "sealed_token", sealed_token)
    fresh = await refresher(env).renewed_token(credential_id, old)
    assert reads[:2] == ["lease", "token"]
    assert stub.state.refreshes == 1
    assert fresh is not None
    assert fresh != old
    assert stub.state.live == {fresh}  # the token Canvas holds live now


async def test_a_token_renewed_by_another_replica_is_used_at_once(
    env: BrokerEnv, stub: StubServer, oauth: dict[str, Any]
) -> None:
    assert (await authorize(env, stub)).status_code == 200
    token = await env.token(oauth["client_id"], oauth["secret"])
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200  # cached
    [old] = stub.state.live
    # Another replica renews it: Canvas regenerates the token, this replica's cache is stale.
    assert await refresher(env).refresh(oauth["credential"]["id"], force=True) == "refreshed"
    response = await env.http.get(COURSE, headers=bearer(token))
    assert response.status_code == 200, response.text
    [new] = stub.state.live
    assert stub.state.api_calls[-2:] == [old, new]


async def test_a_disabled_developer_key_stops_the_credential_and_reauthorising_resumes(
    env: BrokerEnv, stub: StubServer, oauth: dict[str, Any]
) -> None:
    assert (await authorize(env, stub)).status_code == 200
    token = await env.token(oauth["client_id"], oauth["secret"])
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200
    stub.state.enabled = False
    first = await env.http.get(COURSE, headers=bearer(token))
    assert first.status_code == 401  # Canvas's own answer, relayed; a refresh starts

    async def unavailable() -> bool:
        answer = await env.http.get(f"{V1}/credentials/bot", headers=env.admin())
        return bool(answer.json()["unavailable_reason"] == "refresh_refused")

    for _ in range(50):
        if await unavailable():
            break
        await asyncio.sleep(0.02)
    assert await unavailable()
    calls = len(stub.state.api_calls)
    refused = await env.http.get(COURSE, headers=bearer(token))
    assert refused.status_code == 503
    assert refused.json()["error"] == "credential_unavailable"
    assert len(stub.state.api_calls) == calls  # refused before it was sent
    metrics = (await env.http.get("/metrics")).text
    assert 'broker_credential_unavailable{credential="bot",reason="refresh_refused"} 1.0' in metrics
    ready = await env.http.get("/readyz")
    assert ready.json()["unavailable_credentials"][0]["reason"] == "refresh_refused"
    [event] = await env.audit(action="credential.refresh", decision="deny")
    assert event["details"]["changes"]["canvas_error"] == "invalid_client"

    stub.state.enabled = True
    assert (await authorize(env, stub)).status_code == 200
    assert (await env.http.get(COURSE, headers=bearer(token))).status_code == 200


async def test_reauthorising_as_another_canvas_user_is_refused(
    env: BrokerEnv, stub: StubServer, oauth: dict[str, Any]
) -> None:
    assert (await authorize(env, stub)).status_code == 200
    stub.state.user = {"id": 78, "name": "Someone Else"}
    page = await authorize(env, stub)
    assert page.status_code == 400
    assert "user 78" in page.text
    credential = (await env.http.get(f"{V1}/credentials/bot", headers=env.admin())).json()
    assert credential["canvas_user_id"] == "77"


async def test_grants_outside_the_key_scopes_are_warned_about(
    env: BrokerEnv, oauth: dict[str, Any]
) -> None:
    outside = "url:GET|/api/v1/courses/:course_id/assignments"
    response = await env.http.patch(
        f"{V1}/clients/{oauth['client_id']}",
        headers=env.admin(),
        json={"scopes": [*SCOPES, outside]},
    )
    assert response.status_code == 200, response.text
    [warning] = [w for w in response.json()["warnings"] if "developer key" in w]
    assert outside in warning


async def test_a_manual_credential_cannot_be_authorised_nor_an_oauth_one_rotated(
    env: BrokerEnv, oauth: dict[str, Any]
) -> None:
    manual = await env.http.post(f"{V1}/credentials/worker/authorize", headers=env.admin())
    assert manual.status_code == 409
    rotate = await env.http.post(
        f"{V1}/credentials/bot/rotate",
        headers=env.admin(),
        json={"token": "x" * 40, "verify": False},
    )
    assert rotate.status_code == 409


@pytest.mark.parametrize(
    ("developer_key", "field"),
    [
        ({"client_id": "abc", "client_secret": "s" * 40}, "developer_key_id"),
        ({"client_id": "1", "client_secret": "short"}, "developer_key_secret"),
        ({"client_id": "1", "client_secret": "s" * 40, "scopes": ["nope"]}, "key_scopes"),
    ],
)
async def test_a_bad_developer_key_is_refused_when_saved(
    env: BrokerEnv, developer_key: dict[str, Any], field: str
) -> None:
    response = await env.http.post(
        f"{V1}/credentials",
        headers=env.admin(),
        json={"upstream": "sim", "name": "bad", "developer_key": developer_key},
    )
    assert response.status_code == 422, response.text
    assert field in response.text
    listed = (await env.http.get(f"{V1}/credentials", headers=env.admin())).json()
    assert [c["name"] for c in listed] == ["worker"]


async def test_key_rotation_reseals_the_developer_key_and_refresh_token(
    env: BrokerEnv, stub: StubServer, oauth: dict[str, Any]
) -> None:
    assert (await authorize(env, stub)).status_code == 200
    rotated = env.context.keyring.with_new_primary()
    assert await reencrypt_credentials(env.context.sessions, rotated) >= 1
    # Only the new key from now on: what was sealed under the old one must have moved.
    only_new = Keyring(rotated.primary_id, {rotated.primary_id: rotated.keys[rotated.primary_id]})
    later = WorkerOAuthService(env.context.sessions, only_new, CacheEpoch(), env.context.forwarder)
    assert await later.refresh(oauth["credential"]["id"], force=True) == "refreshed"
    assert stub.state.refreshes == 1


async def test_the_key_scopes_can_be_recorded_anew_and_the_change_is_audited(
    env: BrokerEnv, oauth: dict[str, Any]
) -> None:
    wider = [*SCOPES, "url:GET|/api/v1/courses/:course_id/assignments"]
    response = await env.http.patch(
        f"{V1}/credentials/bot", headers=env.admin(), json={"key_scopes": wider}
    )
    assert response.status_code == 200, response.text
    assert response.json()["oauth"]["key_scopes"] == sorted(wider)
    [event, *_] = await env.audit(action="credential.update")
    assert event["details"]["changes"]["key_scopes"] == {"old": SCOPES, "new": sorted(wider)}
    bad = await env.http.patch(
        f"{V1}/credentials/bot", headers=env.admin(), json={"key_scopes": ["not a scope"]}
    )
    assert bad.status_code == 422
    manual = await env.http.patch(
        f"{V1}/credentials/worker", headers=env.admin(), json={"key_scopes": SCOPES}
    )
    assert manual.status_code == 409


async def test_a_flood_of_forged_callbacks_is_cut_off_before_it_fills_the_audit_log(
    env: BrokerEnv, oauth: dict[str, Any]
) -> None:
    statuses = [
        (await env.http.get(f"{V1}/oauth/callback?code=x&state=forged-{n}")).status_code
        for n in range(30)
    ]
    assert statuses[:10] == [400] * 10
    assert set(statuses[12:]) == {429}
    refusals = await env.audit(action="credential.authorize", decision="deny", limit=100)
    assert 10 <= len(refusals) <= 12
