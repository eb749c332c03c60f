"""An OAuth worker credential as an admin runs it: two replicas of `broker serve --workers 2`.

Contract: docs/interfaces.md#oauth-worker-credentials. The developer key is the simulator's,
with scopes it enforces and four-second access tokens; the worker user authorises it once
in a real headless browser (Debian's chromium, when installed; CI installs it and sets
BROKER_TEST_REQUIRE_BROWSER) on the simulator's consent page. A canvasapi script then runs
across both replicas for several token lifetimes without one failed call, with one refresh
per expiry rather than one per process; disabling the key stops every call within a second
or so, and re-authorising brings them back.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from canvasapi import Canvas

from broker.sim.server import SimServer
from broker.sim.state import SimState
from tests.support.serve import free_port, init, serve, sqlite_env

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from broker.sim.credentials import DeveloperKey

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRE_BROWSER = bool(os.environ.get("BROKER_TEST_REQUIRE_BROWSER"))
SCOPES = ["url:GET|/api/v1/courses/:id"]
LIFETIME = 4.0  # seconds: refreshed two seconds before expiry (half its life)
V1 = "/broker/v1"


@pytest.fixture
def sim() -> Iterator[SimServer]:
    with SimServer(SimState()) as server:
        server.state.oauth_access_token_lifetime = LIFETIME
        yield server


def _consent_in_browser(url: str) -> str:
    """Open the authorisation URL in headless chromium, press Authorize; the page's text."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only with a browser

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(url)
            page.click("#authorize")
            page.wait_for_selector("h1")
            return page.inner_text("body")
        finally:
            browser.close()


def _consent_by_form(url: str, sim: SimServer) -> str:
    """The same consent without a browser: read the form, post it, follow the redirect."""
    with httpx.Client(timeout=10) as http:
        page = http.get(url)
        found = re.search(r'name="request_id" value="([^"]+)"', page.text)
        assert found is not None, page.text
        consent = http.post(
            f"{sim.base_url}/login/oauth2/accept",
            data={"request_id": found.group(1), "user_id": "1", "authorize": "1"},
        )
        assert consent.status_code == 302, consent.text
        return http.get(consent.headers["location"]).text


def _authorize(broker: str, admin: dict[str, str], sim: SimServer, *, browser: bool) -> str:
    started = httpx.post(f"{broker}{V1}/credentials/bot/authorize", headers=admin, timeout=10)
    assert started.status_code == 200, started.text
    url = started.json()["authorization_url"]
    return _consent_in_browser(url) if browser else _consent_by_form(url, sim)


def _provision(broker: str, admin: dict[str, str], sim: SimServer, key: DeveloperKey) -> Any:
    with httpx.Client(base_url=broker, headers=admin, timeout=10) as http:
        assert http.post(
            f"{V1}/upstreams", json={"name": "canvas", "base_url": sim.base_url}
        ).is_success
        created = http.post(
            f"{V1}/credentials",
            json={
                "upstream": "canvas",
                "name": "bot",
                "developer_key": {
                    "client_id": key.client_id,
                    "client_secret": key.secret,
                    "scopes": SCOPES,
                },
            },
        )
        assert created.status_code == 201, created.text
        client = http.post(
            f"{V1}/clients", json={"name": "job", "credential": "bot", "scopes": SCOPES}
        )
        assert client.status_code == 201, client.text
        return client.json()


def _secrets(sim: SimServer, key: DeveloperKey) -> list[str]:
    """The developer key's secret and every live access and refresh token Canvas issued."""
    tokens = sim.state.access_tokens.values()
    return [key.secret, *(t.value for t in tokens), *(t.refresh_token or "" for t in tokens)]


def _refreshes(broker: str, admin: dict[str, str]) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{broker}{V1}/audit",
        params={"action": "credential.refresh", "limit": 200},
        headers=admin,
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    events: list[dict[str, Any]] = answer.json()["events"]
    return events


def _script(scripts: list[Canvas], seconds: float) -> tuple[list[str], int]:
    """A canvasapi script's calls, alternating replicas, for ``seconds``: failures and count."""
    failures, calls = [], 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for canvas in scripts:
            try:
                assert canvas.get_course(1201).id == 1201
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                failures.append(repr(exc))
            calls += 1
        time.sleep(0.05)
    return failures, calls


def _after_disabling(
    brokers: list[str], token: str, seconds: float
) -> list[tuple[float, int, str]]:
    """(seconds since, status, error) of calls to every replica for ``seconds``."""
    disabled_at = time.monotonic()
    statuses = []
    while time.monotonic() - disabled_at < seconds:
        for url in brokers:
            answer = httpx.get(
                f"{url}/api/v1/courses/1201", headers={"Authorization": f"Bearer {token}"}
            )
            error = answer.json().get("error", "") if answer.status_code == 503 else ""
            statuses.append((time.monotonic() - disabled_at, answer.status_code, error))
        time.sleep(0.05)
    return statuses


def _resumes(scripts: list[Canvas], seconds: float) -> None:
    resumed = time.monotonic()
    for canvas in scripts:
        while True:
            try:
                assert canvas.get_course(1201).id == 1201
                break
            except Exception:
                if time.monotonic() - resumed > seconds:  # the epoch reaches B within a second
                    raise
                time.sleep(0.1)


@pytest.mark.filterwarnings("ignore:Canvas may respond unexpectedly:UserWarning")
def test_two_replicas_refresh_once_per_expiry_stop_with_the_key_and_resume(
    tmp_path: Path, sim: SimServer
) -> None:
    # Without chromium the consent form is posted directly, unless CI requires the browser.
    assert CHROMIUM or not REQUIRE_BROWSER, "BROKER_TEST_REQUIRE_BROWSER is set, chromium is not"
    port_a, port_b = free_port(), free_port()
    public = f"http://127.0.0.1:{port_a}"
    key = sim.state.add_developer_key(
        redirect_uris=[f"{public}{V1}/oauth/callback"], scopes=SCOPES, require_scopes=True
    )
    env = sqlite_env(tmp_path, BROKER_PUBLIC_URL=public)
    admin = init(env)
    replicas = [
        serve(env, port_a, tmp_path / "a.log", workers=2),
        serve(env, port_b, tmp_path / "b.log", workers=2),
    ]
    brokers = [public, f"http://127.0.0.1:{port_b}"]
    try:
        client = _provision(public, admin, sim, key)
        page = _authorize(public, admin, sim, browser=CHROMIUM is not None)
        assert "Authorised" in page
        for secret in _secrets(sim, key):
            assert secret not in page
        minted = httpx.post(
            f"{public}{V1}/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=(client["client_id"], client["client_secret"]),
            timeout=10,
        )
        token = minted.json()["access_token"]
        scripts = [Canvas(url, token) for url in brokers]

        # A canvasapi script across both replicas for three token lifetimes: no failure, and
        # one refresh per expiry (every two seconds), not one per process (four here).
        failures, calls = _script(scripts, 3 * LIFETIME)
        assert failures == [], failures
        assert calls > 20
        refreshed = key.refresh_count
        assert 4 <= refreshed <= 8, refreshed
        # The refreshers go on: read the events between two counts (Canvas counts a refresh
        # a moment before its event is committed).
        events = _refreshes(public, admin)
        assert refreshed - 1 <= len(events) <= key.refresh_count, (refreshed, len(events))
        times = sorted(datetime.fromisoformat(e["time"]) for e in events)
        gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]
        assert min(gaps) > 1, gaps  # each expiry renewed once, by one of the four processes

        # The admin disables the developer key in Canvas: every call stops.
        sim.state.disable_developer_key(key.client_id)
        statuses = _after_disabling(brokers, token, 4)
        assert all(status != 200 for _at, status, _error in statuses), statuses
        late = [(status, error) for at, status, error in statuses if at > 2]
        assert late, statuses
        assert set(late) == {(503, "credential_unavailable")}, late
        before = len(sim.state.received)
        refused = httpx.get(
            f"{brokers[1]}/api/v1/courses/1201", headers={"Authorization": f"Bearer {token}"}
        )
        assert refused.status_code == 503
        assert len(sim.state.received) == before  # refused before it was sent
        ready = httpx.get(f"{brokers[1]}/readyz").json()
        assert ready["unavailable_credentials"][0]["reason"] == "refresh_refused"

        # Enabled again and re-authorised: the calls resume on both replicas.
        sim.state.enable_developer_key(key.client_id)
        assert "Authorised" in _authorize(public, admin, sim, browser=False)
        _resumes(scripts, 5)
    finally:
        for replica in replicas:
            replica.terminate()
        for replica in replicas:
            replica.wait(timeout=30)
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    for secret in _secrets(sim, key):
        assert secret not in logs
