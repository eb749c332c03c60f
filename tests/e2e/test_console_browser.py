"""The security console in a real browser with the network cut.

Contract: docs/interfaces.md#security-console.

One headless chromium (Debian's, driven by Playwright) and one live broker serve the whole
module; each test opens its own browser context (its own cookies). Every request to anything
but the loopback is aborted, and a Content-Security-Policy violation fails the test. The
tests take the screenshots the README shows (docs/images/console-*.png): into a temporary
directory, or into the directory BROKER_TEST_SCREENSHOTS names, which is how they are
refreshed (``BROKER_TEST_SCREENSHOTS=docs/images ./dev test tests/e2e/test_console_browser.py``).
Skipped without chromium, unless BROKER_TEST_REQUIRE_BROWSER is set (as CI sets it).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import create_engine, update

from broker.api.console import UI
from broker.storage.models import ConsoleSession, utcnow
from tests.conftest import _sync_url, clean_database
from tests.e2e.conftest import serve_live_broker
from tests.support.env import bearer

if TYPE_CHECKING:
    from collections.abc import Iterator

    from playwright.sync_api import Browser, ConsoleMessage, Page, Route

    from broker.sim.server import SimServer
    from tests.e2e.conftest import LiveBroker

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
TIMEOUT_MS = 20_000
IMAGES = Path(
    os.environ.get("BROKER_TEST_SCREENSHOTS")
    or Path(tempfile.gettempdir()) / f"broker-console-screenshots-{os.getuid()}"
)
COURSE = "/api/v1/courses/1201"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("BROKER_TEST_REQUIRE_BROWSER"),
    reason="no chromium (apt-get install chromium); CI sets BROKER_TEST_REQUIRE_BROWSER",
)


class Console:
    """The live broker, its keys, and what the log holds for the tests to find."""

    def __init__(self, broker: LiveBroker, database_url: str) -> None:
        self.broker = broker
        self.database_url = database_url
        created = broker.http.post(
            "/broker/v1/admin-keys", json={"name": "analyst", "role": "auditor"}
        )
        assert created.status_code == 201, created.text
        self.auditor_key: str = created.json()["key"]
        self.caller = broker.caller(
            ["url:GET|/api/v1/courses/:id"], {}, description="nightly grade sync"
        )
        ok = httpx.get(f"{broker.url}{COURSE}", headers=bearer(self.caller.token))
        assert ok.status_code == 200, ok.text
        self.allowed_request_id = ok.headers["x-request-id"]
        for _ in range(3):
            refused = httpx.get(f"{broker.url}/api/v1/accounts/1", headers=bearer("cbt_nope"))
            assert refused.status_code == 401

    @property
    def url(self) -> str:
        return self.broker.url

    def age_sessions(self) -> None:
        """Make every console session idle past its timeout (as if the analyst left)."""
        engine = create_engine(_sync_url(self.database_url))
        idle = self.broker.settings.console_idle_timeout
        with engine.begin() as connection:
            connection.execute(
                update(ConsoleSession).values(last_seen_at=utcnow() - timedelta(seconds=idle + 1))
            )
        engine.dispose()


@pytest.fixture(scope="module")
def console(
    template_db: str, sim_server: SimServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Console]:
    database_url = clean_database(template_db, tmp_path_factory.mktemp("console"))
    with serve_live_broker(database_url, sim_server) as broker:
        yield Console(broker, database_url)


@pytest.fixture(scope="module")
def browser(console: Console) -> Iterator[Browser]:
    # The broker's setup runs its own event loops (asyncio.run): before Playwright's.
    assert CHROMIUM, "BROKER_TEST_REQUIRE_BROWSER is set but chromium is not installed"
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only with a browser

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh context (no cookies), offline but for the loopback, failing on CSP reports."""
    context = browser.new_context(viewport={"width": 1360, "height": 860})
    blocked: list[str] = []
    violations: list[str] = []

    def loopback_only(route: Route) -> None:
        if urlsplit(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort("internetdisconnected")

    def console_message(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            violations.append(message.text)

    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    opened.route("**/*", loopback_only)
    opened.on("console", console_message)
    yield opened
    context.close()
    assert blocked == []
    assert violations == []


def sign_in(page: Page, console: Console, key: str, path: str = "/audit") -> None:
    page.goto(f"{console.url}{UI}{path}")
    page.fill("#key", key)
    page.click("#sign-in")
    page.wait_for_url(re.compile(re.escape(f"{UI}{path}")))


def shot(page: Page, name: str) -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMAGES / f"console-{name}.png"))


def test_an_analyst_filters_and_follows_a_request_id_to_its_canvas_context(
    page: Page, console: Console
) -> None:
    sign_in(page, console, console.auditor_key)
    shot(page, "audit")
    page.select_option("select[name=kind]", "proxy")
    page.fill("input[name=client]", console.caller.client_id)
    page.click("#apply-filters")
    page.wait_for_url(re.compile("kind=proxy"))
    assert page.locator("#events tbody tr").count() == 1

    page.click(f"a[href*='request_id={console.allowed_request_id}']")
    page.wait_for_url(re.compile("request_id="))
    page.click("#events tbody tr a.seq")
    page.wait_for_selector("#chain-seq")

    context_id = page.inner_text("#canvas-context-id").strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", context_id)
    assert page.locator(".chain .ok").count() == 1
    shot(page, "event")


def test_verify_now_shows_the_finding_and_the_signed_head(page: Page, console: Console) -> None:
    sign_in(page, console, console.auditor_key, "/integrity")
    page.click("#verify-now")
    page.wait_for_selector("#last-verify.ok")
    assert "The chain verified" in page.inner_text("#last-verify")
    assert re.fullmatch(r"\d+:[0-9a-f]{64}", page.input_value("#head"))
    shot(page, "integrity")


def test_an_admin_revokes_a_clients_tokens_after_confirming(page: Page, console: Console) -> None:
    extra = console.broker.caller(["url:GET|/api/v1/courses/:id"], {})
    sign_in(page, console, console.broker.admin_key, "/clients")
    shot(page, "clients")
    page.goto(f"{console.url}{UI}/clients/{extra.client_id}")
    page.click("#revoke-client-tokens")
    page.wait_for_selector("#confirm")
    page.click("#confirm")
    page.wait_for_selector("#done")

    assert "1 live token(s) revoked" in page.inner_text("#done")
    refused = httpx.get(f"{console.url}{COURSE}", headers=bearer(extra.token))
    assert refused.status_code == 401
    events = console.broker.http.get(
        "/broker/v1/audit", params={"action": "client.revoke_tokens", "client": extra.client_id}
    ).json()["events"]
    assert len(events) == 1


def test_an_auditor_is_offered_no_action_and_refused_one(page: Page, console: Console) -> None:
    sign_in(page, console, console.auditor_key, "/clients")
    assert page.locator("a[href*='confirm?action=']").count() == 0
    page.goto(f"{console.url}{UI}/confirm?action=revoke_token&target={console.caller.token_id}")
    assert "auditor session" in page.inner_text("#problem")

    csrf = page.get_attribute("input[name=csrf_token]", "value")
    response = page.context.request.post(
        f"{console.url}{UI}/actions",
        form={
            "action": "revoke_token",
            "target": console.caller.token_id,
            "csrf_token": csrf or "",
        },
    )

    assert response.status == 403
    live = httpx.get(f"{console.url}{COURSE}", headers=bearer(console.caller.token))
    assert live.status_code == 200


def test_a_form_with_another_csrf_token_changes_nothing(page: Page, console: Console) -> None:
    sign_in(page, console, console.broker.admin_key, "/clients")
    page.goto(f"{console.url}{UI}/confirm?action=revoke_token&target={console.caller.token_id}")
    page.eval_on_selector("form.confirm input[name=csrf_token]", "e => { e.value = 'forged'; }")
    page.click("#confirm")
    page.wait_for_selector("#problem")

    assert "CSRF" in page.inner_text("#problem")
    live = httpx.get(f"{console.url}{COURSE}", headers=bearer(console.caller.token))
    assert live.status_code == 200


def test_an_idle_session_sends_the_browser_back_to_sign_in(page: Page, console: Console) -> None:
    sign_in(page, console, console.auditor_key, "/integrity")
    console.age_sessions()
    page.goto(f"{console.url}{UI}/credentials")
    page.wait_for_selector("#key")
    assert "/sign-in" in page.url
    page.fill("#key", console.auditor_key)
    page.click("#sign-in")
    page.wait_for_selector("#credentials")  # back where the analyst was going


def test_activity_charts_and_the_live_tail_draw_in_the_browser(
    page: Page, console: Console
) -> None:
    sign_in(page, console, console.auditor_key, "/activity?hours=1")
    page.wait_for_selector("#activity[data-drawn=true]")
    assert page.locator("#chart-calls svg rect.bar").count() >= 1
    assert page.locator("#chart-refusals svg rect.bar").count() >= 1
    assert page.locator("#chart-cost svg rect.bar").count() >= 1
    assert page.locator("#per-client tbody tr").count() >= 1
    shot(page, "activity")
    page.click("#chart-refusals a.bar-link")  # when refusals spiked: the calls behind a bar
    page.wait_for_url(re.compile("decision=deny"))
    assert page.locator("#events tbody tr.decision-deny").count() >= 1
    assert page.locator("#events tbody tr.decision-allow").count() == 0

    page.goto(f"{console.url}{UI}/audit?kind=proxy")
    page.check("#live-tail")
    fresh = httpx.get(f"{console.url}{COURSE}", headers=bearer(console.caller.token))
    assert fresh.status_code == 200
    row = page.locator(f"#events tbody tr.fresh:has(a[href*='{fresh.headers['x-request-id']}'])")
    row.wait_for()
    assert row.count() == 1
