"""Request parameters the way Rails reads them.

Canvas takes parameters from the query string and from the body (form-urlencoded, multipart or
JSON), with Rack's bracket nesting (`assignment[name]=x` becomes `{"assignment": {"name": "x"}}`,
`a[]=1&a[]=2` becomes a list). When a key is in both, the query string wins, as in Rails.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.formparsers import MultiPartException, MultiPartParser

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Iterable

    from starlette.datastructures import Headers

_BRACKETED_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])+)$")
_SUBKEY = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True)
class RequestParams:
    """The parameters of one request, by where they came from."""

    query: dict[str, Any]
    body: dict[str, Any]
    body_is_form: bool
    """True when the body was form-urlencoded or multipart (Rack's `req.POST`)."""
    body_error: str | None = None
    """Why the body could not be parsed, if it could not (Rails answers 400)."""

    @property
    def merged(self) -> dict[str, Any]:
        """Rails's `params`: body parameters overlaid with query parameters."""
        return {**self.body, **self.query}


def nest_params(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Build Rack-style nested parameters from flat `(key, value)` pairs."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        match = _BRACKETED_KEY.match(key)
        path = [match.group(1), *_SUBKEY.findall(match.group(2))] if match else [key]
        appends = path[-1] == "" and len(path) > 1
        if appends:
            path.pop()
        if "" in path:
            # Rack's `a[][b]` forms (arrays of hashes) are not needed here; keep the key as sent.
            path, appends = [key], False
        node = root
        for segment in path[:-1]:
            child = node.get(segment)
            if not isinstance(child, dict):
                child = {}
                node[segment] = child
            node = child
        if appends:
            existing = node.get(path[-1])
            node[path[-1]] = [*existing, value] if isinstance(existing, list) else [value]
        else:
            node[path[-1]] = value
    return root


def parse_query(query_string: str) -> dict[str, Any]:
    """Parse a raw query string into nested parameters."""
    return nest_params(parse_qsl(query_string, keep_blank_values=True))


async def _single_chunk(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def _parse_multipart(headers: Headers, body: bytes) -> dict[str, Any]:
    form = await MultiPartParser(headers, _single_chunk(body)).parse()
    try:
        # Uploaded files are not parameters Canvas acts on here; only text fields are kept.
        return nest_params((k, v) for k, v in form.multi_items() if isinstance(v, str))
    finally:
        await form.close()


async def _parse_body(headers: Headers, body: bytes) -> tuple[dict[str, Any], bool, str | None]:
    """Return the body's parameters, whether it was a form, and why parsing failed, if it did."""
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/x-www-form-urlencoded":
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        return nest_params(pairs), True, None
    if media_type == "multipart/form-data":
        try:
            return await _parse_multipart(headers, body), True, None
        except MultiPartException as exc:
            return {}, True, exc.message
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            document = json.loads(body)
        except ValueError as exc:
            return {}, False, f"invalid JSON: {exc}"
        return (document if isinstance(document, dict) else {}), False, None
    return {}, False, None


async def parse_request_params(headers: Headers, query_string: str, body: bytes) -> RequestParams:
    """Parse a request's query string and body; a malformed body is reported, never raised."""
    if not body:
        return RequestParams(parse_query(query_string), {}, body_is_form=False)
    fields, is_form, error = await _parse_body(headers, body)
    return RequestParams(parse_query(query_string), fields, body_is_form=is_form, body_error=error)
