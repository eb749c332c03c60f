"""Readiness: can this process serve calls now (``GET /readyz``, docs/interfaces.md#operations).

Four checks, each ``"ok"`` or a one-word state, with one line per failed check in
``problems`` saying what is wrong and what to do (never a secret):

- ``database``: it answers a round trip;
- ``schema``: it is at the migration this broker ships (``broker init`` upgrades it);
- ``keyring``: the keyring encrypts and decrypts, and its key file, if it was re-read since
  start, was usable;
- ``credentials``: one stored worker token per key id in use decrypts: the keyring has every
  key the stored tokens need. (One tampered row is not a reason to take a replica out of
  service, as every replica would refuse it alike; it is a ``503 credential_unavailable``,
  audited and counted, on the calls that need it.)
- ``audit``: the audit path works: after a commit of this process failed or ran past
  ``BROKER_AUDIT_TIMEOUT``, the chain head is taken (and let go) within the bound, as a
  commit would; until then the process is not ready (docs/audit.md#under-faults).

The database checks together are bounded by ``BROKER_AUDIT_TIMEOUT``: a database that stops
answering makes the process not ready within the bound, not a hung ``/readyz``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import text

from broker.errors import DecryptionError
from broker.services.tokens import WORKER_TOKEN_PURPOSE
from broker.storage import credentials
from broker.storage.audit_chain import HEAD, HEAD_ID
from broker.storage.database import ping, schema_problem, schema_revision
from broker.storage.models import utcnow

if TYPE_CHECKING:
    from broker.context import ProcessContext

logger = logging.getLogger(__name__)


@dataclass
class Readiness:
    """Each check's state, and what to do about those that failed."""

    checks: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # Credentials refused until an admin acts: shown, but no reason to take the replica out
    # of service (every replica refuses them alike, and the other credentials still work).
    unavailable_credentials: list[dict[str, str]] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """Whether every check passed."""
        return all(state == "ok" for state in self.checks.values())

    def fail(self, check: str, state: str, problem: str) -> None:
        """Record a failed check."""
        self.checks[check] = state
        self.problems.append(problem)


async def check_readiness(context: ProcessContext) -> Readiness:
    """Run every check against the process's database and keyring."""
    result = Readiness()
    _check_keyring(context, result)
    try:
        async with asyncio.timeout(context.database.timeout), context.sessions() as session:
            await ping(session)
            result.checks["database"] = "ok"
            problem = schema_problem(await schema_revision(session))
            if problem is None:
                result.checks["schema"] = "ok"
            else:
                result.fail("schema", "not_at_head", f"BROKER_DATABASE_URL {problem}")
                return result
            sample = await credentials.sealed_sample(session)
            result.unavailable_credentials = [
                {"name": name, "reason": reason, "action": _ACTIONS.get(reason, "")}
                for name, reason in await credentials.unavailable(session, utcnow())
            ]
    except Exception:
        logger.warning("readiness: the database cannot be read", exc_info=True)
        if "database" not in result.checks:
            result.fail(
                "database",
                "unavailable",
                "BROKER_DATABASE_URL points at a database that does not answer: check that "
                "it is running",
            )
        else:
            result.fail(
                "schema",
                "unreadable",
                "BROKER_DATABASE_URL points at a database whose broker tables cannot be "
                "read: run `broker init`",
            )
        return result
    _check_credentials(context, sample, result)
    await _check_audit(context, result)
    return result


HUB_PROBE_SECONDS = 1.0

_ACTIONS = {
    "not_authorized": "authorise it once: broker credentials authorize NAME",
    "refresh_refused": "Canvas refused to renew it (developer key disabled or access revoked): "
    "check the key in Canvas, then broker credentials authorize NAME",
    "token_expired": "its access token could not be renewed in time: check that Canvas is "
    "reachable; broker credentials get NAME shows the last refresh error",
    "credential_expired": "its manual token expired at Canvas: generate a new one in Canvas and "
    "store it (BROKER_WORKER_TOKEN=... broker credentials rotate NAME)",
}


async def hub_problem(context: ProcessContext) -> str | None:
    """In a worker of ``broker serve --workers N``: why its audit hub cannot be reached, or None.

    The hub lives in the supervising process; a worker that cannot reach it can audit nothing
    and will not recover by itself (docs/deployment.md#processes).
    """
    path = context.settings.audit_socket
    if path is None:
        return None
    try:
        async with asyncio.timeout(HUB_PROBE_SECONDS):
            _reader, writer = await asyncio.open_unix_connection(path)
    except (OSError, TimeoutError):
        return (
            "the audit hub of `broker serve` does not answer (is its supervising process "
            "gone?): calls are refused with 503 audit_unavailable; restart `broker serve`"
        )
    writer.close()
    return None


async def _check_audit(context: ProcessContext, result: Readiness) -> None:
    problem = await hub_problem(context)
    if problem is not None:
        result.fail("audit", "unavailable", problem)
        return
    health = context.audit_writer.health
    bound = context.database.timeout
    started = health.committing_since
    if bound is not None and started is not None and time.monotonic() - started > bound:
        result.fail(
            "audit",
            "unavailable",
            "an audit commit has been running longer than BROKER_AUDIT_TIMEOUT: check the "
            "database; calls are refused with 503 audit_unavailable",
        )
        return
    failure = health.failure
    if failure is not None:
        lock_head = f"SELECT last_seq FROM {HEAD.name} WHERE id = {HEAD_ID}"  # noqa: S608
        if context.database.sqlite_file is None:
            lock_head += " FOR UPDATE"
        try:
            # A write transaction (BEGIN IMMEDIATE on SQLite) that takes the head as a commit
            # would, then lets it go: nothing is written.
            async with asyncio.timeout(context.database.timeout), context.sessions.begin() as s:
                await s.execute(text(lock_head))
        except Exception:  # noqa: BLE001 - whatever the cause, the audit path is not usable
            logger.warning("readiness: the audit chain head cannot be taken (%s)", failure)
            result.fail(
                "audit",
                "unavailable",
                f"audit events cannot be committed ({failure}): check the database and "
                "BROKER_AUDIT_TIMEOUT; calls are refused with 503 audit_unavailable",
            )
            return
        if health.failure == failure:
            health.succeeded()
    result.checks["audit"] = "ok"


def _check_keyring(context: ProcessContext, result: Readiness) -> None:
    keyring = context.keyring
    key_id, blob = keyring.encrypt(b"ready", purpose="readyz", record_id="-")
    if keyring.decrypt(key_id, blob, purpose="readyz", record_id="-") != b"ready":
        result.fail("keyring", "unusable", "the keyring does not decrypt what it encrypts")
        return
    # A key file changed since the last look is re-read here too (cheap: a stat).
    context.keys.reload()
    if context.keys.problem is not None:
        result.fail(
            "keyring",
            "reload_failed",
            f"{context.keys.problem} (this process keeps the keys it had)",
        )
        return
    result.checks["keyring"] = "ok"


def _check_credentials(
    context: ProcessContext, sample: dict[str, credentials.SealedToken], result: Readiness
) -> None:
    failing: list[str] = []
    for credential_id, sealed in sample.items():
        try:
            context.keyring.decrypt(
                sealed.key_id,
                sealed.ciphertext,
                purpose=WORKER_TOKEN_PURPOSE,
                record_id=credential_id,
            )
        except DecryptionError:
            failing.append(sealed.key_id)
    if not failing:
        result.checks["credentials"] = "ok"
        return
    names = ", ".join(repr(key_id) for key_id in sorted(failing))
    known = ", ".join(repr(key_id) for key_id in context.keyring.ids())
    result.fail(
        "credentials",
        "undecryptable",
        f"worker tokens sealed under key {names} do not decrypt with this process's keyring "
        f"(keys {known}): give it that key (BROKER_KEY_FILE or BROKER_KEYS; see "
        "docs/storage-and-keys.md#key-rotation)",
    )
