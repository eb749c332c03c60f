"""The request being handled: its id and the facts management audit events record.

The id goes into responses, logs and audit events; the facts (method, path, source address,
user agent) into the events of the management changes the request makes.

Ids are 32 hex digits: 20 drawn at random once per process, then a 12-digit counter. They are
unique across processes and restarts (80 random bits per process) and cost no system call per
request. They name requests; they are not secrets.
"""

from __future__ import annotations

import itertools
import os
import secrets
from contextvars import ContextVar
from typing import Any

_request_id: ContextVar[str | None] = ContextVar("broker_request_id", default=None)
_request_facts: ContextVar[dict[str, Any] | None] = ContextVar("broker_request_facts", default=None)


class _Ids:
    """A random per-process prefix and a counter."""

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        """Start afresh (a forked child must not repeat its parent's ids)."""
        self.prefix = secrets.token_hex(10)
        self.counter = itertools.count(1)

    def next(self) -> str:
        """The next id."""
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFF:012x}"


_IDS = _Ids()
os.register_at_fork(after_in_child=_IDS.renew)


def new_request_id() -> str:
    """A fresh request id, made current for this context."""
    value = _IDS.next()
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
