"""The upstream client: one pooled keep-alive connection pool per process.

The proxy talks to Canvas through the small ``Forwarder`` interface so the HTTP client can be
chosen by measurement (aiohttp today: several times httpx's throughput as a pooled proxy
client on this class of machine). The forwarder sends exactly the target it is given (no
re-encoding), never follows redirects, never decompresses, and adds no headers of its own
besides ``Host``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiohttp
from yarl import URL

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence


class UpstreamError(Exception):
    """The upstream could not be reached (``timeout`` False) or did not answer in time."""

    def __init__(self, message: str, *, timeout: bool) -> None:
        super().__init__(message)
        self.timeout = timeout


class UpstreamResponse(Protocol):
    """A response whose body has not been read yet."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def body(self) -> AsyncIterator[bytes]:
        """Yield the body bytes exactly as received (still content-encoded)."""
        ...

    async def read(self) -> bytes:
        """Read the whole body."""
        ...

    def release(self) -> None:
        """Return the connection to the pool (or drop it if the body was not consumed)."""
        ...


class Forwarder(Protocol):
    """Sends one request upstream."""

    async def send(
        self, method: str, url: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> UpstreamResponse:
        """Send and return once the response head has arrived."""
        ...

    async def aclose(self) -> None:
        """Close the pool."""
        ...


@dataclass
class _AiohttpResponse:
    response: aiohttp.ClientResponse
    status: int
    headers: list[tuple[bytes, bytes]]
    read_timeout: bool = False

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamError(
                "upstream failed while sending the body", timeout=isinstance(exc, TimeoutError)
            ) from exc

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.body()])

    def release(self) -> None:
        self.response.release()


class AiohttpForwarder:
    """``Forwarder`` over one shared ``aiohttp.ClientSession``."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, pool_size: int) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily so it binds to the running event loop of the server.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size, keepalive_timeout=30),
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def send(
        self, method: str, url: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> UpstreamResponse:
        """Send one request; raise ``UpstreamError`` if Canvas cannot be reached in time."""
        outgoing = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
        try:
            response = await self._client().request(
                method,
                URL(url, encoded=True),
                headers=outgoing,
                data=body or None,
                allow_redirects=False,
            )
        except TimeoutError as exc:
            raise UpstreamError("upstream timed out", timeout=True) from exc
        except asyncio.CancelledError:
            raise
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"upstream unreachable: {type(exc).__name__}", timeout=False
            ) from exc
        except ValueError as exc:
            # aiohttp refuses to write a request it considers unsafe (e.g. a CR/LF in a header)
            raise UpstreamError("the request could not be sent upstream", timeout=False) from exc
        return _AiohttpResponse(
            response=response,
            status=response.status,
            headers=[(name.lower(), value) for name, value in response.raw_headers],
        )

    async def aclose(self) -> None:
        """Close the pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None
