"""A fast stand-in for Canvas: a raw asyncio HTTP/1.1 server with keep-alive.

Run as its own process by ``bench/run.py``::

    python bench/upstream.py --port 9001 --token <worker token>

Every ``GET /api/v1/...`` carrying ``Authorization: Bearer <token>`` is answered with the same
Canvas-like page: a JSON list of assignments (about 2 KB) and a ``Link`` header whose URLs
point back at this server, as Canvas's do. Anything else is ``401``/``404``, counted, so the
benchmark can prove no request went unauthenticated. ``GET /__bench/stats`` returns the
counters as JSON (it needs no token and is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

MAX_HEAD = 64 * 1024
STATS_PATH = b"/__bench/stats"
PAGE_SIZE = 8  # about 2.2 KB of JSON
CANVAS_WEB = "https://canvas.example.edu"


@dataclass
class Counters:
    """What the server has answered since it started."""

    ok: int = 0
    unauthorized: int = 0
    not_found: int = 0
    bad_request: int = 0


def canvas_page(course_id: int, per_page: int) -> bytes:
    """A list of assignments shaped like Canvas's ``GET /courses/:id/assignments``."""
    start = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
    items = []
    for n in range(per_page):
        due = (start + timedelta(days=7 * n)).strftime("%Y-%m-%dT%H:%M:%SZ")
        items.append(
            {
                "id": 4100 + n,
                "name": f"Week {n + 1} problem set",
                "course_id": course_id,
                "due_at": due,
                "points_possible": 10.0,
                "grading_type": "points",
                "submission_types": ["online_upload"],
                "published": True,
                "html_url": f"{CANVAS_WEB}/courses/{course_id}/assignments/{4100 + n}",
                "position": n + 1,
            }
        )
    return json.dumps(items, separators=(",", ":")).encode()


def link_header(origin: str, path: str, per_page: int) -> bytes:
    """Canvas's pagination ``Link`` header: absolute URLs to this server."""
    rels = {"current": 1, "next": 2, "first": 1, "last": 5}
    parts = [
        f'<{origin}{path}?page={page}&per_page={per_page}>; rel="{rel}"'
        for rel, page in rels.items()
    ]
    return ",".join(parts).encode()


class Responses:
    """Pre-built response bytes; the hot path only picks one."""

    def __init__(self, origin: str, token: str, counters: Counters) -> None:
        self.auth = b"bearer " + token.encode().lower()
        self.counters = counters
        self._origin = origin
        self._pages: dict[bytes, bytes] = {}

    def page(self, path: bytes) -> bytes:
        """The 200 response for ``path`` (cached by path)."""
        cached = self._pages.get(path)
        if cached is None:
            text = path.decode("latin-1")
            segments = text.split("/")
            course = int(segments[4]) if len(segments) > 4 and segments[4].isdigit() else 1
            body = canvas_page(course, PAGE_SIZE)
            cached = _response(
                200,
                "OK",
                body,
                [
                    (b"Content-Type", b"application/json; charset=utf-8"),
                    (b"Link", link_header(self._origin, text, PAGE_SIZE)),
                    (b"Cache-Control", b"private, max-age=0, must-revalidate"),
                    (b"X-Request-Cost", b"0.0123"),
                    (b"X-Rate-Limit-Remaining", b"700.0"),
                ],
            )
            if len(self._pages) < 1024:
                self._pages[path] = cached
        return cached

    def stats(self) -> bytes:
        """The counters as a JSON response."""
        body = json.dumps(self.counters.__dict__).encode()
        return _response(200, "OK", body, [(b"Content-Type", b"application/json")])


def _response(status: int, reason: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}".encode()]
    head += [name + b": " + value for name, value in headers]
    head.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body


UNAUTHORIZED = _response(
    401,
    "Unauthorized",
    b'{"errors":[{"message":"Invalid access token."}]}',
    [(b"Content-Type", b"application/json"), (b"WWW-Authenticate", b'Bearer realm="canvas-lms"')],
)
NOT_FOUND = _response(404, "Not Found", b'{"errors":[{"message":"not found"}]}', [])
BAD_REQUEST = _response(400, "Bad Request", b"", [(b"Connection", b"close")])


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; requests have no bodies (GET)."""

    def __init__(self, responses: Responses) -> None:
        self._responses = responses
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        transport = self._transport
        assert transport is not None
        out: list[bytes] = []
        close = False
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    out.append(BAD_REQUEST)
                    close = True
                break
            head = self._buffer[:end]
            reply, length, close = self._answer(head)
            if length and len(self._buffer) < end + 4 + length:
                break  # wait for the rest of a request body (GET normally has none)
            self._buffer = self._buffer[end + 4 + length :]
            out.append(reply)
            if close:
                break
        if out:
            transport.write(b"".join(out))
        if close:
            transport.close()

    def _answer(self, head: bytes) -> tuple[bytes, int, bool]:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        counters = self._responses.counters
        if len(parts) != 3:
            counters.bad_request += 1
            return BAD_REQUEST, 0, True
        method, target, version = parts
        auth = b""
        length = 0
        close = version != b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"authorization":
                auth = value.strip()
            elif key == b"content-length":
                length = int(value.strip() or b"0")
            elif key == b"connection":
                token = value.strip().lower()
                close = token == b"close" or (close and token != b"keep-alive")
        path = target.partition(b"?")[0]
        if path == STATS_PATH:
            return self._responses.stats(), length, close
        if method != b"GET" or not path.startswith(b"/api/v1/"):
            counters.not_found += 1
            return NOT_FOUND, length, close
        if auth.lower() != self._responses.auth:
            counters.unauthorized += 1
            return UNAUTHORIZED, length, close
        counters.ok += 1
        return self._responses.page(path), length, close


async def serve(host: str, port: int, token: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    responses = Responses(f"http://{host}:{port}", token, Counters())
    server = await loop.create_server(
        lambda: HttpProtocol(responses), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"upstream ready on http://{host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True, help="the worker token the server accepts")
    args = parser.parse_args()
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.token))
    else:
        uvloop.run(serve(args.host, args.port, args.token))
    sys.exit(0)


if __name__ == "__main__":
    main()
