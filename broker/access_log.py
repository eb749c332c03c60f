"""The access log: one JSON line per HTTP request (docs/deployment.md#access-log).

Written by ``BrokerApp`` for every request, proxied or not, after its response: time, request
id, method, path, query, status, duration, peer address, and who called (the proxy client's
id, or the admin key's id). Query values of sensitive parameters (``access_token``,
``client_secret``, … and ``BROKER_AUDIT_SENSITIVE_PARAMS``) are replaced by ``[redacted]``
with the audit log's own redaction (``broker.core.rules.redact_query``), so no secret a
client puts in a URL reaches the log. Headers and bodies are never logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

from broker.core.rules import redact_query

if TYPE_CHECKING:
    from starlette.types import Scope

LOGGER_NAME: Final = "broker.access"
REDACTED: Final = "[redacted]"
CLIENT_KEY: Final = "broker.client_id"
"""Scope key under which the proxy leaves the id of the client its token named."""

logger = logging.getLogger(LOGGER_NAME)


def _redacted(_value: str) -> str:
    return REDACTED


class _StandardError(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (as logging's last-resort handler)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        """The stream is always the current standard error."""


def enable() -> None:
    """Send access lines to standard error, message only, unless a handler is configured."""
    if not logger.handlers:
        handler = _StandardError()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        # The line is complete JSON; a root handler would wrap it in another format.
        logger.propagate = False
    logger.setLevel(logging.INFO)


def line(
    scope: Scope,
    *,
    request_id: str | None,
    status: int | None,
    duration_ms: float,
    sensitive: frozenset[str],
) -> str:
    """The JSON access line of one finished request."""
    query = scope.get("query_string") or b""
    state: dict[str, Any] = scope.get("state") or {}
    peer = scope.get("client")
    record = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": request_id,
        "method": scope.get("method"),
        "path": scope.get("path"),
        "query": redact_query(query, _redacted, sensitive) if query else None,
        "status": status,
        "duration_ms": round(duration_ms, 3),
        "client_id": scope.get(CLIENT_KEY),
        "admin_key_id": state.get("actor_key_id"),
        "peer": peer[0] if peer else None,
    }
    return json.dumps(record, separators=(",", ":"))
