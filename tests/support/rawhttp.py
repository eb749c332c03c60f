"""HTTP/1.1 as raw bytes over a socket, for requests no client library will send.

Each exchange opens one connection, sends the bytes given, and reads until the server closes
the connection (requests built by :func:`build` carry ``Connection: close``). Reads are bounded
in size and time: a server that never answers fails the test with a timeout, never hangs it.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from typing import Any

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?")


@dataclass(frozen=True)
class RawResponse:
    """One parsed response: status, headers (lower-case names, in order) and decoded body."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        return [value for key, value in self.headers if key == name.lower()]

    def header(self, name: str) -> str | None:
        """The first value of header ``name``, or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def build(
    request_line: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
) -> bytes:
    """Assemble a request from a request line, headers in order (duplicates kept) and a body.

    Nothing is added: the caller writes ``Host``, ``Content-Length`` and ``Connection`` itself.
    """
    lines = [request_line, *(name + b": " + value for name, value in headers)]
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


def exchange(host: str, port: int, request: bytes, *, timeout: float = 10.0) -> RawResponse:
    """Send ``request`` on a new connection and return the final (non-1xx) response."""
    received = bytearray()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        while len(received) <= MAX_RESPONSE_BYTES:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return parse(bytes(received))


def exchange_all(
    host: str, port: int, request: bytes, *, timeout: float = 10.0
) -> list[RawResponse]:
    """Send ``request`` (several pipelined requests) and return every final response."""
    received = bytearray()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        while len(received) <= MAX_RESPONSE_BYTES:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    responses: list[RawResponse] = []
    rest = bytes(received)
    while rest:
        response, rest = _parse_one(rest)
        responses.append(response)
    return responses


def parse(data: bytes) -> RawResponse:
    """Parse the last response in ``data``, skipping interim ``1xx`` responses before it."""
    response, _rest = _parse_one(data)
    return response


def _parse_one(data: bytes) -> tuple[RawResponse, bytes]:
    """Parse the first final response in ``data``; return it and the bytes after it."""
    while True:
        head, separator, rest = data.partition(b"\r\n\r\n")
        if not separator:
            raise AssertionError(f"no complete response in {data[:200]!r}")
        lines = head.split(b"\r\n")
        status_line = _STATUS_LINE.fullmatch(lines[0])
        if status_line is None:
            raise AssertionError(f"not an HTTP response: {lines[0]!r}")
        status = int(status_line.group(1))
        if 100 <= status < 200:
            data = rest
            continue
        headers = []
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip().lower(), value.strip()))
        body, after = _body(headers, rest)
        return RawResponse(
            status=status,
            reason=(status_line.group(2) or b"").decode("latin-1"),
            headers=headers,
            body=body,
        ), after


def _body(headers: list[tuple[str, str]], rest: bytes) -> tuple[bytes, bytes]:
    """The body and the bytes after it."""
    names = dict(headers)
    if names.get("transfer-encoding", "").lower() == "chunked":
        return _dechunk(rest)
    length = names.get("content-length")
    if length is not None:
        if len(rest) < int(length):
            raise AssertionError(f"body cut short: {len(rest)} of {length} bytes")
        return rest[: int(length)], rest[int(length) :]
    return rest, b""


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    body = bytearray()
    while True:
        size_line, separator, data = data.partition(b"\r\n")
        if not separator:
            raise AssertionError("chunked body cut short")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(body), data.removeprefix(b"\r\n")
        body += data[:size]
        data = data[size + 2 :]
