"""The security console's sessions, CSRF and roles, over ASGI (docs/interfaces.md#security-console).

The browser's view of the same pages is tests/e2e/test_console_browser.py.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import select, update

from broker.api.console import CSP, UI
from broker.app import create_app
from broker.core.tokens import SecretKind, generate_secret
from broker.services.console import SIGN_IN_BURST
from broker.storage.models import ConsoleSession, utcnow
from tests.support.env import bearer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.support.env import BrokerEnv

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(page: httpx.Response) -> str:
    found = _CSRF.search(page.text)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


@pytest.fixture
async def browser(env: BrokerEnv) -> AsyncIterator[httpx.AsyncClient]:
    """A second HTTP client on the same app, with its own cookie jar (one "browser")."""
    app = create_app(context=env.context)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://broker.test"
    ) as client:
        yield client


async def sign_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    form = await client.get(f"{UI}/sign-in")
    return await client.post(
        f"{UI}/sign-in", data={"key": key, "csrf_token": csrf_of(form), "next": f"{UI}/audit"}
    )


async def page_csrf(client: httpx.AsyncClient) -> str:
    page = await client.get(f"{UI}/integrity")
    assert page.status_code == 200, page.text
    return csrf_of(page)


async def live_token(env: BrokerEnv, name: str = "job") -> tuple[str, str, str]:
    """A client with one live token: ``(client_id, token value, token id)``."""
    client_id, secret = await env.client(name)
    token = await env.token(client_id, secret)
    listed = await env.http.get(
        "/broker/v1/tokens", params={"client": client_id}, headers=env.admin()
    )
    [record] = listed.json()
    return client_id, token, record["id"]


async def token_live(env: BrokerEnv, token_id: str) -> bool:
    listed = await env.http.get("/broker/v1/tokens", headers=env.admin())
    return token_id in {t["id"] for t in listed.json()}


async def stored_sessions(env: BrokerEnv) -> list[ConsoleSession]:
    async with env.context.sessions() as session:
        return list(await session.scalars(select(ConsoleSession)))


async def test_signing_in_opens_a_session_whose_id_is_stored_only_as_a_keyed_hash(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    response = await sign_in(browser, env.admin_key)

    assert response.status_code == 303
    assert response.headers["location"] == f"{UI}/audit"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert f"Path={UI}" in cookie
    assert "Secure" not in cookie  # plain HTTP, no https public URL
    value = browser.cookies["broker_console"]
    [stored] = await stored_sessions(env)
    assert stored.id_hash != value
    assert stored.id_hash == env.context.keyring.hash_secret(value)
    [event] = await env.audit(action="console.sign_in")
    assert event["decision"] == "allow"
    assert event["actor_key_id"] == stored.admin_key_id
    assert env.admin_key not in str(event)
    assert value not in str(event)


async def test_signing_in_again_ends_the_browsers_previous_session(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    await sign_in(browser, env.auditor_key)
    first = browser.cookies["broker_console"]
    await sign_in(browser, env.admin_key)

    [stored] = await stored_sessions(env)
    assert browser.cookies["broker_console"] != first
    assert stored.id_hash == env.context.keyring.hash_secret(browser.cookies["broker_console"])


async def test_the_cookie_is_secure_over_https_or_with_an_https_public_url(
    env: BrokerEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(context=env.context)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://broker.test"
    ) as client:
        assert "Secure" in (await sign_in(client, env.admin_key)).headers["set-cookie"]
    monkeypatch.setattr(env.context.settings, "public_url", "https://broker.example.edu")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://broker.test"
    ) as client:
        assert "Secure" in (await sign_in(client, env.admin_key)).headers["set-cookie"]


async def test_every_page_has_the_strict_content_security_policy(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    assert (await browser.get(f"{UI}/sign-in")).headers["content-security-policy"] == CSP
    await sign_in(browser, env.auditor_key)
    for path in ("/audit", "/integrity", "/clients", "/credentials", "/activity"):
        page = await browser.get(f"{UI}{path}")
        assert page.status_code == 200, path
        assert page.headers["content-security-policy"] == CSP
        assert page.headers["x-frame-options"] == "DENY"
        assert "<script>" not in page.text
        assert " style=" not in page.text
    asset = await browser.get(f"{UI}/static/console.js")
    assert asset.status_code == 200
    assert asset.headers["content-security-policy"] == CSP


async def test_a_page_that_does_not_exist_is_the_consoles_own_404(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    await sign_in(browser, env.auditor_key)
    page = await browser.get(f"{UI}/no/such/page")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert "no such page" in page.text
    # The assets are still served, and a missing one is a plain 404.
    assert (await browser.get(f"{UI}/static/console.css")).status_code == 200
    assert (await browser.get(f"{UI}/static/nothing.js")).status_code == 404


async def test_without_a_session_every_page_sends_the_browser_to_sign_in(
    browser: httpx.AsyncClient,
) -> None:
    response = await browser.get(f"{UI}/clients?x=1")
    assert response.status_code == 303
    assert response.headers["location"] == f"{UI}/sign-in?next=%2Fbroker%2Fui%2Fclients%3Fx%3D1"
    posted = await browser.post(f"{UI}/actions", data={"action": "revoke_token", "target": "t"})
    assert posted.status_code == 303
    bare = await browser.get(UI)
    assert (bare.status_code, bare.headers["location"]) == (303, f"{UI}/")
    home = await browser.get(f"{UI}/")
    assert home.headers["location"].startswith(f"{UI}/sign-in?next=")


async def test_a_wrong_key_is_refused_and_audited_without_the_key(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    guessed = generate_secret(SecretKind.ADMIN_KEY)
    response = await sign_in(browser, guessed)
    malformed = await sign_in(browser, "not-a-key")

    assert response.status_code == 401
    assert malformed.status_code == 401
    assert "broker_console" not in browser.cookies
    events = await env.audit(action="console.sign_in", decision="deny")
    assert {e["reason"] for e in events} == {"unknown_admin_key", "malformed_admin_key"}
    assert all(guessed not in str(e) for e in events)


async def test_the_sign_in_form_is_refused_without_its_own_csrf_token(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    response = await browser.post(f"{UI}/sign-in", data={"key": env.admin_key})
    assert response.status_code == 403
    assert "broker_console" not in browser.cookies
    [event] = await env.audit(action="console.csrf")
    assert event["reason"] == "csrf_token_invalid"


async def test_sign_ins_are_rate_limited_per_source(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    statuses = [
        (await sign_in(browser, generate_secret(SecretKind.ADMIN_KEY))).status_code
        for _ in range(int(SIGN_IN_BURST) + 1)
    ]
    assert statuses[:-1] == [401] * int(SIGN_IN_BURST)
    limited = await sign_in(browser, env.admin_key)  # even the right key, for now
    assert statuses[-1] == 429
    assert limited.status_code == 429
    assert "retry-after" in limited.headers
    await env.context.audit_writer.flush()
    events = await env.audit(action="console.sign_in", reason="sign_in_rate_limited")
    assert len(events) == 2


async def test_a_form_without_the_sessions_csrf_token_changes_nothing(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    _client_id, _token, token_id = await live_token(env)
    await sign_in(browser, env.admin_key)

    missing = await browser.post(
        f"{UI}/actions", data={"action": "revoke_token", "target": token_id}
    )
    wrong = await browser.post(
        f"{UI}/actions",
        data={"action": "revoke_token", "target": token_id, "csrf_token": "0" * 64},
    )

    assert missing.status_code == 403
    assert wrong.status_code == 403
    assert await token_live(env, token_id)
    events = await env.audit(action="console.csrf")
    assert len(events) == 2
    assert all(e["path"] == f"{UI}/actions" for e in events)


async def test_an_auditor_session_can_change_nothing(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    client_id, _token, token_id = await live_token(env)
    await sign_in(browser, env.auditor_key)
    csrf = await page_csrf(browser)
    page = await browser.get(f"{UI}/clients/{client_id}")
    assert "confirm?action=revoke_token" not in page.text

    for action, target in (("revoke_token", token_id), ("disable_client", client_id)):
        response = await browser.post(
            f"{UI}/actions", data={"action": action, "target": target, "csrf_token": csrf}
        )
        assert response.status_code == 403
    assert await token_live(env, token_id)
    client = await env.http.get(f"/broker/v1/clients/{client_id}", headers=env.admin())
    assert client.json()["enabled"] is True
    refused = await env.audit(action="admin_key.authorize", reason="read_only_key")
    assert len(refused) == 2


async def test_an_admin_revokes_a_token_through_the_management_service(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    client_id, token, token_id = await live_token(env)
    await sign_in(browser, env.admin_key)
    confirm = await browser.get(
        f"{UI}/confirm", params={"action": "revoke_token", "target": token_id}
    )
    assert confirm.status_code == 200

    done = await browser.post(
        f"{UI}/actions",
        data={"action": "revoke_token", "target": token_id, "csrf_token": csrf_of(confirm)},
    )

    assert done.status_code == 200, done.text
    assert not await token_live(env, token_id)
    proxied = await env.http.get("/api/v1/courses/1201", headers=bearer(token))
    assert proxied.status_code == 401
    [event] = await env.audit(action="token.revoke", kind="admin")
    [signed] = await stored_sessions(env)
    assert event["actor_key_id"] == signed.admin_key_id
    assert event["token_id"] == token_id
    assert event["client_id"] == client_id
    assert event["path"] == f"{UI}/actions"


async def test_an_admin_disables_a_client_and_a_credential(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    client_id, _token, token_id = await live_token(env)
    await sign_in(browser, env.admin_key)
    csrf = await page_csrf(browser)
    for action, target in (("disable_client", client_id), ("disable_credential", "worker")):
        response = await browser.post(
            f"{UI}/actions", data={"action": action, "target": target, "csrf_token": csrf}
        )
        assert response.status_code == 200, response.text
    assert not await token_live(env, token_id)
    assert (await env.audit(action="client.disable"))[0]["details"]["changes"]
    assert len(await env.audit(action="credential.disable")) == 1


async def _age_sessions(env: BrokerEnv, **columns: Any) -> None:
    async with env.context.sessions.begin() as session:
        await session.execute(update(ConsoleSession).values(**columns))


async def test_nul_in_a_parameter_or_a_form_is_refused(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    await sign_in(browser, env.admin_key)
    assert (await browser.get(f"{UI}/audit", params={"client": "a\x00b"})).status_code == 400
    posted = await browser.post(
        f"{UI}/actions",
        data={"action": "revoke_token", "target": "t\x00", "csrf_token": await page_csrf(browser)},
    )
    assert posted.status_code == 400


async def test_an_idle_session_ends(env: BrokerEnv, browser: httpx.AsyncClient) -> None:
    await sign_in(browser, env.auditor_key)
    idle = env.context.settings.console_idle_timeout
    await _age_sessions(env, last_seen_at=utcnow() - timedelta(seconds=idle + 1))

    response = await browser.get(f"{UI}/audit")

    assert response.status_code == 303
    assert response.headers["location"].startswith(f"{UI}/sign-in")
    assert await stored_sessions(env) == []


async def test_a_session_ends_at_its_lifetime_however_busy(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    await sign_in(browser, env.auditor_key)
    await _age_sessions(env, expires_at=utcnow() - timedelta(seconds=1))
    assert (await browser.get(f"{UI}/audit")).status_code == 303


async def test_revoking_the_admin_key_ends_its_sessions(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    await sign_in(browser, env.auditor_key)
    [signed] = await stored_sessions(env)
    revoked = await env.http.post(
        f"/broker/v1/admin-keys/{signed.admin_key_id}/revoke", headers=env.admin()
    )
    assert revoked.status_code == 200
    assert (await browser.get(f"{UI}/audit")).status_code == 303
    assert await stored_sessions(env) == []


async def test_signing_out_ends_the_session_and_is_audited(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    await sign_in(browser, env.auditor_key)
    response = await browser.post(f"{UI}/sign-out", data={"csrf_token": await page_csrf(browser)})
    assert response.status_code == 303
    assert await stored_sessions(env) == []
    assert (await browser.get(f"{UI}/audit")).status_code == 303
    assert len(await env.audit(action="console.sign_out")) == 1


async def test_the_log_view_filters_merges_calls_and_links_every_id(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    client_id, token, token_id = await live_token(env)
    assert (await env.http.get("/api/v1/courses/1201", headers=bearer(token))).status_code == 200
    refused = await env.http.get("/api/v1/accounts/1", headers=bearer(token))
    await sign_in(browser, env.auditor_key)

    page = await browser.get(f"{UI}/audit", params={"kind": "proxy", "client": "job"})

    assert page.status_code == 200
    rows = page.text.count('<tr class="decision-')
    assert rows == 2  # the allowed call (pending + completion) and the refusal
    assert 'class="merged"' in page.text
    assert f'href="{UI}/audit?client={client_id}"' in page.text
    assert f'href="{UI}/clients/{client_id}"' in page.text
    assert f'href="{UI}/audit?token={token_id}"' in page.text
    assert f'href="{UI}/audit?request_id={refused.headers["x-request-id"]}"' in page.text
    window = {"kind": "proxy", "since": "2000-01-01T00:00", "until": "2000-01-02"}
    assert 'class="empty"' in (await browser.get(f"{UI}/audit", params=window)).text  # UTC
    bad = await browser.get(f"{UI}/audit", params={"decision": "maybe"})
    assert bad.status_code == 400
    assert 'id="problem"' in bad.text
    unknown = await browser.get(f"{UI}/audit", params={"client": "nobody"})
    assert unknown.status_code == 404


async def test_an_events_page_shows_its_place_in_the_chain(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    _client_id, token, _token_id = await live_token(env)
    await env.http.get("/api/v1/courses/1201", headers=bearer(token))
    [call] = await env.audit(kind="proxy")
    await sign_in(browser, env.auditor_key)

    page = await browser.get(f"{UI}/audit/events/{call['seq']}")

    assert page.status_code == 200
    assert '<span class="ok">links</span>' in page.text
    assert f"/audit/events/{call['completion_seq']}" in page.text
    assert (await browser.get(f"{UI}/audit/events/999999")).status_code == 404


async def test_export_of_the_selection_is_the_audit_apis_and_audited(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    _client_id, token, _token_id = await live_token(env)
    await env.http.get("/api/v1/courses/1201", headers=bearer(token))
    await sign_in(browser, env.auditor_key)

    csv_export = await browser.get(f"{UI}/audit/export", params={"kind": "proxy", "format": "csv"})
    ndjson = await browser.get(f"{UI}/audit/export", params={"kind": "proxy"})

    assert csv_export.status_code == 200
    assert csv_export.text.splitlines()[0].startswith("seq,")
    assert len(csv_export.text.splitlines()) == 2
    assert ndjson.headers["content-type"] == "application/x-ndjson"
    [exported] = [line for line in ndjson.text.splitlines() if line]
    assert '"kind":"proxy"' in exported
    events = await env.audit(action="audit.export")
    assert [e["details"]["filters"] for e in events] == [{"kind": "proxy"}] * 2


async def test_verify_now_records_its_finding_and_the_page_shows_it(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    await sign_in(browser, env.auditor_key)
    before = await browser.get(f"{UI}/integrity")
    assert "Not verified from the console yet" in before.text

    response = await browser.post(f"{UI}/integrity/verify", data={"csrf_token": csrf_of(before)})

    assert response.status_code == 303
    after = await browser.get(f"{UI}/integrity")
    assert "The chain verified" in after.text
    assert 'id="head"' in after.text
    [event] = await env.audit(action="console.verify")
    assert event["details"]["ok"] is True


async def test_the_tail_returns_only_newer_calls(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    _client_id, token, _token_id = await live_token(env)
    await sign_in(browser, env.auditor_key)
    newest = (await env.audit())[0]["seq"]
    await env.http.get("/api/v1/courses/1201", headers=bearer(token))

    tail = await browser.get(f"{UI}/audit/tail.json", params={"after": newest, "kind": "proxy"})

    body = tail.json()
    assert body["rows"].count("<tr") == 1
    assert body["last_seq"] > newest
    again = await browser.get(
        f"{UI}/audit/tail.json", params={"after": body["last_seq"], "kind": "proxy"}
    )
    assert again.json()["rows"].strip() == ""


async def test_activity_counts_calls_refusals_and_canvas_cost_per_client(
    env: BrokerEnv, browser: httpx.AsyncClient
) -> None:
    client_id, token, _token_id = await live_token(env)
    await env.http.get("/api/v1/courses/1201", headers=bearer(token))
    await env.http.get("/api/v1/accounts/1", headers=bearer(token))
    [refusal] = await env.audit(kind="proxy", decision="deny")
    refused_reason = refusal["reason"]
    await sign_in(browser, env.auditor_key)

    data = (await browser.get(f"{UI}/activity.json", params={"hours": 1})).json()

    [job] = [c for c in data["clients"] if c["client_id"] == client_id]
    assert job["calls"] == 2
    assert job["refused"] == 1
    assert job["canvas_cost"] > 0
    assert sum(data["calls_per_client"]["job"]) == 2
    assert sum(data["canvas_cost_per_client"]["job"]) == job["canvas_cost"]
    [(reason, series)] = data["refusals_per_reason"].items()
    assert reason == refused_reason
    assert sum(series) == 1
    assert len(data["buckets"]) == 48
