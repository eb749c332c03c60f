"""The proxy's request rules (docs/proxy-rules.md) as pure functions on what the client sent.

Every check returns quietly or raises :class:`Refusal`, which carries the HTTP status
and error code to answer with. Parameter names are read the way Canvas's Rack/Rails stack
would read them, and where Rack versions disagree every reading is checked, so that the broker
refuses whatever Canvas might act on.

"""

from __future__ import annotations

import json
import re
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote_plus, unquote_to_bytes

from broker.core import multipart
from broker.errors import MultipartError, Refusal

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

__all__ = [
    "ALLOWED_INCLUDES",
    "CREDENTIAL_KEYS",
    "HOP_BY_HOP",
    "INCLUDE_KEYS",
    "MASQUERADE_KEYS",
    "MAX_PATH_BYTES",
    "OVERRIDE_HEADERS",
    "OVERRIDE_KEYS",
    "SENSITIVE_QUERY_KEYS",
    "check_body",
    "check_headers",
    "check_path",
    "check_query",
    "forward_request_headers",
    "forward_response_headers",
    "header_carrying",
    "redact_query",
]

MASQUERADE_KEYS: Final = frozenset(
    {"as_user_id", "become_user_id", "become_teacher", "become_student", "me"}
)
"""Parameters that make Canvas act as another user (``load_user`` in Canvas's
``lib/authentication_methods.rb`` reads ``as_user_id`` for the API and the ``become_*`` and
``me`` keys to start a masquerade)."""
INCLUDE_KEYS: Final = frozenset({"include", "includes"})
"""Parameters Canvas strips from a scoped developer key's calls unless it allows includes."""
ALLOWED_INCLUDES: Final = frozenset({"uuid"})
"""The one ``include`` value Canvas keeps for such keys (``ALLOWED_SCOPE_INCLUDES``)."""
OVERRIDE_KEYS: Final = frozenset({"_method"})
"""Parameters Rack reads to override the HTTP method."""
CREDENTIAL_KEYS: Final = frozenset({"access_token", "api_key"})
"""Parameters Canvas reads as credentials."""
OVERRIDE_HEADERS: Final = frozenset(
    {b"x-http-method-override", b"x-http-method", b"x-method-override"}
)
"""Headers that override the HTTP method (lower case)."""
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
"""Hop-by-hop headers, never forwarded in either direction (lower case)."""
SENSITIVE_QUERY_KEYS: Final = frozenset(
    {"access_token", "api_key", "password", "client_secret", "token", "code"}
)
"""Query parameters whose values the audit log keeps only as keyed hashes."""

# Client-address headers Rails and common front ends trust besides X-Forwarded-*.
_CLIENT_ADDRESS_HEADERS: Final = frozenset(
    {b"x-real-ip", b"client-ip", b"true-client-ip", b"x-client-ip", b"x-cluster-client-ip"}
)
_SINGLE_HEADERS: Final = frozenset({b"host", b"content-type"})
# Expect is dropped because the broker has read the whole body already: an upstream client
# told to wait for `100 Continue` would wait on a server that may never send it.
_REQUEST_DROP: Final = (
    frozenset({b"authorization", b"cookie", b"host", b"content-length", b"forwarded", b"expect"})
    | _CLIENT_ADDRESS_HEADERS
    | HOP_BY_HOP
    | OVERRIDE_HEADERS
)
# The broker's server sends its own Date; Canvas's as well would make two (RFC 9110: one).
_RESPONSE_DROP: Final = frozenset({b"set-cookie", b"set-cookie2", b"date"}) | HOP_BY_HOP

_EXCERPT_LIMIT: Final = 100
MAX_PATH_BYTES: Final = 2048
"""Longest request path forwarded (Canvas's own paths are far shorter; the audit log keeps
every forwarded path whole)."""


# --- Rule 1: canonical paths -------------------------------------------------------------

_PATH_NOT_PRINTABLE: Final = re.compile(rb"[^\x21-\x7e]")
_PATH_FORBIDDEN: Final = ((b"\\", "a backslash"), (b";", "';'"), (b"#", "'#'"), (b"?", "'?'"))
_BAD_PERCENT: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# Encoded '/', '\', '.', '%', control characters, and the delimiters '?', '#' and ';': Rails
# decodes a path parameter, so `%3F` would reach a controller as '?', and a decoding hop in
# front of Canvas would turn them into a query, a fragment or a path parameter.
_FORBIDDEN_ESCAPE: Final = re.compile(
    rb"%(?:2[Ff]|5[Cc]|2[Ee]|25|[01][0-9A-Fa-f]|7[Ff]|3[Ff]|23|3[Bb])"
)


def check_path(raw_path: bytes) -> str:
    """Return the raw request path as text if it is canonical, else raise a violation.

    A path longer than :data:`MAX_PATH_BYTES` is a 414 ``path_too_long``; a non-canonical one
    a 400 ``non_canonical_path``.
    """
    if len(raw_path) > MAX_PATH_BYTES:
        message = f"paths are limited to {MAX_PATH_BYTES} bytes: {_excerpt(raw_path)}"
        raise Refusal(414, "path_too_long", message)
    problem = _path_problem(raw_path)
    if problem is not None:
        raise Refusal(400, "non_canonical_path", f"{problem}: {_excerpt(raw_path)}")
    return raw_path.decode("ascii")


# Slash-led segments of unreserved and sub-delimiter characters, none starting with '.', and
# no '%', ';', '?', '#' or backslash: canonical by construction (the usual API path).
_PLAIN_PATH: Final = re.compile(rb"(?:/[A-Za-z0-9_~:@!$&'()*+,=-][A-Za-z0-9._~:@!$&'()*+,=-]*)+")


def _path_problem(raw_path: bytes) -> str | None:
    if _PLAIN_PATH.fullmatch(raw_path):
        return None
    segments = raw_path[1:].split(b"/") if raw_path != b"/" else []
    problems = (
        (not raw_path.startswith(b"/"), "path must start with '/'"),
        (_PATH_NOT_PRINTABLE.search(raw_path), "path must be printable ASCII without spaces"),
        *((char in raw_path, f"path must not contain {what}") for char, what in _PATH_FORBIDDEN),
        (b"" in segments, "path must not contain empty segments"),
        (b"." in segments or b".." in segments, "path must not contain '.' or '..' segments"),
        (_BAD_PERCENT.search(raw_path), "path has a '%' not followed by two hex digits"),
        (
            _FORBIDDEN_ESCAPE.search(raw_path),
            "path must not percent-encode '/', '\\', '.', '%', '?', '#', ';' or controls",
        ),
    )
    problem = next((message for found, message in problems if found), None)
    if problem is None and not _decodes_as_utf8(raw_path):
        # Overlong forms such as %C0%AE ('.') and %C0%AF ('/') are invalid UTF-8: a lax
        # decoder further on could still read them as the characters refused above.
        return "path must percent-encode only UTF-8 text"
    return problem


def _decodes_as_utf8(raw_path: bytes) -> bool:
    try:
        unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- Rules 3 to 5: parameters and headers ------------------------------------------------


@lru_cache(maxsize=4096)
def _header_key(name: bytes) -> bytes:
    """Normalise a header name for comparison (cached: the same few names recur).

    Servers that pass underscores in names turn both ``X_Forwarded_Host`` and
    ``X-Forwarded-Host`` into the same Rack variable, so they compare as one.
    """
    return name.strip().lower().replace(b"_", b"-")


def check_headers(headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Refuse method-override headers and ambiguous framing.

    Method-override headers, in any case, are a 403 ``method_override_denied``. A repeated
    ``Host`` or ``Content-Type`` (RFC 9110 allows one; which one Canvas's stack would read is
    not the broker's to guess), a transfer coding other than ``chunked`` (whose body the
    broker would check in a form Canvas might not read), or a ``Connection`` header naming
    anything but a hop-by-hop header is a 400 ``malformed_request``: the broker forwards every
    end-to-end header it checked, so a client cannot have one dropped on the way. A
    ``Content-Encoding`` other than ``identity`` is a 415: bodies are checked as sent.
    """
    seen: set[bytes] = set()
    for name, value in headers:
        key = _header_key(name)
        if key in OVERRIDE_HEADERS:
            raise Refusal(
                403,
                "method_override_denied",
                f"header {name.decode('latin-1')!r} is refused: method override is not allowed",
            )
        if key in _SINGLE_HEADERS and key in seen:
            raise Refusal(
                400, "malformed_request", f"header {name.decode('latin-1')!r} is repeated"
            )
        seen.add(key)
        if key == b"transfer-encoding" and value.strip().lower() != b"chunked":
            raise Refusal(
                400, "malformed_request", "the only transfer coding accepted is 'chunked'"
            )
        if key == b"connection":
            _check_connection(value)
        if key == b"content-encoding" and value.strip().lower() != b"identity":
            # The broker checks a body as sent; a server or middleware in front of Canvas
            # that inflated it would hand Rails parameters nobody checked.
            raise Refusal(
                415,
                "unsupported_media_type",
                "request bodies must not be content-encoded: send them uncompressed",
            )


_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive"}) | HOP_BY_HOP


def _check_connection(value: bytes) -> None:
    for token in value.split(b","):
        option = _header_key(token)
        if option and option not in _CONNECTION_OPTIONS:
            raise Refusal(
                400,
                "malformed_request",
                f"Connection names {_excerpt(token.strip())}, which is not a hop-by-hop "
                "header: the broker never drops a header it has checked",
            )


def check_query(
    query_string: bytes, *, allow_masquerade: bool, allow_includes: bool = False
) -> None:
    """Refuse masquerade, method-override and credential parameters in a query string.

    Without ``allow_includes``, ``include``/``includes`` other than ``uuid`` are refused too
    (403 ``include_not_allowed``), as Canvas would strip them from a scoped key's call. An
    unparseable query string (bad percent-escape, not UTF-8, or a raw ``#``, which starts a
    fragment no client sends) is a 400 ``malformed_request``.
    """
    if _PLAIN_QUERY.fullmatch(query_string) and not any(
        pair.partition(b"=")[0] in _WATCHED_NAMES for pair in query_string.split(b"&")
    ):
        # Plain word names, values without escapes: each name reads as itself in every
        # Rack, and none is one the rules watch (the usual query: per_page=50&page=2).
        return
    check_query_pairs(
        query_string, allow_masquerade=allow_masquerade, allow_includes=allow_includes
    )


def check_query_pairs(
    query_string: bytes, *, allow_masquerade: bool, allow_includes: bool = False
) -> None:
    """:func:`check_query` reading every pair, without its shortcut for plain queries."""
    if query_string.find(b"#") >= 0:  # not ``in``: see header_carrying
        raise Refusal(400, "malformed_request", "query string must not contain '#'")
    try:
        pairs = list(_form_pairs(query_string.decode("utf-8")))
    except ValueError:
        raise Refusal(
            400, "malformed_request", "query string is not valid percent-encoded UTF-8"
        ) from None
    for name, value in pairs:
        _check_name(name, allow_masquerade=allow_masquerade)
        if not allow_includes:
            _check_include(name, value)


_PLAIN_PAIR: Final = rb"[A-Za-z0-9_.~-]+=[A-Za-z0-9_.~,:@!$'()*-]*"
_PLAIN_QUERY: Final = re.compile(rb"(?:%s)(?:&%s)*" % (_PLAIN_PAIR, _PLAIN_PAIR))
_WATCHED_NAMES: Final = frozenset(
    name.encode() for name in MASQUERADE_KEYS | OVERRIDE_KEYS | CREDENTIAL_KEYS | INCLUDE_KEYS
)


def check_body(
    content_type: str | None,
    body: bytes,
    *,
    allow_masquerade: bool,
    allow_includes: bool = False,
) -> None:
    """Check a request body's parameters as Canvas would read them.

    JSON (``application/json`` and ``+json`` types), form-urlencoded and multipart bodies are
    checked for masquerade, method-override and credential keys, and (without
    ``allow_includes``) for includes; a body that does not parse as its type (a form body that
    is JSON or holds control characters included) is a 400 ``malformed_body``; any other type
    with a non-empty body, or a body without a type (Rack reads an untyped POST as a form),
    is a 415.
    """
    if not body:
        return
    parsed = _parse_content_type(content_type) if content_type is not None else None
    if content_type is None or parsed is None:
        raise _unsupported("a request body needs a JSON, form-urlencoded or multipart type")
    media_type, params = parsed
    pairs: Sequence[tuple[str, object]]
    top: Sequence[tuple[str, object]]
    if media_type == "multipart/form-data":
        pairs = _multipart_pairs(content_type, params, body)
        top = pairs
    elif params is None:
        raise _unsupported(f"Content-Type {_excerpt(content_type.encode())} does not parse")
    elif media_type == "application/json" or media_type.endswith("+json"):
        names, top = _json_params(body)
        pairs = [(name, None) for name in names]
    elif media_type == "application/x-www-form-urlencoded":
        pairs = top = _form_body_pairs(body)
    else:
        raise _unsupported(f"request bodies of type {_excerpt(media_type.encode())} are refused")
    for name, _value in pairs:
        _check_name(name, allow_masquerade=allow_masquerade)
    if not allow_includes:
        for name, value in top:
            _check_include(name, value)


def _unsupported(message: str) -> Refusal:
    return Refusal(415, "unsupported_media_type", message)


_NAME_PART: Final = re.compile(r"[^\[\]]+")
# Rack 2's top-level key: leading brackets dropped, then the first bracket-free run.
_RACK2_TOP: Final = re.compile(r"[\[\]]*([^\[\]]+)")


def _name_readings(name: str) -> set[str]:
    """Every key a Rack or Rails version could read from a parameter name, at any depth.

    Nested keys count too (``course[as_user_id]`` is read as ``as_user_id`` under ``course``),
    as every key anywhere in a JSON body does: what Canvas does with a nested copy is not
    the broker's to guess.
    """
    # Every bracket-free part: Rack 2 also drops leading brackets (`[as_user_id]`).
    return {*_top_readings(name), *_NAME_PART.findall(name)}


def _top_readings(name: str) -> set[str]:
    """Every top-level key a Rack version could read from a parameter name."""
    # Rack 3 and Rails look for the first '[' after the first character; Rack 2 skips
    # leading brackets and takes the first bracket-free run.
    bracket = name.find("[", 1)
    readings = {name, name.split("[", 1)[0], name if bracket < 0 else name[:bracket]}
    rack2 = _RACK2_TOP.match(name)
    if rack2 is not None:
        readings.add(rack2.group(1))
    return readings


def _check_name(name: str, *, allow_masquerade: bool) -> None:
    readings = _name_readings(name)
    shown = _excerpt(name.encode("utf-8", "backslashreplace"))
    if not allow_masquerade and readings & MASQUERADE_KEYS:
        raise Refusal(
            403, "masquerade_denied", f"parameter {shown} is refused: masquerading is not allowed"
        )
    if readings & OVERRIDE_KEYS:
        raise Refusal(
            403,
            "method_override_denied",
            f"parameter {shown} is refused: method override is not allowed",
        )
    if readings & CREDENTIAL_KEYS:
        raise Refusal(
            403,
            "credential_param_denied",
            f"parameter {shown} is refused: credentials come from the broker",
        )


_PLAIN_INCLUDES: Final = frozenset({"include", "include[]", "includes", "includes[]"})


def _check_include(name: str, value: object) -> None:
    """Refuse a top-level ``include``/``includes`` unless it is a plain list of ``uuid``.

    Canvas keeps ``include`` on a scoped key's call only as an array, filtered to ``uuid``
    (``filter_includes`` in ``lib/authentication_methods.rb``); the broker never strips a
    parameter, so it refuses instead. Nested forms (``include[0]``, ``include[][x]``) are
    refused whatever their values.
    """
    if not _top_readings(name) & INCLUDE_KEYS:
        return
    values = value if isinstance(value, list) else [value]
    if name in _PLAIN_INCLUDES and all(
        isinstance(item, str) and item in ALLOWED_INCLUDES for item in values
    ):
        return
    shown = _excerpt(name.encode("utf-8", "backslashreplace"))
    raise Refusal(
        403,
        "include_not_allowed",
        f"parameter {shown} is refused: this client may not ask Canvas to include related "
        "data (only include[]=uuid); an admin can set allow_includes on the client",
    )


# --- Form and query parsing (as Rack does it) --------------------------------------------

# Rack 2 splits on '&' and ';' and swallows spaces after the separator; Rack 3 only on '&'.
# Splitting on both reads every key either version could see.
_SEPARATOR: Final = re.compile(r"[&;] *")
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _form_decode(component: str) -> str:
    """Decode one form component like Rack; ValueError on a bad escape or non-UTF-8."""
    if _BAD_ESCAPE.search(component):
        raise ValueError("invalid percent-escape")
    return unquote_plus(component, errors="strict")


def _form_pairs(text: str) -> Iterator[tuple[str, str]]:
    """Decoded ``(name, value)`` pairs of a query or form body, as Rack splits them."""
    for pair in _SEPARATOR.split(text):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        yield _form_decode(key), _form_decode(value)


_FORM_CONTROL: Final = re.compile(rb"[\x00-\x1f\x7f]")
_LOOKS_LIKE_JSON: Final = re.compile(rb"[ \t\r\n]*[\[{]")


def _form_body_pairs(body: bytes) -> list[tuple[str, str]]:
    # A body that is really JSON or multipart under a form Content-Type parses as harmless
    # odd keys here; it is refused anyway, since its sender means something else by it.
    if _LOOKS_LIKE_JSON.match(body):
        raise Refusal(400, "malformed_body", "form body looks like JSON, not a form")
    if _FORM_CONTROL.search(body.removesuffix(b"\n").removesuffix(b"\r")):
        raise Refusal(400, "malformed_body", "form body holds control characters")
    try:
        return list(_form_pairs(body.decode("utf-8")))
    except ValueError:
        raise Refusal(
            400, "malformed_body", "form body is not valid percent-encoded UTF-8"
        ) from None


# --- Content types -----------------------------------------------------------------------

_TCHARS: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED: Final = r'"(?:[^"\\]|\\.)*"'
_MEDIA_TYPE: Final = re.compile(rf"[ \t]*({_TCHARS}/{_TCHARS})[ \t]*")
_MEDIA_PARAM: Final = re.compile(rf";[ \t]*(?:({_TCHARS})=({_TCHARS}|{_QUOTED})[ \t]*)?")
_QUOTED_PAIR: Final = re.compile(r"\\(.)")


def _parse_content_type(value: str) -> tuple[str, dict[str, str] | None] | None:
    """Split a Content-Type into its lower-cased media type and parameters.

    None if the media type is malformed; parameters are None if they are malformed or repeated.
    """
    media = _MEDIA_TYPE.match(value)
    if media is None:
        return None
    return media.group(1).lower(), _media_params(value, media.end())


def _media_params(value: str, position: int) -> dict[str, str] | None:
    params: dict[str, str] = {}
    while position < len(value):
        param = _MEDIA_PARAM.match(value, position)
        if param is None:
            return None
        position = param.end()
        if param.group(1) is None:
            continue
        name = param.group(1).lower()
        if name in params:
            return None
        params[name] = _dequote(param.group(2))
    return params


def _dequote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':  # noqa: PLR2004 - two quote marks
        return _QUOTED_PAIR.sub(r"\1", value[1:-1])
    return value


# --- JSON bodies -------------------------------------------------------------------------


class _JsonObject(list[tuple[str, Any]]):
    """A JSON object as its ``(key, value)`` pairs, repeated keys kept."""


def _json_params(body: bytes) -> tuple[list[str], list[tuple[str, object]]]:
    """Every object key in a JSON body, at any depth, and the top-level ``(key, value)`` pairs.

    Nested keys count because Rails merges nested params; top-level values come back as
    lists, strings or other JSON values.
    """
    names: list[str] = []

    def collect(pairs: list[tuple[str, Any]]) -> _JsonObject:
        names.extend(key for key, _value in pairs)
        return _JsonObject(pairs)

    def refuse_constant(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    try:
        root = json.loads(
            body.decode("utf-8"), object_pairs_hook=collect, parse_constant=refuse_constant
        )
    except (ValueError, RecursionError):
        raise Refusal(400, "malformed_body", "request body is not valid UTF-8 JSON") from None
    return names, list(root) if isinstance(root, _JsonObject) else []


# --- Multipart bodies --------------------------------------------------------------------


def _multipart_pairs(
    content_type: str, params: dict[str, str] | None, body: bytes
) -> list[tuple[str, str | None]]:
    """The ``(name, value)`` of each part, in a form every Rack release reads alike.

    :mod:`broker.core.multipart` refuses every body that some Rack release could read
    differently (docs/proxy-rules.md#multipart-bodies).
    """
    try:
        parts = multipart.parse(
            content_type, None if params is None else params.get("boundary"), body
        )
    except MultipartError as exc:
        raise Refusal(400, "malformed_body", str(exc)) from None
    # A part with a file name is an upload to Rack, never a text value (``include[]`` as a
    # file is no ``uuid``).
    return [
        (part.name, None if part.filename is not None else part.content.decode("utf-8", "replace"))
        for part in parts
    ]


# --- Rule 6 and 10: header forwarding ----------------------------------------------------


def _connection_named(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if _header_key(name) == b"connection":
            named.update(_header_key(token) for token in value.split(b","))
    named.discard(b"")
    return frozenset(named)


def forward_request_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Return the client headers to send upstream, in order, as sent.

    Drops credentials (Authorization, Cookie), Host, Content-Length, Expect, Forwarded,
    ``X-Forwarded-*``, client-address headers, method-override headers and hop-by-hop
    headers. A Connection header naming any other header was refused by
    :func:`check_headers`, so nothing the checks read is dropped here.
    """
    kept: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        key = _header_key(name)
        if key in _REQUEST_DROP or key.startswith(b"x-forwarded-"):
            continue
        kept.append((name, value))
    return kept


def forward_response_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Return the upstream response headers to pass to the client, in order, as sent.

    Drops Set-Cookie, Date (the broker's server sends its own), hop-by-hop headers and any
    header named in upstream's Connection header.
    """
    named = _connection_named(headers)
    return [
        (name, value)
        for name, value in headers
        if (key := _header_key(name)) not in _RESPONSE_DROP and key not in named
    ]


def header_carrying(headers: Sequence[tuple[bytes, bytes]], secret: bytes) -> bytes | None:
    """The name of the first header whose value holds ``secret``, as sent or percent-decoded.

    Used on Canvas's response: the worker token must never reach a client, and a ``Location``
    such as ``…?access_token=…`` would carry it.

    Searched with ``find``, not ``in``: on CPython 3.11, ``bytes in bytes`` first tries the
    needle as an integer and builds and discards a ``TypeError`` (``_Py_bytes_contains`` in
    Objects/bytes_methods.c). This runs twice per response header of every relayed call
    (bench/README.md, "Costs CPython hides").
    """
    for name, value in headers:
        if value.find(secret) >= 0 or (
            value.find(b"%") >= 0 and unquote_to_bytes(value).find(secret) >= 0
        ):
            return name
    return None


UPSTREAM_CREDENTIAL_REJECTED: Final = "upstream_credential_rejected"
"""The outcome of a relayed call that Canvas answered with an invalid-token 401."""


def canvas_rejected_credential(status: int, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether Canvas's answer says the worker token itself is not accepted.

    Canvas challenges a missing, wrong, expired or revoked access token with a 401 carrying
    ``WWW-Authenticate``; its other 401s (an unauthorized action, a bad ``as_user_id``) carry
    none. canvasapi's requester (canvasapi/requester.py, ``_request``) tells
    ``InvalidAccessToken`` from ``Unauthorized`` the same way.
    """
    return status == 401 and any(name.lower() == b"www-authenticate" for name, _ in headers)  # noqa: PLR2004


# --- Audit -------------------------------------------------------------------------------

_SEPARATOR_KEPT: Final = re.compile(r"([&;] *)")


def redact_query(
    query_string: bytes,
    hash_value: Callable[[str], str],
    sensitive: frozenset[str] = SENSITIVE_QUERY_KEYS,
) -> str:
    """Return a query string for the audit log with sensitive values replaced by hashes.

    Keys compare by every name Rack could read, case-insensitively (over-redacting is
    harmless). Other pairs are kept as sent. Unparseable input yields a marker, never the raw
    text.
    """
    if b"%" not in query_string and query_string.isascii():
        raw = query_string.lower()
        if not any(key in raw for key in _lowered_bytes(sensitive)):
            return query_string.decode("ascii")  # no name could read as a sensitive key
    return redact_pairs(query_string, hash_value, sensitive)


def redact_pairs(
    query_string: bytes, hash_value: Callable[[str], str], sensitive: frozenset[str]
) -> str:
    """:func:`redact_query` reading every pair, without its shortcut."""
    lowered = {key.lower() for key in sensitive}
    try:
        pieces = _SEPARATOR_KEPT.split(query_string.decode("utf-8"))
        for index in range(0, len(pieces), 2):
            key, equals, value = pieces[index].partition("=")
            decoded_value = _form_decode(value)
            readings = {reading.lower() for reading in _name_readings(_form_decode(key))}
            if equals and readings & lowered:
                pieces[index] = f"{key}={hash_value(decoded_value)}"
    except ValueError:
        return f"<malformed query: {len(query_string)} bytes>"
    return "".join(pieces)


@cache
def _lowered_bytes(keys: frozenset[str]) -> tuple[bytes, ...]:
    return tuple(key.lower().encode() for key in keys)


def _excerpt(raw: bytes) -> str:
    shown = raw[:_EXCERPT_LIMIT].decode("ascii", "backslashreplace")
    suffix = "..." if len(raw) > _EXCERPT_LIMIT else ""
    return repr(shown + suffix)
