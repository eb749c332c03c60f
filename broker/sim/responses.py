"""Canvas-shaped responses: JSON bodies, error bodies, gzip, and the headers Canvas always sends."""

from __future__ import annotations

import gzip
import json
import secrets
import uuid
from typing import TYPE_CHECKING

from starlette.responses import Response

if TYPE_CHECKING:
    from starlette.datastructures import Headers

JSON_MEDIA_TYPE = "application/json; charset=utf-8"
GZIP_MIN_BYTES = 100


def _q_value(parameters: list[str]) -> float:
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


def accepts_gzip(headers: Headers) -> bool:
    """Whether `Accept-Encoding` allows gzip (by name or by `*`) with a non-zero q-value."""
    for entry in headers.get("accept-encoding", "").split(","):
        coding, *parameters = entry.split(";")
        if coding.strip().lower() in {"gzip", "*"} and _q_value(parameters) > 0:
            return True
    return False


def json_response(
    request_headers: Headers,
    payload: object,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """Make a compact JSON response, gzipped when the client accepts it and the body is not tiny."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    extra = dict(headers or {})
    extra["Vary"] = "Accept-Encoding"
    if len(body) > GZIP_MIN_BYTES and accepts_gzip(request_headers):
        # mtime=0 keeps the bytes deterministic, so tests can compare them exactly.
        body = gzip.compress(body, mtime=0)
        extra["Content-Encoding"] = "gzip"
    return Response(body, status_code, extra, media_type=JSON_MEDIA_TYPE)


def error_response(
    request_headers: Headers, status_code: int, message: str, headers: dict[str, str] | None = None
) -> Response:
    """Canvas's error body: `{"errors":[{"message": ...}]}`."""
    return json_response(request_headers, {"errors": [{"message": message}]}, status_code, headers)


def _float_header(value: float) -> str:
    return str(round(value, 6))


def add_canvas_headers(response: Response, cost: float | None, remaining: float) -> None:
    """Add the headers every Canvas API response carries (a throttled one has no cost)."""
    if cost is not None:
        response.headers["X-Request-Cost"] = _float_header(cost)
    response.headers["X-Rate-Limit-Remaining"] = _float_header(remaining)
    response.headers["X-Request-Context-Id"] = str(uuid.uuid4())
    response.headers["Cache-Control"] = "max-age=0, private, must-revalidate"
    response.headers["Set-Cookie"] = (
        f"_normandy_session={secrets.token_urlsafe(16)}; path=/; HttpOnly"
    )
