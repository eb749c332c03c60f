"""The signing keys of workload identity issuers: OIDC discovery, then the JWKS, cached.

OpenID Connect Discovery 1.0 §4: ``{issuer}/.well-known/openid-configuration`` names the
issuer (which must equal the configured one exactly, §4.3) and its ``jwks_uri``. The key set
is cached per process for the ``max-age`` its response gives (RFC 9111 §5.2.2.1; at least
``MIN_FRESH``, at most ``MAX_FRESH``, ``DEFAULT_FRESH`` without one). A token naming a key the
cache lacks (the issuer rotated its keys) fetches the set again, at most once a
``REFETCH_INTERVAL`` per issuer, so forged key ids cannot make the broker hammer an issuer.
When the issuer cannot be reached, keys fetched within ``MAX_STALE`` are still used; with
nothing cached the exchange is refused (fail closed). Every fetch is bounded by
``BROKER_WORKLOAD_FETCH_TIMEOUT`` and never follows redirects
(docs/interfaces.md#workload-identity-token-exchange).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import httpx

from broker.core.workload import PolicyError, check_issuer_url, has_key, signing_key_set

if TYPE_CHECKING:
    from collections.abc import Callable

    from broker.config import Settings

logger = logging.getLogger(__name__)
MIN_FRESH: Final = 60.0
MAX_FRESH: Final = 24 * 3600.0
DEFAULT_FRESH: Final = 300.0
MAX_STALE: Final = 24 * 3600.0
REFETCH_INTERVAL: Final = 60.0
FAILURE_BACKOFF: Final = 5.0  # seconds a failed fetch is not retried (requests fail fast)
MAX_DOCUMENT: Final = 512 * 1024
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d{1,9})\"?\s*(?:,|$)", re.IGNORECASE)


class IssuerUnavailableError(Exception):
    """The issuer's discovery document or keys could not be read; the message says why."""


@dataclass
class _Entry:
    jwks: dict[str, list[dict[str, Any]]]
    fetched_at: float
    fresh_until: float
    attempted_at: float


def freshness(cache_control: str | None) -> float:
    """Seconds a key set stays fresh, from its ``Cache-Control`` (bounded)."""
    if cache_control is None:
        return DEFAULT_FRESH
    if re.search(r"\b(no-store|no-cache)\b", cache_control, re.IGNORECASE):
        return MIN_FRESH
    found = _MAX_AGE.search(cache_control)
    if found is None:
        return DEFAULT_FRESH
    return min(max(float(found.group(1)), MIN_FRESH), MAX_FRESH)


class IssuerKeys:
    """Per-process cache of issuers' key sets, fetched with a bounded HTTP client."""

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._allow_http = settings.workload_allow_loopback_http
        self._timeout = settings.workload_fetch_timeout
        self._transport = transport
        self.clock = clock  # replaceable: tests move time on
        self._http: httpx.AsyncClient | None = None
        self._entries: dict[str, _Entry] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout),
                follow_redirects=False,
                transport=self._transport,
                headers={"Accept": "application/json"},
            )
        return self._http

    async def aclose(self) -> None:
        """Close the HTTP client."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def check(self, issuer: str) -> int:
        """Fetch the issuer's discovery document and keys now (when an admin saves a policy).

        Returns how many signing keys it publishes; raises ``IssuerUnavailableError``.
        """
        lock = self._locks.setdefault(issuer, asyncio.Lock())
        async with lock:
            entry = await self._refresh(issuer, retry_now=True)
        return len(entry.jwks["keys"])

    async def keys_for(self, issuer: str, kid: str | None) -> dict[str, list[dict[str, Any]]]:
        """The issuer's key set, holding ``kid`` if the issuer publishes it.

        Fresh keys come from the cache; stale ones, or a set without ``kid``, are fetched
        again (the latter at most once a ``REFETCH_INTERVAL``). Raises
        ``IssuerUnavailableError`` only when nothing usable is cached.
        """
        entry = self._entries.get(issuer)
        now = self.clock()
        if entry is not None and now < entry.fresh_until and has_key(entry.jwks, kid):
            return entry.jwks
        if (
            entry is not None
            and now < entry.fresh_until
            and (now - entry.attempted_at < REFETCH_INTERVAL)
        ):
            return entry.jwks  # an unknown key, refetched a moment ago: it does not verify
        lock = self._locks.setdefault(issuer, asyncio.Lock())
        async with lock:
            current = self._entries.get(issuer)
            if current is not None and current is not entry:
                return current.jwks  # another request fetched it meanwhile
            try:
                return (await self._refresh(issuer)).jwks
            except IssuerUnavailableError:
                if entry is not None and now - entry.fetched_at < MAX_STALE:
                    logger.warning("issuer %s unreachable; using keys cached earlier", issuer)
                    return entry.jwks
                raise

    async def _refresh(self, issuer: str, *, retry_now: bool = False) -> _Entry:
        now = self.clock()
        failed = self._failed.get(issuer)
        if not retry_now and failed is not None and now - failed[0] < FAILURE_BACKOFF:
            raise IssuerUnavailableError(failed[1])
        entry = self._entries.get(issuer)
        if entry is not None:
            entry.attempted_at = now
        try:
            async with asyncio.timeout(self._timeout * 2):
                jwks, fresh = await self._fetch(issuer)
        except IssuerUnavailableError as exc:
            self._failed[issuer] = (now, str(exc))
            raise
        except TimeoutError as exc:
            message = f"the issuer {issuer} did not answer within {self._timeout * 2:g} s"
            self._failed[issuer] = (now, message)
            raise IssuerUnavailableError(message) from exc
        self._failed.pop(issuer, None)
        entry = _Entry(jwks=jwks, fetched_at=now, fresh_until=now + fresh, attempted_at=now)
        self._entries[issuer] = entry
        return entry

    async def _fetch(self, issuer: str) -> tuple[dict[str, list[dict[str, Any]]], float]:
        # OIDC Discovery §4.1: the path is appended to the issuer with its trailing / removed.
        document, _ = await self._get_json(
            issuer.rstrip("/") + "/.well-known/openid-configuration", issuer
        )
        if document.get("issuer") != issuer:
            raise IssuerUnavailableError(
                f"the discovery document of {issuer} names another issuer "
                f"({document.get('issuer')!r})"
            )
        try:
            jwks_uri = check_issuer_url(
                document.get("jwks_uri"), allow_loopback_http=self._allow_http
            )
        except PolicyError as exc:
            raise IssuerUnavailableError(
                f"the discovery document of {issuer} has no usable jwks_uri: {exc}"
            ) from exc
        keys, cache_control = await self._get_json(jwks_uri, issuer)
        try:
            jwks = signing_key_set(keys)
        except TypeError as exc:
            raise IssuerUnavailableError(f"the key set of {issuer} is unusable: {exc}") from exc
        if not jwks["keys"]:
            raise IssuerUnavailableError(f"the issuer {issuer} publishes no signing keys")
        return jwks, freshness(cache_control)

    async def _get_json(self, url: str, issuer: str) -> tuple[dict[str, Any], str | None]:
        try:
            async with self._client().stream("GET", url) as response:
                if response.status_code != 200:  # noqa: PLR2004
                    raise IssuerUnavailableError(
                        f"the issuer {issuer} answered {response.status_code} for {url}"
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT:
                        raise IssuerUnavailableError(f"{url} is larger than {MAX_DOCUMENT} bytes")
                cache_control = response.headers.get("cache-control")
        except httpx.HTTPError as exc:
            raise IssuerUnavailableError(
                f"the issuer {issuer} could not be reached ({type(exc).__name__})"
            ) from exc
        try:
            value = json.loads(body)
        except ValueError as exc:
            raise IssuerUnavailableError(f"{url} is not JSON") from exc
        if not isinstance(value, dict):
            raise IssuerUnavailableError(f"{url} is not a JSON object")
        return value, cache_control
