"""Audit-log helpers for tests: the ``broker`` command line and direct SQL, as a DBA would."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from broker.core.audit_chain import AuditEvent
from broker.storage.database import create_sync_engine

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from sqlalchemy import Engine, Row

    from broker.keyring import Keyring

BROKER = [sys.executable, "-m", "broker"]


def keys_setting(keyring: Keyring) -> str:
    """``BROKER_KEYS`` for ``keyring``, primary first."""
    return ",".join(
        f"{key_id}:{base64.b64encode(keyring.keys[key_id]).decode()}" for key_id in keyring.ids()
    )


def local_env(database_url: str, keyring: Keyring, **extra: str) -> dict[str, str]:
    """The environment of a local ``broker`` command on this database and keyring."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_DATABASE_URL=database_url, BROKER_KEYS=keys_setting(keyring), **extra)
    return env


def run_broker(
    args: list[str], env: Mapping[str, str], *, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``broker ARGS`` as a user does, capturing its output."""
    return subprocess.run(
        [*BROKER, *args],
        env=dict(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Dba:
    """Someone with write access to the database but not to the keyring."""

    engine: Engine

    @classmethod
    def connect(cls, database_url: str) -> Dba:
        """A DBA session on the test database."""
        return cls(create_sync_engine(database_url, write=True))

    def execute(self, sql: str, **params: Any) -> None:
        """Run statements in one transaction (several separated by ';' are run in turn)."""
        with self.engine.begin() as connection:
            for statement in filter(None, (s.strip() for s in sql.split(";"))):
                connection.execute(text(statement), params)

    def events(self) -> list[Row[Any]]:
        """Every stored audit event, by seq."""
        with self.engine.connect() as connection:
            return list(connection.execute(text("SELECT * FROM audit_events ORDER BY seq")))

    def scalar(self, sql: str, **params: Any) -> Any:
        """One value."""
        with self.engine.connect() as connection:
            return connection.execute(text(sql), params).scalar()

    def dump(self) -> Iterator[str]:
        """Every value of every broker table, as text."""
        with self.engine.connect() as connection:
            tables = [
                "upstreams",
                "credentials",
                "clients",
                "proxy_tokens",
                "admin_keys",
                "audit_events",
                "audit_head",
                "audit_checkpoints",
            ]
            for table in tables:
                for row in connection.execute(text(f"SELECT * FROM {table}")):  # noqa: S608
                    yield from (str(value) for value in row)

    def close(self) -> None:
        """Release the connection."""
        self.engine.dispose()


def forged_mac() -> str:
    """A MAC that looks like the broker's but is made with a key the broker never had."""
    return hmac.new(secrets.token_bytes(32), secrets.token_bytes(16), hashlib.sha256).hexdigest()


def fill_audit_log(database_url: str, keyring: Keyring, calls: int, *, batch: int = 2500) -> int:
    """Chain four realistic events per call into the log; returns how many reviews show.

    Each call is a forwarded request (a pending event and its completion), a refusal and a
    token mint: four events, three as review and export show them (completions merge).
    """
    from broker.services.audit import chain_key  # noqa: PLC0415
    from broker.storage.audit_chain import append, lock_head  # noqa: PLC0415
    from broker.storage.models import utcnow  # noqa: PLC0415

    engine = create_sync_engine(database_url, write=True)
    key = chain_key(keyring)
    try:
        for start in range(0, calls, batch):
            with engine.begin() as connection:
                seq = lock_head(connection).last_seq
                events: list[dict[str, Any]] = []
                for n in range(start, min(start + batch, calls)):
                    now = utcnow()
                    common = {
                        "time": now,
                        "request_id": f"fill{n:08d}",
                        "client_id": "cli_fill",
                        "token_id": "tok_fill",
                        "source_ip": "10.0.0.7",
                        "user_agent": "python-requests/2.32",
                    }
                    call = {
                        **common,
                        "kind": "proxy",
                        "method": "GET",
                        "path": f"/api/v1/courses/{n}/assignments",
                        "query": "per_page=100&page=2",
                        "scope": "url:GET|/api/v1/courses/:course_id/assignments",
                    }
                    events += [
                        {**call, "action": "proxy", "state": "pending", "decision": "allow"},
                        {
                            **common,
                            "kind": "proxy",
                            "action": "proxy.complete",
                            "state": "complete",
                            "decision": "allow",
                            "completes": seq + len(events) + 1,
                            "completed_at": now,
                            "status": 200,
                            "upstream_status": 200,
                            "response_bytes": 2185,
                            "duration_ms": 7.25,
                        },
                        {
                            **call,
                            "action": "proxy",
                            "method": "DELETE",
                            "state": "complete",
                            "decision": "deny",
                            "reason": "scope_not_granted",
                            "status": 403,
                            "completed_at": now,
                        },
                        {
                            **common,
                            "kind": "token",
                            "action": "token.mint",
                            "state": "complete",
                            "decision": "allow",
                            "status": 200,
                            "completed_at": now,
                            "details": {"expires_in": 900, "scopes": [call["scope"]]},
                        },
                    ]
                append(connection, key, [AuditEvent(**event) for event in events])
    finally:
        engine.dispose()
    return calls * 3
