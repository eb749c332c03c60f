"""The rules of one proxied call, in the order they apply (docs/proxy-rules.md#order-of-checks).

Pure functions over what the client sent. Each returns quietly (or what it read) or raises a
:class:`~broker.errors.Refusal` naming the rule; nothing is forwarded before every one has
passed. ``broker.services.proxy`` runs them in this order, with the checks that need the
database in between:

1. :func:`admit_target`: the request target and head as sent. The path is canonical and
   within the length limit (rule 1, ``rules.check_path``), and the query and every header
   are what any HTTP server would pass on. ``400``/``414``, whatever the token.
2. :func:`bearer_token`: exactly one ``Authorization: Bearer`` header (``401``). *The token
   resolves to its client, grant and worker credential (``401``, ``503``).*
3. :func:`check_source`: the caller's address is one the client may call from (``403``).
   *The client's rate limit has a token left (``429``, ``503``), before anything costly.*
4. :func:`admit_head`: headers (method override, framing, ``Connection``, content coding)
   and the query's parameters (masquerade, method override, credentials, includes):
   ``403``/``400``/``415`` (``rules.check_headers``, ``rules.check_query``).
5. :func:`check_grant`: the grant allows the method and path, exact-only endpoints and
   paths outside the Canvas API included (``403``; ``scopes.Grant.check``, the same decision
   the policy check API gives).
6. :func:`check_declared_length`: before the body is read, ``Content-Length`` is a number
   within the limit (``400``, ``413``); :func:`body_too_large` while it is read.
7. :func:`admit_body`: the body's type and parameters (``415``, ``400``, ``403``;
   ``rules.check_body``). *The pending audit event is committed (``503`` if it cannot be),
   then the call is forwarded.*
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple

from broker.core import rules
from broker.core.net import address_allowed
from broker.errors import Refusal

if TYPE_CHECKING:
    from collections.abc import Sequence

    from broker.core.net import IPNetwork
    from broker.core.scopes import Decision, Grant

__all__ = [
    "CallPolicy",
    "ProxyRequest",
    "admit_body",
    "admit_head",
    "admit_target",
    "audit_text",
    "bearer_token",
    "body_too_large",
    "check_declared_length",
    "check_grant",
    "check_source",
    "rate_limited",
]

_PRINTABLE: Final = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")
_QUERY: Final = re.compile(rb"[\x21-\x7e]*")
_HEADER_NAME: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_NAMES: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:\n[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
_HEADER_VALUE_BAD: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed


class ProxyRequest(NamedTuple):
    """One request exactly as the client sent it: method, target and head.

    ``raw_path`` and ``query`` are the request target's bytes split at the first ``?``;
    ``headers`` are the head's fields in order, names lower case (trailers never join them);
    ``peer`` is the TCP peer's address; ``scheme`` and ``server`` say how the broker itself
    was reached (for links, when no public URL is configured).
    """

    method: str
    raw_path: bytes
    query: bytes
    headers: Sequence[tuple[bytes, bytes]]
    peer: str | None = None
    scheme: str = "http"
    server: tuple[str, int | None] = ("localhost", None)

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """What a resolved token lets its caller do: its grant and its client's flags."""

    grant: Grant
    allow_masquerade: bool = False
    allow_includes: bool = False


def admit_target(request: ProxyRequest) -> str:
    """Step 1: the canonical path as text, or a 400/414 refusal."""
    path = rules.check_path(request.raw_path)
    if not _QUERY.fullmatch(request.query):
        # The query and headers are forwarded as received: a raw space, CR/LF or NUL would
        # reach Canvas's request line or headers intact.
        raise Refusal(
            400, "malformed_request", "the query string must be percent-encoded printable ASCII"
        )
    headers = request.headers
    # Every name and value in one pass each (they are checked on every call): joined by a byte
    # no name may hold (a name holding it shows in the count) and by one every value may.
    names = b"\n".join([name for name, _ in headers])
    if (
        names.count(b"\n") != len(headers) - 1
        or (headers and not _HEADER_NAMES.fullmatch(names))
        or _HEADER_VALUE_BAD.search(b"\t".join([value for _, value in headers]))
    ):
        for name, value in headers:
            if not _HEADER_NAME.fullmatch(name) or _HEADER_VALUE_BAD.search(value):
                raise Refusal(400, "malformed_request", f"header {name[:100]!r} is not valid HTTP")
    return path


def bearer_token(request: ProxyRequest) -> str:
    """Step 2: the bearer token of the one ``Authorization`` header, or a 401 refusal."""
    values = [value for key, value in request.headers if key == b"authorization"]
    if not values:
        raise Refusal(401, "missing_token", "send Authorization: Bearer <proxy token>")
    scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
    token = token.strip()
    if len(values) > 1 or scheme.lower() != "bearer" or not token:
        raise Refusal(401, "malformed_token", "send exactly one Authorization: Bearer header")
    return token


def check_source(address: str | None, networks: Sequence[IPNetwork]) -> None:
    """Step 3: the caller's address is in the client's ``allowed_cidrs`` (if it has any)."""
    if not address_allowed(address, networks):
        raise Refusal(403, "source_not_allowed", "this client may not call from this address")


def rate_limited(retry_after: int) -> Refusal:
    """Step 3's refusal when the client's rate limit is spent (429 with ``Retry-After``)."""
    return Refusal(
        429,
        "rate_limited",
        f"this client's rate limit is exhausted; retry in {retry_after} s",
        headers=[(b"retry-after", str(retry_after).encode())],
    )


def over_canvas_share(retry_after: int) -> Refusal:
    """Step 6's refusal: Canvas's capacity is low and the client has used its share (429).

    See ``broker.core.capacity``; nothing is forwarded, so Canvas never answers its 403.
    """
    return Refusal(
        429,
        "canvas_capacity",
        "Canvas's rate limit for this worker credential is nearly spent and this client has "
        f"used its share of it; retry in {retry_after} s",
        headers=[(b"retry-after", str(retry_after).encode())],
    )


def admit_head(request: ProxyRequest, policy: CallPolicy) -> None:
    """Step 4: the headers and the query's parameters."""
    rules.check_headers(request.headers)
    rules.check_query(
        request.query,
        allow_masquerade=policy.allow_masquerade,
        allow_includes=policy.allow_includes,
    )


def check_grant(policy: CallPolicy, method: str, path: str) -> Decision:
    """Step 5: the grant's decision; raise its refusal with :meth:`Decision.refusal`."""
    return policy.grant.check(method, path)


def check_declared_length(request: ProxyRequest, limit: int) -> None:
    """Step 6: a declared ``Content-Length`` is a number within ``limit``."""
    declared = request.header(b"content-length")
    if declared is None:
        return
    if not declared.isdigit():
        raise Refusal(400, "malformed_request", "Content-Length is not a number")
    if int(declared) > limit:
        raise body_too_large(limit)


def body_too_large(limit: int) -> Refusal:
    """Step 6's refusal for a body over ``limit`` bytes, however it was framed."""
    return Refusal(413, "body_too_large", f"bodies are limited to {limit} bytes")


def admit_body(request: ProxyRequest, policy: CallPolicy, body: bytes) -> None:
    """Step 7: the body's type and parameters, as Canvas would read them."""
    content_type = request.header(b"content-type")
    rules.check_body(
        content_type.decode("latin-1") if content_type is not None else None,
        body,
        allow_masquerade=policy.allow_masquerade,
        allow_includes=policy.allow_includes,
    )


def audit_text(raw: bytes, limit: int | None = None) -> str:
    r"""What the client sent, for the audit log: printable ASCII as is, other bytes as ``\xNN``.

    The log shows unambiguously what was sent, and no byte can break the store (PostgreSQL
    refuses NUL in text) or a reader of an export. Cut to ``limit`` characters, if given.
    """
    if _PRINTABLE.fullmatch(raw):
        return raw[:limit].decode("ascii")
    return "".join(
        chr(byte) if 0x20 <= byte <= 0x7E and byte != 0x5C else f"\\x{byte:02x}"  # noqa: PLR2004
        for byte in raw
    )[:limit]
