"""The access log: one JSON line per HTTP request (docs/deployment.md#access-log).

Written by ``BrokerApp`` for every request, proxied or not, after its response: time, request
id, method, path, query, status, duration, peer address, and who called (the proxy client's
id, or the admin key's id). Query values of sensitive parameters (``access_token``,
``client_secret``, … and ``BROKER_AUDIT_SENSITIVE_PARAMS``) are replaced by ``[redacted]``
with the audit log's own redaction (``broker.core.rules.redact_query``), so no secret a
client puts in a URL reaches the log. Headers and bodies are never logged.

The line is on every request's path, so it is cheap: built as text with the C string encoder
that ``json`` uses, the timestamp's seconds formatted once a second; and while the only handler
is the default one (:func:`enable`), lines skip ``logging``'s records and locks and go to
standard error in one write per event-loop turn. A handler anyone adds gets every line as a
log record, as before.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import sys
import time
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any, Final, TextIO

from broker.core.rules import redact_query

if TYPE_CHECKING:
    from starlette.types import Scope

LOGGER_NAME: Final = "broker.access"
REDACTED: Final = "[redacted]"
CLIENT_KEY: Final = "broker.client_id"
"""Scope key under which the proxy leaves the id of the client its token named."""
ANSWER_KEY: Final = "broker.answer"
"""Scope key under which the proxy leaves its answer's request id and status (None if none)."""

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


_default = _StandardError()
_default.setFormatter(logging.Formatter("%(message)s"))


def enable() -> None:
    """Send access lines to standard error, message only, unless a handler is configured."""
    if not logger.handlers:
        logger.addHandler(_default)
        # The line is complete JSON; a root handler would wrap it in another format.
        logger.propagate = False
    logger.setLevel(logging.INFO)


class _Batch:
    """Lines waiting for the end of this event-loop turn, then written to stderr at once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, text: str) -> None:
        if not self.lines:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop here: write now
                self.lines.append(text)
                self.flush()
                return
        self.lines.append(text)

    def flush(self) -> None:
        if not self.lines:
            return
        text = "\n".join(self.lines) + "\n"
        self.lines.clear()
        # A closed or broken stderr loses access lines, never a request (as logging would).
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(text)
            sys.stderr.flush()


_batch = _Batch()
atexit.register(_batch.flush)


def write(text: str) -> None:
    """Log one access line: batched to stderr by default, else through ``logging``."""
    handlers = logger.handlers
    if len(handlers) == 1 and handlers[0] is _default and logger.propagate is False:
        if logger.isEnabledFor(logging.INFO):
            _batch.add(text)
        return
    logger.info(text)


class _Clock:
    """UTC timestamps with milliseconds; the part up to the seconds is formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"


_clock = _Clock()


def _text(value: object) -> str:
    """A JSON string (ASCII, escaped as ``json.dumps`` does) or ``null``."""
    return "null" if value is None else encode_basestring_ascii(str(value))


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
    return (
        f'{{"time":"{_clock.now()}","request_id":{_text(request_id)}'
        f',"method":{_text(scope.get("method"))},"path":{_text(scope.get("path"))}'
        f',"query":{_text(redact_query(query, _redacted, sensitive) if query else None)}'
        f',"status":{"null" if status is None else int(status)}'
        f',"duration_ms":{float(round(duration_ms, 3))!r}'
        f',"client_id":{_text(scope.get(CLIENT_KEY))}'
        f',"admin_key_id":{_text(state.get("actor_key_id"))}'
        f',"peer":{_text(peer[0] if peer else None)}}}'
    )
