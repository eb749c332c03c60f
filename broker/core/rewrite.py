"""Rewriting upstream URLs to the broker's public URL (docs/proxy-rules.md#redirects, #pagination).

Canvas builds ``Location``, ``Link`` and ``meta.pagination`` URLs from its own host. Clients
that follow them must stay on the broker, so URLs whose origin is the upstream's get the
broker's public base instead; their path and query are kept byte for byte. URLs to other
hosts (pre-signed file storage) and relative URLs pass through untouched.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from broker.core import rules

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "REWRITE_LIMIT",
    "Rewriter",
    "header",
    "public_base",
    "relayed_headers",
    "rewritable_json",
    "rewrite_json",
]

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_ABSOLUTE: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")
_JSON_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")
# One link-value of a Link header: separators, ``<url>``, then parameters up to the next
# comma outside a quoted string. What follows the last one may only be separators.
# Possessive quantifiers: the scan never backtracks, like reading the header left to right,
# so a hostile header cannot make the match take exponential time.
_LINK_VALUE_TEXT: Final = r'[ \t,]*+<([^>]*+)>(?:[^",]|"(?:[^"\\]|\\.)*+")*+'
_LINK_VALUE: Final = re.compile(_LINK_VALUE_TEXT, re.DOTALL)
_LINK_HEADER: Final = re.compile(
    f"(?:{_LINK_VALUE_TEXT.replace('([^>]*+)', '[^>]*+')})*+[ \t,]*+", re.DOTALL
)
_AFTER_ORIGIN: Final = frozenset({"", "/", "?", "#"})
_HIGH_SURROGATE: Final = range(0xD800, 0xDC00)
_LOW_SURROGATE: Final = range(0xDC00, 0xE000)
_UNICODE_ESCAPE_LENGTH: Final = 6
_LINK_CACHE_SIZE: Final = 1024

Origin = tuple[str, str, int]


def _origin(scheme: str, authority: str) -> Origin | None:
    """Normalise scheme, host and port; None for userinfo or an unusable authority."""
    scheme = scheme.lower()
    if "@" in authority:
        return None
    if authority.startswith("["):
        close = authority.find("]")
        host, rest = authority[: close + 1], authority[close + 1 :]
        if close < 0 or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = authority.partition(":")
    if not host:
        return None
    if port_text:
        if not port_text.isascii() or not port_text.isdigit():
            return None
        port = int(port_text)
    elif scheme in _DEFAULT_PORTS:
        port = _DEFAULT_PORTS[scheme]
    else:
        return None
    return scheme, host.lower(), port


@dataclass(frozen=True, slots=True)
class Rewriter:
    """Rewrites URLs pointing at ``upstream_origin`` to point at ``public_base``.

    ``upstream_origin`` is ``scheme://host[:port]`` (a trailing slash is tolerated); scheme and
    host compare case-insensitively and default ports are equivalent to none.
    ``public_base`` is the broker's public URL without a trailing slash. Both raise
    ``ValueError`` if they are not absolute URLs of that shape.
    """

    upstream_origin: str
    public_base: str
    _upstream: Origin = field(init=False, repr=False, compare=False)
    _prefix: str = field(init=False, repr=False, compare=False)
    _links: dict[bytes, bytes] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        found = _ABSOLUTE.match(self.upstream_origin)
        origin = None if found is None else _origin(found.group(1), found.group(2))
        if found is None or origin is None or self.upstream_origin[found.end() :] not in {"", "/"}:
            raise ValueError(
                f"upstream origin {self.upstream_origin!r} is not scheme://host[:port]"
            )
        base = _ABSOLUTE.match(self.public_base)
        if (
            base is None
            or _origin(base.group(1), base.group(2)) is None
            or self.public_base.endswith("/")
            or any(char in self.public_base[base.end() :] for char in "?#")
        ):
            raise ValueError(f"public base {self.public_base!r} is not an absolute URL without '/'")
        object.__setattr__(self, "_upstream", origin)
        object.__setattr__(self, "_prefix", self.upstream_origin.rstrip("/"))

    def url(self, value: str) -> str:
        """Rewrite one URL if it points at the upstream; return anything else unchanged."""
        rest = self._rest(value)
        return value if rest is None else self.public_base + rest

    def location(self, value: str) -> str:
        """Rewrite a ``Location`` header value."""
        return self.url(value)

    def link_header(self, value: str) -> str:
        """Rewrite each ``<url>`` of a ``Link`` header, keeping everything else byte for byte.

        A header that does not parse as a list of ``<url>; params`` is returned unchanged.
        """
        if _LINK_HEADER.fullmatch(value) is None:
            return value
        # The header parses, so link-values tile it and each match below is the next one.
        return _LINK_VALUE.sub(self._link_value, value)

    def link_bytes(self, value: bytes) -> bytes:
        """:meth:`link_header` on a header's bytes, remembered: pages repeat their links."""
        rewritten = self._links.get(value)
        if rewritten is None:
            rewritten = self.link_header(value.decode("latin-1")).encode("latin-1")
            if len(self._links) >= _LINK_CACHE_SIZE:
                self._links.clear()
            self._links[value] = rewritten
        return rewritten

    def _link_value(self, link: re.Match[str]) -> str:
        whole, start, end = link.group(0), link.start(1) - link.start(), link.end(1) - link.start()
        return whole[:start] + self.url(link.group(1)) + whole[end:]

    def json_body(self, body: bytes) -> bytes | None:
        """Rewrite upstream URLs among the string values of a JSON body's ``meta.pagination``.

        Only those string tokens change, and within them only the origin part: the rest of the
        body stays byte-identical, escapes included. Returns None when nothing changes or the
        body is not UTF-8 JSON.
        """
        try:
            text = body.decode("utf-8")
            json.loads(text)
        except (ValueError, RecursionError):
            return None
        decoder = json.JSONDecoder()
        replacements: list[tuple[int, int, str]] = []
        for meta in _member_values(decoder, text, _skip_whitespace(text, 0), "meta"):
            for pagination in _member_values(decoder, text, meta, "pagination"):
                for start in _member_values(decoder, text, pagination, None):
                    replacement = self._rewrite_token(decoder, text, start)
                    if replacement is not None:
                        replacements.append(replacement)
        if not replacements:
            return None
        for start, end, token in sorted(replacements, reverse=True):
            text = text[:start] + token + text[end:]
        return text.encode("utf-8")

    def _rest(self, value: str) -> str | None:
        """Return the part after the origin if ``value`` points at the upstream, else None."""
        # Canvas writes its own origin as configured: settle that common case with a prefix.
        prefix = self._prefix
        if value.startswith(prefix) and value[len(prefix) : len(prefix) + 1] in _AFTER_ORIGIN:
            return value[len(prefix) :]
        found = _ABSOLUTE.match(value)
        if found is None or _origin(found.group(1), found.group(2)) != self._upstream:
            return None
        return value[found.end() :]

    def _rewrite_token(
        self, decoder: json.JSONDecoder, text: str, start: int
    ) -> tuple[int, int, str] | None:
        """Rewrite the JSON string token at ``start`` if it holds an upstream URL."""
        if text[start] != '"':
            return None
        value, end = decoder.raw_decode(text, start)
        rest = self._rest(value) if isinstance(value, str) else None
        if rest is None:
            return None
        token = text[start:end]
        split = _raw_offset(token, len(value) - len(rest))
        base = json.dumps(self.public_base)[1:-1]
        if "\\/" in token[:split]:
            base = base.replace("/", "\\/")
        return start, end, '"' + base + token[split:]


def _skip_whitespace(text: str, index: int) -> int:
    found = _JSON_WHITESPACE.match(text, index)
    return index if found is None else found.end()


def _member_values(
    decoder: json.JSONDecoder, text: str, start: int, key: str | None
) -> Iterator[int]:
    """Yield where each value of the object at ``start`` begins (only for ``key`` if given).

    ``text`` must already be known to be valid JSON.
    """
    if text[start] != "{":
        return
    index = _skip_whitespace(text, start + 1)
    while text[index] != "}":
        name, index = decoder.raw_decode(text, index)
        index = _skip_whitespace(text, _skip_whitespace(text, index) + 1)
        if key is None or name == key:
            yield index
        _value, index = decoder.raw_decode(text, index)
        index = _skip_whitespace(text, index)
        if text[index] == ",":
            index = _skip_whitespace(text, index + 1)


def _raw_offset(token: str, decoded_length: int) -> int:
    """Index in a JSON string token after its first ``decoded_length`` decoded characters."""
    index = 1
    for _ in range(decoded_length):
        if token[index] != "\\":
            index += 1
        elif token[index + 1] != "u":
            index += 2
        elif _is_surrogate_pair(token, index):
            index += 2 * _UNICODE_ESCAPE_LENGTH
        else:
            index += _UNICODE_ESCAPE_LENGTH
    return index


def _is_surrogate_pair(token: str, index: int) -> bool:
    r"""Tell whether the ``\uXXXX`` escape at ``index`` and the next one decode to one character."""
    low = index + _UNICODE_ESCAPE_LENGTH
    return (
        int(token[index + 2 : index + 6], 16) in _HIGH_SURROGATE
        and token.startswith("\\u", low)
        and int(token[low + 2 : low + 6], 16) in _LOW_SURROGATE
    )


# --- Responses as relayed (docs/proxy-rules.md#response-headers, #bodies-byte-for-byte) -----

REWRITE_LIMIT: Final = 8 * 1024 * 1024
"""Largest JSON response whose ``meta.pagination`` URLs are rewritten (others pass as sent)."""
_PUBLIC_HOST: Final = re.compile(r"[A-Za-z0-9.:\[\]-]+")


def public_base(
    configured: str | None, host: bytes | None, scheme: str, server: tuple[str, int | None]
) -> str:
    """The broker's public base for this response's links.

    ``BROKER_PUBLIC_URL`` if set; otherwise the ``Host`` the client used (it only shapes the
    response to that same client), or the server's own address if that ``Host`` is unusable.
    """
    if configured:
        return configured
    host_text = host.decode("latin-1") if host else ""
    if not _PUBLIC_HOST.fullmatch(host_text):
        host_text = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
    return f"{scheme}://{host_text}"


def relayed_headers(
    rewriter: Rewriter, upstream: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """Canvas's response headers as relayed: dropped as rule 10 says, links pointed here.

    Canvas's ``X-Request-Id`` is dropped too: the broker's own replaces it
    (``X-Request-Context-Id`` still names Canvas's).
    """
    headers: list[tuple[bytes, bytes]] = []
    for name, value in rules.forward_response_headers(upstream):
        if name == b"x-request-id":
            continue
        if name == b"link":
            value = rewriter.link_bytes(value)  # noqa: PLW2901
        elif name == b"location":
            value = rewriter.location(value.decode("latin-1")).encode("latin-1")  # noqa: PLW2901
        headers.append((name, value))
    return headers


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def rewritable_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response is JSON whose ``meta.pagination`` may need rewriting.

    JSON, plain or gzipped (Canvas gzips for every client that accepts it), with a
    ``Content-Length`` of at most :data:`REWRITE_LIMIT`.
    """
    content_type = header(headers, b"content-type") or b""
    encoding = header(headers, b"content-encoding")
    # ``find``, not ``in``, on every relayed answer (see rules.header_carrying).
    if content_type.lower().find(b"json") < 0 or (encoding is not None and not _gzip(encoding)):
        return False
    length = header(headers, b"content-length")
    return length is not None and length.isdigit() and int(length) <= REWRITE_LIMIT


def _gzip(encoding: bytes) -> bool:
    return encoding.strip().lower() in {b"gzip", b"x-gzip"}


def rewrite_json(rewriter: Rewriter, payload: bytes, encoding: bytes | None) -> bytes | None:
    """The body with its ``meta.pagination`` URLs rewritten, or None to pass it on as is.

    A gzipped body is decompressed, bounded, to look for pagination URLs. Only a body that
    actually changes is compressed again; every other body keeps its exact bytes.
    """
    if encoding is None:
        return rewriter.json_body(payload) if payload.find(b'"pagination"') >= 0 else None
    plain = _gunzip(payload, REWRITE_LIMIT)
    if plain is None or plain.find(b'"pagination"') < 0:
        return None
    rewritten = rewriter.json_body(plain)
    return None if rewritten is None else gzip.compress(rewritten, compresslevel=6, mtime=0)


def _gunzip(payload: bytes, limit: int) -> bytes | None:
    """Decompress a single-member gzip body of at most ``limit`` bytes, else None."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(payload, limit + 1)
    except zlib.error:
        return None
    if len(plain) > limit or not inflater.eof or inflater.unused_data:
        return None
    return plain
