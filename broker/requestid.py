"""The request being handled: its id and the facts management audit events record.

The id goes into responses, logs and audit events; the facts (method, path, source address,
user agent) into the events of the management changes the request makes.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar
from typing import Any

_request_id: ContextVar[str | None] = ContextVar("broker_request_id", default=None)
_request_facts: ContextVar[dict[str, Any] | None] = ContextVar("broker_request_facts", default=None)


def new_request_id() -> str:
    """A fresh request id, made current for this context."""
    value = uuid.uuid4().hex
    _request_id.set(value)
    return value


def current_request_id() -> str:
    """The current request id (a fresh one outside a request, e.g. for CLI actions)."""
    value = _request_id.get()
    return value if value is not None else new_request_id()


def set_request_facts(facts: dict[str, Any]) -> None:
    """Record who sent the current request (method, path, source address, user agent)."""
    _request_facts.set(dict(facts))


def current_request_facts() -> dict[str, Any]:
    """The facts of the current request; empty outside one (the local CLI)."""
    return dict(_request_facts.get() or {})
