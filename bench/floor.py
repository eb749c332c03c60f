"""The floor: the least a Python proxy does, on the broker's own server and upstream client.

Run as its own process by ``bench/run.py``::

    python bench/floor.py --port 9002 --upstream http://127.0.0.1:9001 --token <worker token>

A raw ASGI app that forwards every request to ``--upstream`` with the broker's upstream
client (``broker.upstream.HttpForwarder``, with the broker's default timeouts and pool size),
``Authorization`` replaced by the worker token and hop-by-hop headers dropped, and streams
the response back. It is served exactly as ``broker serve`` serves the broker: uvicorn with
``broker.serving.RequestTargetProtocol`` on uvloop, one process, no access log, no server
header, no proxy-header handling. Nothing else: no token check, no rules, no audit, no
database, no metrics, no logging per request. Whatever the broker spends above this leg is
the broker's own work (bench/README.md).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Final

import uvicorn

from broker.config import Settings
from broker.core.rules import HOP_BY_HOP
from broker.serving import RequestTargetProtocol
from broker.upstream import HttpForwarder, UpstreamError

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from broker.upstream import UpstreamResponse

# uvicorn and HttpForwarder hand header names over in lower case. The client's credential is
# replaced; Host and Content-Length are the upstream client's to write; Expect is dropped
# because the body has been read already (as the broker does).
_REQUEST_DROP: Final = frozenset({b"authorization", b"host", b"content-length", b"expect"}) | (
    HOP_BY_HOP
)
# uvicorn writes its own Date and framing.
_RESPONSE_DROP: Final = frozenset({b"date"}) | HOP_BY_HOP
_BAD_GATEWAY: Final = b'{"errors":[{"message":"upstream unreachable"}]}'


class FloorApp:
    """ASGI app forwarding every HTTP request to one upstream with one token."""

    def __init__(self, upstream: str, token: str, forwarder: HttpForwarder) -> None:
        self._upstream = upstream.rstrip("/")
        self._authorization = (b"authorization", b"Bearer " + token.encode())
        self._forwarder = forwarder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward one request and relay its response."""
        if scope["type"] != "http":  # lifespan is off and websockets are not served
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client went away
        target = self._upstream + scope["raw_path"].decode("latin-1")
        query: bytes = scope["query_string"]
        if query:
            target += "?" + query.decode("latin-1")
        headers = [(name, value) for name, value in scope["headers"] if name not in _REQUEST_DROP]
        headers.append(self._authorization)
        try:
            response = await self._forwarder.send(scope["method"], target, headers, body)
        except UpstreamError:
            await _send_bad_gateway(send)
            return
        try:
            await _relay(response, send)
        except UpstreamError:
            return  # failed mid-body: uvicorn closes the client connection of an unfinished reply
        finally:
            response.release()


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _relay(response: UpstreamResponse, send: Send) -> None:
    """Stream the response; the last chunk goes with the end of the body (one send, not two)."""
    headers = [(name, value) for name, value in response.headers if name not in _RESPONSE_DROP]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    pending: bytes | None = None
    async for chunk in response.body():
        if pending is not None:
            await send({"type": "http.response.body", "body": pending, "more_body": True})
        pending = chunk
    await send({"type": "http.response.body", "body": pending or b""})


async def _send_bad_gateway(send: Send) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_BAD_GATEWAY)).encode()),
    ]
    await send({"type": "http.response.start", "status": 502, "headers": headers})
    await send({"type": "http.response.body", "body": _BAD_GATEWAY})


def main() -> None:
    """Command-line entry point: serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's origin, http://host:port")
    parser.add_argument("--token", required=True, help="the worker token sent upstream")
    args = parser.parse_args()
    # The broker's own defaults (BROKER_UPSTREAM_*), not settings read from the environment.
    defaults = Settings.model_fields
    forwarder = HttpForwarder(
        connect_timeout=defaults["upstream_connect_timeout"].default,
        read_timeout=defaults["upstream_timeout"].default,
        pool_size=defaults["upstream_pool_size"].default,
    )
    uvicorn.run(
        FloorApp(args.upstream, args.token, forwarder),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http=RequestTargetProtocol,
        ws="none",
        lifespan="off",
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_level="info",
    )


if __name__ == "__main__":
    main()
