"""The OpenAPI page works offline and lets an admin in (docs/interfaces.md#management-api).

A real headless browser (Debian's ``chromium``, driven by Playwright) loads
``/broker/v1/docs`` from a live broker with every request to anything but the loopback
aborted, then checks that the operations render and that "Authorize" offers the admin key.
Skipped without chromium, unless BROKER_TEST_REQUIRE_BROWSER is set (as CI sets it).
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Route

    from tests.e2e.conftest import LiveBroker

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
# Bounds every wait: the page is local, so seconds are plenty.
TIMEOUT_MS = 20_000

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("BROKER_TEST_REQUIRE_BROWSER"),
    reason="no chromium (apt-get install chromium); CI sets BROKER_TEST_REQUIRE_BROWSER",
)


def test_docs_page_renders_the_operations_with_the_network_off(live_broker: LiveBroker) -> None:
    assert CHROMIUM, "BROKER_TEST_REQUIRE_BROWSER is set but chromium is not installed"
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only with a browser

    requested: list[str] = []
    blocked: list[str] = []

    def loopback_only(route: Route) -> None:
        url = route.request.url
        requested.append(url)
        if urlsplit(url).hostname in LOOPBACK:
            route.continue_()
        else:
            blocked.append(url)
            route.abort("internetdisconnected")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.route("**/*", loopback_only)
            page.goto(f"{live_broker.url}/broker/v1/docs")
            page.wait_for_selector(".opblock-summary-path")
            paths = page.locator(".opblock-summary-path").all_inner_texts()
            page.locator("button.authorize").first.click()
            page.wait_for_selector(".auth-container")
            dialog = page.locator(".auth-container").first.inner_text()
        finally:
            browser.close()

    assert blocked == []
    assert any(url.endswith("/broker/v1/docs/assets/swagger-ui-bundle.js") for url in requested)
    assert {"/broker/v1/credentials", "/broker/v1/clients", "/broker/v1/audit"} <= {
        p.replace("\u200b", "") for p in paths
    }
    assert "adminKey" in dialog
