"""The request id of the request being handled, for responses, logs and audit events."""

from __future__ import annotations

import uuid
from contextvars import ContextVar

_request_id: ContextVar[str | None] = ContextVar("broker_request_id", default=None)


def new_request_id() -> str:
    """A fresh request id, made current for this context."""
    value = uuid.uuid4().hex
    _request_id.set(value)
    return value


def current_request_id() -> str:
    """The current request id (a fresh one outside a request, e.g. for CLI actions)."""
    value = _request_id.get()
    return value if value is not None else new_request_id()
