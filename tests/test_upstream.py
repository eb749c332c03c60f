"""The upstream client against scripted HTTP/1.1 servers on loopback.

Contract: docs/proxy-rules.md#redirects, #bodies-byte-for-byte, #timeouts-and-pooling.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.errors import UpstreamError
from broker.upstream import HttpForwarder

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

BOUND = 10  # seconds; far above every timeout used here


@dataclass
class Exchange:
    """One request as a scripted server read it, and the means to answer."""

    head: bytes
    body: bytes
    writer: asyncio.StreamWriter
    connection: int


@dataclass
class Script:
    """A server that runs ``answer`` for every request and records what it saw."""

    answer: Callable[[Exchange], Awaitable[None]]
    requests: list[Exchange] = field(default_factory=list)
    connections: int = 0
    port: int = 0


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


@asynccontextmanager
async def scripted(
    answer: Callable[[Exchange], Awaitable[None]], tls: ssl.SSLContext | None = None
) -> AsyncIterator[Script]:
    script = Script(answer)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        script.connections += 1
        number = script.connections
        try:
            while (request := await _read_request(reader)) is not None:
                exchange = Exchange(request[0], request[1], writer, number)
                script.requests.append(exchange)
                await answer(exchange)
                if writer.is_closing():
                    break
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    script.port = server.sockets[0].getsockname()[1]
    try:
        yield script
    finally:
        server.close()
        await server.wait_closed()


def reply(raw: bytes) -> Callable[[Exchange], Awaitable[None]]:
    async def answer(exchange: Exchange) -> None:
        exchange.writer.write(raw)
        await exchange.writer.drain()

    return answer


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]"


def forwarder(**options: float) -> HttpForwarder:
    settings = {"connect_timeout": 2.0, "read_timeout": 2.0, "pool_size": 4, **options}
    return HttpForwarder(
        connect_timeout=settings["connect_timeout"],
        read_timeout=settings["read_timeout"],
        pool_size=int(settings["pool_size"]),
    )


async def fetch(
    client: HttpForwarder,
    url: str,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    async with asyncio.timeout(BOUND):
        response = await client.send(method, url, headers or [], body)
        try:
            content = await response.read()
        finally:
            response.release()
    return response.status, response.headers, content


async def test_request_is_sent_exactly_as_given_with_host_and_length_only() -> None:
    async with scripted(reply(OK)) as server:
        client = forwarder()
        await fetch(
            client,
            f"http://127.0.0.1:{server.port}/api/v1/courses/1201?search_term=a%41b&x[]=1",
            method="POST",
            headers=[(b"accept", b"application/json"), (b"X-Custom", b"Two  spaces")],
            body=b'{"a":1}',
        )
        await client.aclose()
    [request] = server.requests
    assert request.head == (
        b"POST /api/v1/courses/1201?search_term=a%41b&x[]=1 HTTP/1.1\r\n"
        b"host: 127.0.0.1:" + str(server.port).encode() + b"\r\n"
        b"accept: application/json\r\n"
        b"X-Custom: Two  spaces\r\n"
        b"content-length: 7\r\n\r\n"
    )
    assert request.body == b'{"a":1}'


async def test_keep_alive_connections_are_reused() -> None:
    async with scripted(reply(OK)) as server:
        client = forwarder()
        for _ in range(5):
            assert (await fetch(client, f"http://127.0.0.1:{server.port}/a"))[0] == 200
        await client.aclose()
    assert (len(server.requests), server.connections) == (5, 1)


async def test_a_chunked_body_arrives_unframed_and_still_content_encoded() -> None:
    gzipped = bytes(range(256)) * 4
    chunked = b"".join(
        f"{len(part):x}\r\n".encode() + part + b"\r\n"
        for part in (gzipped[:100], gzipped[100:700], gzipped[700:])
    )
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
        + b"0\r\n\r\n"
    )
    async with scripted(reply(raw)) as server:
        client = forwarder()
        status, headers, content = await fetch(client, f"http://127.0.0.1:{server.port}/f")
        status_again, _, _ = await fetch(client, f"http://127.0.0.1:{server.port}/f")
        await client.aclose()
    assert (status, content) == (200, gzipped)
    assert (b"content-encoding", b"gzip") in headers
    assert (status_again, server.connections) == (200, 1)


async def test_a_body_delimited_by_closing_the_connection_is_read_to_the_end() -> None:
    async def answer(exchange: Exchange) -> None:
        exchange.writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await exchange.writer.drain()
        exchange.writer.close()

    async with scripted(answer) as server:
        client = forwarder()
        assert await fetch(client, f"http://127.0.0.1:{server.port}/x") == (
            200,
            [(b"connection", b"close")],
            b"all of it",
        )
        assert (await fetch(client, f"http://127.0.0.1:{server.port}/x"))[0] == 200
        await client.aclose()
    assert server.connections == 2


async def test_head_returns_after_the_head_although_content_length_announces_a_body() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
    async with scripted(reply(raw)) as server:
        client = forwarder()
        status, headers, content = await fetch(
            client, f"http://127.0.0.1:{server.port}/h", method="HEAD"
        )
        await client.aclose()
    assert (status, content) == (200, b"")
    assert (b"content-length", b"5000") in headers


@pytest.mark.parametrize("status", [204, 304])
async def test_responses_without_a_body_complete_and_keep_the_connection(status: int) -> None:
    raw = f"HTTP/1.1 {status} Nothing\r\nETag: x\r\n\r\n".encode()
    async with scripted(reply(raw)) as server:
        client = forwarder()
        assert (await fetch(client, f"http://127.0.0.1:{server.port}/n"))[:2] == (
            status,
            [(b"etag", b"x")],
        )
        assert (await fetch(client, f"http://127.0.0.1:{server.port}/n"))[0] == status
        await client.aclose()
    assert server.connections == 1


async def test_an_interim_100_continue_is_skipped_for_the_final_response() -> None:
    async with scripted(reply(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as server:
        client = forwarder()
        status, headers, content = await fetch(
            client, f"http://127.0.0.1:{server.port}/c", method="POST", body=b"x"
        )
        await client.aclose()
    assert (status, content) == (200, b"[]")
    assert headers == [(b"content-type", b"application/json"), (b"content-length", b"2")]


async def test_connection_close_from_upstream_is_not_reused() -> None:
    raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n[]"
    async with scripted(reply(raw)) as server:
        client = forwarder()
        for _ in range(3):
            assert (await fetch(client, f"http://127.0.0.1:{server.port}/k"))[0] == 200
        await client.aclose()
    assert server.connections == 3


def _drop_second_request_per_connection() -> Callable[[Exchange], Awaitable[None]]:
    """Answer the first request of each connection; close on the second without answering."""
    seen: dict[int, int] = {}

    async def answer(exchange: Exchange) -> None:
        seen[exchange.connection] = seen.get(exchange.connection, 0) + 1
        if seen[exchange.connection] > 1:
            exchange.writer.close()
            return
        exchange.writer.write(OK)
        await exchange.writer.drain()

    return answer


async def test_an_idempotent_request_on_a_connection_the_server_dropped_is_retried_once() -> None:
    async with scripted(_drop_second_request_per_connection()) as server:
        client = forwarder()
        assert (await fetch(client, f"http://127.0.0.1:{server.port}/r"))[0] == 200
        assert (await fetch(client, f"http://127.0.0.1:{server.port}/r"))[0] == 200
        await client.aclose()
    assert [e.connection for e in server.requests] == [1, 1, 2]


async def test_a_post_on_a_connection_the_server_dropped_is_not_sent_twice() -> None:
    async with scripted(_drop_second_request_per_connection()) as server:
        client = forwarder()
        await fetch(client, f"http://127.0.0.1:{server.port}/p", method="POST", body=b"1")
        with pytest.raises(UpstreamError) as failure:
            await fetch(client, f"http://127.0.0.1:{server.port}/p", method="POST", body=b"2")
        await client.aclose()
    assert not failure.value.timeout
    assert [e.body for e in server.requests] == [b"1", b"2"]


async def test_an_upstream_that_never_answers_times_out() -> None:
    async def silent(_exchange: Exchange) -> None:
        await asyncio.sleep(BOUND)

    async with scripted(silent) as server:
        client = forwarder(read_timeout=0.2)
        with pytest.raises(UpstreamError) as failure:
            await fetch(client, f"http://127.0.0.1:{server.port}/s")
        await client.aclose()
    assert failure.value.timeout


async def test_an_upstream_that_stalls_mid_body_times_out() -> None:
    async def stall(exchange: Exchange) -> None:
        exchange.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await exchange.writer.drain()
        await asyncio.sleep(BOUND)

    async with scripted(stall) as server:
        client = forwarder(read_timeout=0.2)
        with pytest.raises(UpstreamError) as failure:
            await fetch(client, f"http://127.0.0.1:{server.port}/s")
        await client.aclose()
    assert failure.value.timeout


async def test_a_malformed_response_is_an_upstream_error() -> None:
    async with scripted(reply(b"NOT HTTP AT ALL\r\n\r\n")) as server:
        client = forwarder()
        with pytest.raises(UpstreamError) as failure:
            await fetch(client, f"http://127.0.0.1:{server.port}/m")
        await client.aclose()
    assert not failure.value.timeout


async def test_a_refused_connection_is_unreachable_not_a_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    client = forwarder()
    with pytest.raises(UpstreamError) as failure:
        await fetch(client, f"http://127.0.0.1:{closed_port}/x")
    await client.aclose()
    assert not failure.value.timeout


async def test_a_large_body_streams_through_intact() -> None:
    payload = bytes(range(251)) * 40_000  # about 10 MB, far above the read-pause threshold
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n"

    async with scripted(reply(raw + payload)) as server:
        client = forwarder()
        async with asyncio.timeout(BOUND):
            response = await client.send("GET", f"http://127.0.0.1:{server.port}/big", [], b"")
            received = bytearray()
            async for chunk in response.body():
                received += chunk
                await asyncio.sleep(0)  # a consumer slower than loopback
            response.release()
        await client.aclose()
    assert bytes(received) == payload


async def test_idle_connections_beyond_the_pool_size_are_closed() -> None:
    gate, all_in = asyncio.Event(), asyncio.Event()

    async def slow(exchange: Exchange) -> None:
        if exchange.connection == 5:
            all_in.set()
        await gate.wait()
        exchange.writer.write(OK)
        await exchange.writer.drain()

    async with scripted(slow) as server:
        client = forwarder(pool_size=2)
        url = f"http://127.0.0.1:{server.port}/p"
        calls = [asyncio.create_task(fetch(client, url)) for _ in range(5)]
        async with asyncio.timeout(BOUND):
            await all_in.wait()
        gate.set()
        assert [call[0] for call in await asyncio.gather(*calls)] == [200] * 5
        for _ in range(5):
            await fetch(client, url)
        await client.aclose()
    # Five connections were open at once; afterwards only two stayed to serve the rest.
    assert server.connections == 5
    assert {e.connection for e in server.requests[5:]} <= {e.connection for e in server.requests}
    assert len({e.connection for e in server.requests[5:]}) <= 2


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context for 127.0.0.1 and a client context that trusts only it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


async def test_https_upstreams_are_verified_against_the_trust_store(tmp_path: Path) -> None:
    server_tls, client_tls = _self_signed(tmp_path)
    async with scripted(reply(OK), tls=server_tls) as server:
        trusting = HttpForwarder(
            connect_timeout=2, read_timeout=2, pool_size=2, ssl_context=client_tls
        )
        assert (await fetch(trusting, f"https://127.0.0.1:{server.port}/t"))[0] == 200
        await trusting.aclose()
        default = forwarder()
        with pytest.raises(UpstreamError) as failure:
            await fetch(default, f"https://127.0.0.1:{server.port}/t")
        await default.aclose()
    assert not failure.value.timeout
    assert len(server.requests) == 1


# What Canvas sends is bounded (docs/proxy-rules.md#upstream-limits) -----------------------


def endless_header() -> Callable[[Exchange], Awaitable[None]]:
    """A head that never ends: one header value megabytes long, sent until the peer leaves."""

    async def answer(exchange: Exchange) -> None:
        writer = exchange.writer
        writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: ")
        try:
            for _ in range(256):  # at most 16 MiB
                writer.write(b"a" * 65536)
                await writer.drain()
        except ConnectionError:
            return
        writer.close()

    return answer


async def test_a_response_head_over_the_limit_fails_and_closes_the_connection() -> None:
    async with scripted(endless_header()) as server:
        client = forwarder()
        with pytest.raises(UpstreamError, match="response head is over 65536 bytes") as raised:
            await fetch(client, f"http://127.0.0.1:{server.port}/api/v1/courses")
        await client.aclose()
    assert not raised.value.timeout


async def test_more_header_fields_than_the_limit_fail_the_response() -> None:
    fields = b"".join(b"X-F%d: v\r\n" % n for n in range(201))
    too_many = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\n[]"
    async with scripted(reply(too_many)) as server:
        client = forwarder()
        with pytest.raises(UpstreamError, match="over 200 header fields"):
            await fetch(client, f"http://127.0.0.1:{server.port}/api/v1/courses")
        await client.aclose()


async def test_a_large_head_within_the_limits_is_taken_whole() -> None:
    link = b"<https://canvas.test/api/v1/courses?page=" + b"9" * 50_000 + b'>; rel="next"'
    fields = b"".join(b"X-F%d: v\r\n" % n for n in range(190))
    large = b"HTTP/1.1 200 OK\r\nLink: " + link + b"\r\n" + fields + b"Content-Length: 2\r\n\r\n[]"
    async with scripted(reply(large)) as server:
        client = forwarder()
        status, headers, body = await fetch(client, f"http://127.0.0.1:{server.port}/api")
        await client.aclose()
    assert (status, body) == (200, b"[]")
    assert dict(headers)[b"link"].endswith(b'rel="next"')


async def test_a_body_read_whole_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("broker.upstream.MAX_READ_BODY_BYTES", 1000)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024
    async with scripted(reply(chunked + b"\r\n" * 1)) as server:
        client = forwarder()
        with pytest.raises(UpstreamError, match="response body is over 1000 bytes"):
            await fetch(client, f"http://127.0.0.1:{server.port}/api")
        await client.aclose()
