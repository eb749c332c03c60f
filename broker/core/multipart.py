r"""multipart/form-data bodies, accepted only in a form every Rack release reads alike.

Canvas reads multipart parameters through Rack, and Rack 2.2, 3.0 and 3.1 find a part's name
in different, non-RFC ways (``lib/rack/multipart/parser.rb`` of each release line; the rules
and their traps are in docs/proxy-rules.md#multipart-bodies):

- 2.2 and 3.0 search the whole part head with unanchored regexes: a ``Content-Disposition:``
  inside another header's value counts, the name is the *last* ``;\s*name=`` before the next
  colon (one inside a quoted file name included), ``NAME=`` counts, and a file name
  parameter is collected from any header;
- 3.1 parses a disposition by hand, but ignores one over 1,536 bytes, reads only 16
  parameters, matches parameter names case-sensitively and loses a name after a bare flag;
- all of them fall back to the ``Content-ID``, then the (percent-decoded) file name, then the
  part's ``Content-Type`` as the name of a part without one, and read a boundary from the
  Content-Type with loose regexes (2.2 and 3.1 the first ``boundary`` after ``multipart/``,
  3.0 the last ``boundary=``);
- 2.2 frames parts line by line: a boundary line may end in a bare LF or carry trailing
  spaces, and a part after the closing boundary is still read.

Rather than model each reading, the broker accepts a narrow form in which all of them find
the same names, and refuses (400 ``malformed_body``) every other body, so what it checks is
what Canvas reads:

- the request's Content-Type names one boundary, which Rack's first-match and last-match
  readings both find, of 1 to 70 characters from RFC 2046's set without space or comma;
- the body starts with the first delimiter; every ``--boundary`` in it is a delimiter on a
  line of its own (CRLF before, CRLF or ``--`` after); only an optional CRLF follows the
  closing one;
- a part head is CRLF-separated ``Name: value`` lines (one space after the colon, no folding)
  naming ``Content-Disposition`` once and ``Content-Type`` and ``Content-Transfer-Encoding``
  at most once, nothing else (no ``Content-ID``);
- the disposition is ``form-data; name=…`` with an optional ``; filename=…`` after it, no
  other parameter, lower-case parameter names, at most 1,536 bytes; a value is a token or a
  quoted string without ``"``, ``\``, ``:``, control characters or the text ``name=`` (so no
  header name and colon hides in it); a name is not empty;
- a part's Content-Type is a bare media type, or one with a ``charset`` of ``utf-8`` or
  ``us-ascii`` (Rack gives the part's name that charset; others make Rack fail or change it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from broker.errors import MultipartError

__all__ = ["MAX_DISPOSITION_BYTES", "MultipartError", "Part", "parse"]

MAX_DISPOSITION_BYTES: Final = 1536
"""Rack 3.1 ignores a longer Content-Disposition (``CONTENT_DISPOSITION_MAX_BYTES``)."""

_TOKEN: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # noqa: S105 - RFC 9110's token, not a secret
# RFC 2046 boundary characters, minus space and ',', where Rack's boundary regex stops.
_BOUNDARY: Final = re.compile(r"[0-9A-Za-z'()+_./:=?-]{1,70}")
# How Rack finds the boundary: 2.2 and 3.1 the first "boundary" after "multipart/" (and
# refuse space before '=' or a second one), 3.0 the last "boundary=" (v2.2.24 multipart.rb:15,
# v3.0.18 parser.rb:22, v3.1.22 parser.rb:36).
_RACK_FIRST_BOUNDARY: Final = re.compile(r'multipart/.*?boundary(\s*)="?([^";,]+)', re.IGNORECASE)
_RACK_LAST_BOUNDARY: Final = re.compile(r'multipart/.*boundary="?([^";,]+)', re.IGNORECASE)
_RACK_ANOTHER_BOUNDARY: Final = re.compile(r"boundary\s*=", re.IGNORECASE)
_HEADER_LINE: Final = re.compile(rf"({_TOKEN}): ([^\r\n \t](?:[^\r\n]*[^\r\n \t])?)")
_VALUE: Final = rf'(?:{_TOKEN}|"[^"\\:\r\n]*")'
# Parameter names are matched exactly, as Rack 3.1 does; the disposition type in any case.
_DISPOSITION: Final = re.compile(rf"(?i:form-data); ?name=({_VALUE})(?:; ?filename=({_VALUE}))?")
_PARAMETER_NAMES: Final = re.compile(r";\s*([^=;\s]+)\s*=")
_NAME_IN_VALUE: Final = re.compile(r"name\s*=", re.IGNORECASE)
_PART_TYPE: Final = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:; ?charset=(?:utf-8|us-ascii))?", re.IGNORECASE
)
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_ONCE: Final = {"content-disposition": 1, "content-type": 1, "content-transfer-encoding": 1}


@dataclass(frozen=True, slots=True)
class Part:
    """One part: its name (as every Rack reads it), its file name if any, its bytes."""

    name: str
    filename: str | None
    content: bytes


def parse(content_type: str, boundary: str | None, body: bytes) -> list[Part]:
    """Split ``body`` into its parts, or raise :class:`MultipartError` naming the problem.

    ``boundary`` is the Content-Type's own ``boundary`` parameter, already parsed.
    """
    delimiter = _checked_boundary(content_type, boundary)
    return [_part(head, content) for head, content in _split(body, delimiter)]


def _checked_boundary(content_type: str, boundary: str | None) -> bytes:
    if boundary is None or _BOUNDARY.fullmatch(boundary) is None:
        raise MultipartError("Content-Type needs a boundary of 1 to 70 plain characters")
    first = _RACK_FIRST_BOUNDARY.match(content_type)
    last = _RACK_LAST_BOUNDARY.match(content_type)
    if (
        first is None
        or first[1]
        or first[2] != boundary
        or _RACK_ANOTHER_BOUNDARY.search(content_type, first.end())
        or last is None
        or last[1] != boundary
    ):
        raise MultipartError(
            "Content-Type must name exactly one boundary, read the same way by every Rack"
        )
    return boundary.encode("ascii")


def _split(body: bytes, boundary: bytes) -> list[tuple[bytes, bytes]]:
    """Each part's head and content; every ``--boundary`` must be a delimiter line."""
    delimiter = b"--" + boundary
    starts: list[int] = []
    position = body.find(delimiter)
    while position >= 0:
        starts.append(position)
        position = body.find(delimiter, position + 1)
    if not starts or starts[0] != 0:
        raise MultipartError("the body must start with the boundary")
    parts: list[tuple[bytes, bytes]] = []
    for number, start in enumerate(starts):
        if start and body[start - 2 : start] != b"\r\n":
            raise MultipartError("a boundary must start a line (after CRLF)")
        after = start + len(delimiter)
        if body[after : after + 2] == b"--":
            if number != len(starts) - 1 or body[after + 2 :] not in {b"", b"\r\n"}:
                raise MultipartError("nothing may follow the closing boundary")
            return parts
        if body[after : after + 2] != b"\r\n":
            raise MultipartError("a boundary must end its line (with CRLF)")
        end = starts[number + 1] - 2 if number + 1 < len(starts) else len(body)
        part = body[after + 2 : end]
        head_end = part.find(b"\r\n\r\n")
        if head_end < 0:
            raise MultipartError("a part needs its headers and a blank line")
        parts.append((part[:head_end], part[head_end + 4 :]))
    raise MultipartError("the closing boundary is missing")


def _part(head_bytes: bytes, content: bytes) -> Part:
    try:
        head = head_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise MultipartError("part headers must be UTF-8") from None
    headers: dict[str, str] = {}
    for line in head.split("\r\n"):
        header = _HEADER_LINE.fullmatch(line)
        if header is None:
            raise MultipartError(f"part header line {_shown(line)} is not 'Name: value'")
        name = header[1].lower()
        if name not in _ONCE:
            raise MultipartError(
                f"part header {_shown(header[1])} is not accepted (Rack reads Content-ID and "
                "others as names): send Content-Disposition and Content-Type only"
            )
        if name in headers:
            raise MultipartError(f"part header {_shown(header[1])} is repeated")
        headers[name] = header[2]
    disposition = headers.get("content-disposition")
    if disposition is None:
        raise MultipartError("each part needs a Content-Disposition")
    part_type = headers.get("content-type")
    if part_type is not None and _PART_TYPE.fullmatch(part_type) is None:
        raise MultipartError(
            f"part Content-Type {_shown(part_type)} must be a media type, with at most a "
            "charset of utf-8 or us-ascii"
        )
    encoding = headers.get("content-transfer-encoding")
    if encoding is not None and re.fullmatch(_TOKEN, encoding) is None:
        raise MultipartError("part Content-Transfer-Encoding must be a single token")
    name, filename = _disposition(disposition)
    return Part(name, filename, content)


def _disposition(value: str) -> tuple[str, str | None]:
    if len(value) > MAX_DISPOSITION_BYTES:
        raise MultipartError(f"Content-Disposition is over {MAX_DISPOSITION_BYTES} bytes")
    found = _DISPOSITION.fullmatch(value)
    names = _PARAMETER_NAMES.findall(value)
    if found is None or any(name not in {"name", "filename"} for name in names):
        raise MultipartError(
            f'Content-Disposition {_shown(value)} must be form-data; name="…", optionally '
            'followed by ; filename="…" (lower-case, nothing else)'
        )
    name = _unquoted(found[1])
    filename = None if found[2] is None else _unquoted(found[2])
    if not name:
        raise MultipartError("a part name must not be empty")
    for text in (name, filename or ""):
        if _NAME_IN_VALUE.search(text) or _CONTROL.search(text):
            raise MultipartError(
                f"{_shown(text)}: a value must hold neither 'name=' nor control characters"
            )
    return name, filename


def _unquoted(value: str) -> str:
    return value[1:-1] if value.startswith('"') else value


def _shown(text: str) -> str:
    return repr(text if len(text) <= 100 else text[:100] + "...")  # noqa: PLR2004
