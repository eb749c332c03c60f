"""Helpers for driving the simulator's OAuth2 flow in tests."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    import httpx

    from broker.sim import SimState
    from broker.sim.credentials import DeveloperKey

REDIRECT = "https://app.example.test/callback"
SCOPES = [
    "url:GET|/api/v1/courses/:course_id/assignments",
    "url:GET|/api/v1/users/:user_id",
]


def add_key(state: SimState, *, require_scopes: bool = False) -> DeveloperKey:
    return state.add_developer_key(
        secret="s3cret-client",
        redirect_uris=[REDIRECT],
        scopes=SCOPES,
        require_scopes=require_scopes,
    )


def form_request_id(page: str) -> str:
    match = re.search(r'name="request_id" value="([^"]+)"', page)
    assert match is not None
    return match.group(1)


def redirect_query(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def authorize(
    client: httpx.AsyncClient,
    key: DeveloperKey,
    *,
    scope: str | None = None,
    state: str = "xyz",
    user_id: str = "1",
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Auth page, then the consent form's Authorize: the redirect's query."""
    params = {
        "client_id": key.client_id,
        "response_type": "code",
        "redirect_uri": REDIRECT,
        "state": state,
        **(extra or {}),
    }
    if scope is not None:
        params["scope"] = scope
    page = await client.get("/login/oauth2/auth", params=params)
    assert page.status_code == 200, page.text
    accepted = await client.post(
        "/login/oauth2/accept",
        data={"request_id": form_request_id(page.text), "user_id": user_id, "authorize": "1"},
    )
    return redirect_query(accepted)


async def exchange(
    client: httpx.AsyncClient, key: DeveloperKey, code: str, **extra: str
) -> httpx.Response:
    return await client.post(
        "/login/oauth2/token",
        data={
            "grant_type": "authorization_code",
            "client_id": key.client_id,
            "client_secret": key.secret,
            "redirect_uri": REDIRECT,
            "code": code,
            **extra,
        },
    )


async def refresh(
    client: httpx.AsyncClient, key: DeveloperKey, refresh_token: str
) -> httpx.Response:
    return await client.post(
        "/login/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "client_id": key.client_id,
            "client_secret": key.secret,
            "refresh_token": refresh_token,
        },
    )


async def tokens_for(
    client: httpx.AsyncClient, key: DeveloperKey, scope: str | None = None
) -> dict[str, object]:
    query = await authorize(client, key, scope=scope)
    response = await exchange(client, key, query["code"])
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def bearer(token: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
