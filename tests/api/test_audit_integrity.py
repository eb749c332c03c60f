"""The audit chain against a malicious DBA (docs/audit.md#verification).

Real traffic first (proxied calls, refusals, token mints and revocations, admin actions through
the API), then direct SQL on the test database. Verification through the API
(``GET /broker/v1/audit/verify``) and through the command line (``broker audit verify``) must
each name the first problem and its seq.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from broker.app import create_app
from broker.context import ProcessContext
from broker.core.tokens import SecretKind, generate_secret
from broker.keyring import Keyring, load_key_file, write_key_file
from broker.services.audit import AuditService, new_event
from tests.support.audit import Dba, forged_mac, keys_setting, local_env, run_broker
from tests.support.env import bearer

if TYPE_CHECKING:
    import subprocess
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from sqlalchemy import Row

    from tests.support.env import BrokerEnv

V1 = "/broker/v1"
VERIFY = f"{V1}/audit/verify"
COURSE = "/api/v1/courses/1201"
ASSIGNMENTS = "/api/v1/courses/1201/assignments"


@pytest.fixture
def dba(env: BrokerEnv) -> Iterator[Dba]:
    """Direct write access to the broker's database, without the keyring."""
    connection = Dba.connect(env.context.settings.async_database_url)
    yield connection
    connection.close()


async def make_traffic(env: BrokerEnv, name: str) -> str:
    """Every kind of event through the real API; returns the client id. Waits until committed."""
    client_id, secret = await env.client(name)
    token = await env.token(client_id, secret)
    spare = await env.token(client_id, secret)
    statuses = [
        (await env.http.get(COURSE, headers=bearer(token))).status_code,
        (await env.http.get(ASSIGNMENTS, headers=bearer(token))).status_code,
        (await env.http.delete(COURSE, headers=bearer(token))).status_code,
        (await env.http.get(COURSE)).status_code,
        (
            await env.http.post(
                f"{V1}/oauth/token",
                data={"grant_type": "client_credentials"},
                auth=(client_id, generate_secret(SecretKind.CLIENT_SECRET)),
            )
        ).status_code,
        (
            await env.http.post(
                f"{V1}/oauth/revoke", data={"token": spare}, auth=(client_id, secret)
            )
        ).status_code,
        (
            await env.http.patch(
                f"{V1}/clients/{client_id}", headers=env.admin(), json={"token_ttl": 300}
            )
        ).status_code,
        (
            await env.http.post(f"{V1}/clients/{client_id}/revoke-tokens", headers=env.admin())
        ).status_code,
        (await env.http.get(COURSE, headers=bearer(token))).status_code,
    ]
    assert statuses == [200, 200, 403, 401, 401, 200, 200, 200, 401]
    await env.context.audit_writer.flush()
    return client_id


@dataclass
class Logged:
    """The stored events after the traffic, by seq."""

    rows: list[Row[Any]]

    def seq(self, **columns: Any) -> int:
        """The seq of the first event with these column values."""
        for row in self.rows:
            if all(getattr(row, name) == value for name, value in columns.items()):
                seq: int = row.seq
                return seq
        raise AssertionError(f"no event with {columns}")

    def row(self, seq: int) -> Row[Any]:
        """The event at ``seq``."""
        [row] = [row for row in self.rows if row.seq == seq]
        return row

    @property
    def last(self) -> int:
        """The newest seq."""
        seq: int = self.rows[-1].seq
        return seq


@pytest.fixture
async def logged(env: BrokerEnv, dba: Dba) -> Logged:
    await make_traffic(env, "nightly-sync")
    rows = dba.events()
    assert {row.kind for row in rows} == {"admin", "token", "proxy"}
    assert {row.decision for row in rows} == {"allow", "deny"}
    return Logged(rows)


class Verify:
    """Runs verification through the API and through ``broker audit verify``."""

    def __init__(self, env: BrokerEnv, http: httpx.AsyncClient | None = None) -> None:
        self.env = env
        self.http = http or env.http
        self.cli_env = local_env(env.context.settings.database_url, env.context.keyring)

    async def api(self, key: str | None = None) -> dict[str, Any]:
        """The API's report, read with the auditor key (or ``key``)."""
        headers = {"Authorization": f"Bearer {key or self.env.auditor_key}"}
        response = await self.http.get(VERIFY, headers=headers)
        assert response.status_code == 200, response.text
        report: dict[str, Any] = response.json()
        return report

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """``broker audit verify ARGS``."""
        return run_broker(["audit", "verify", *args], {**self.cli_env, **env})

    async def broken(self, kind: str, seq: int) -> dict[str, Any]:
        """Both report ``kind`` at ``seq``; returns the API's report."""
        report = await self.api()
        assert report["ok"] is False
        assert (report["problem"]["kind"], report["problem"]["seq"]) == (kind, seq), report
        result = self.cli()
        assert result.returncode == 1, result.stdout + result.stderr
        first = result.stdout.splitlines()[0]
        assert first.startswith(f"audit log BROKEN at seq {seq}: {kind} ("), result.stdout
        return report

    async def intact(self) -> dict[str, Any]:
        """Both say the log verifies; returns the API's report."""
        report = await self.api()
        assert report["ok"] is True, report
        assert report["problem"] is None
        result = self.cli()
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("audit log OK\n")
        return report


@pytest.fixture
def verify(env: BrokerEnv) -> Verify:
    return Verify(env)


# An untouched log --------------------------------------------------------------------------


async def test_log_after_real_traffic_verifies_through_api_and_cli(
    logged: Logged, verify: Verify
) -> None:
    report = await verify.intact()
    assert report["checked"] == len(logged.rows)
    assert (report["first_seq"], report["last_seq"]) == (1, logged.last)
    assert report["head"]["seq"] == logged.last
    assert report["head"]["mac"] == logged.rows[-1].mac
    assert report["keys"] == ["k1"]
    assert report["incomplete"] == {"count": 0, "oldest": []}
    assert report["checkpoint"] is None


async def test_cli_json_report_is_the_api_report(logged: Logged, verify: Verify) -> None:
    result = verify.cli("--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == await verify.api()


async def test_cli_summary_names_span_keys_head_and_incomplete(
    logged: Logged, verify: Verify
) -> None:
    result = verify.cli()
    assert result.stdout.splitlines() == [
        "audit log OK",
        f"checked {len(logged.rows)} events from seq 1 to {logged.last}, signed with keys k1",
        f"head: seq {logged.last} mac {logged.rows[-1].mac} (keep a copy outside the broker)",
        "checkpoint: none (nothing has been pruned)",
        "incomplete: none",
    ]


async def test_empty_log_verifies(env: BrokerEnv, dba: Dba) -> None:
    dba.execute("DELETE FROM audit_events; DELETE FROM audit_head")
    report = await Verify(env).intact()
    assert (report["checked"], report["head"]) == (0, None)


async def test_verify_needs_a_reader_key(env: BrokerEnv) -> None:
    assert (await env.http.get(VERIFY)).status_code == 401
    assert (await env.http.get(VERIFY, headers=env.admin())).status_code == 200


# Modified events ---------------------------------------------------------------------------

# (what the DBA does, the SQL, which event)
MODIFICATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "refusal_turned_into_allow": (
        "UPDATE audit_events SET decision = 'allow', reason = NULL, status = 200 WHERE seq = :seq",
        {"kind": "proxy", "method": "DELETE"},
    ),
    "admin_action_blamed_on_another_key": (
        "UPDATE audit_events SET actor_key_id = 'key_someoneelse' WHERE seq = :seq",
        {"action": "client.update"},
    ),
    "call_backdated": (
        "UPDATE audit_events SET time = '2020-01-01 00:00:00' WHERE seq = :seq",
        {"kind": "proxy", "path": ASSIGNMENTS},
    ),
    "bytes_sent_hidden": (
        "UPDATE audit_events SET response_bytes = 10 WHERE seq = :seq",
        {"action": "proxy.complete"},
    ),
    "mac_removed": (
        "UPDATE audit_events SET mac = NULL WHERE seq = :seq",
        {"action": "token.mint"},
    ),
}


@pytest.mark.parametrize("how", list(MODIFICATIONS))
async def test_modified_event_is_reported_at_its_seq(
    logged: Logged, dba: Dba, verify: Verify, how: str
) -> None:
    sql, which = MODIFICATIONS[how]
    seq = logged.seq(**which)
    dba.execute(sql, seq=seq)
    report = await verify.broken("modified", seq)
    assert report["checked"] == seq - 1


# Deleted events ----------------------------------------------------------------------------


async def test_deleted_event_in_the_middle_is_reported_missing(
    logged: Logged, dba: Dba, verify: Verify
) -> None:
    seq = logged.seq(kind="proxy", method="DELETE")
    dba.execute("DELETE FROM audit_events WHERE seq = :seq", seq=seq)
    report = await verify.broken("missing", seq)
    assert report["problem"]["detail"] == f"event {seq} is not in the log"


async def test_deleted_run_of_events_is_reported_missing_from_its_first(
    logged: Logged, dba: Dba, verify: Verify
) -> None:
    first = logged.seq(action="token.mint")
    dba.execute("DELETE FROM audit_events WHERE seq BETWEEN :a AND :b", a=first, b=first + 3)
    report = await verify.broken("missing", first)
    assert report["problem"]["detail"] == f"events {first} to {first + 3} are not in the log"


async def test_newest_events_cut_off_are_reported_missing_through_the_head(
    logged: Logged, dba: Dba, verify: Verify
) -> None:
    dba.execute("DELETE FROM audit_events WHERE seq > :keep", keep=logged.last - 3)
    report = await verify.broken("missing", logged.last - 2)
    assert "cut off the end" in report["problem"]["detail"]


# Inserted events ---------------------------------------------------------------------------

FORGED_COLUMNS = (
    "time, request_id, kind, action, state, decision, method, path, status, prev_mac, mac, mac_key"
)


def forge(dba: Dba, seq: int, prev_mac: str) -> None:
    """Insert a plausible allowed call at ``seq``, chained to ``prev_mac``, signed as k1."""
    dba.execute(
        f"INSERT INTO audit_events (seq, {FORGED_COLUMNS}) VALUES (:seq, '2026-11-26 09:00:00', "  # noqa: S608
        "'forged', 'proxy', 'proxy', 'complete', 'allow', 'GET', '/api/v1/courses/1201', 200, "
        ":prev, :mac, 'k1')",
        seq=seq,
        prev=prev_mac,
        mac=forged_mac(),
    )


async def test_event_forged_into_the_middle_by_renumbering_is_reported_inserted(
    logged: Logged, dba: Dba, verify: Verify
) -> None:
    seq = logged.seq(kind="proxy", method="DELETE")
    # Two steps, so no seq is ever held twice (PostgreSQL checks the key on every row).
    dba.execute(
        "UPDATE audit_events SET seq = seq + 1000000 WHERE seq >= :seq; "
        "UPDATE audit_events SET seq = seq - 999999 WHERE seq > 1000000",
        seq=seq,
    )
    forge(dba, seq, prev_mac=logged.row(seq - 1).mac)
    report = await verify.broken("inserted", seq)
    assert "not written by the broker" in report["problem"]["detail"]


async def test_event_forged_onto_the_end_is_reported_inserted(
    logged: Logged, dba: Dba, verify: Verify
) -> None:
    forge(dba, logged.last + 1, prev_mac=logged.rows[-1].mac)
    report = await verify.broken("inserted", logged.last + 1)
    assert report["problem"]["detail"] == "events after the signed head of the log"


async def test_forged_event_with_the_head_moved_onto_it_is_reported(
    logged: Logged, dba: Dba, verify: Verify
) -> None:
    forge(dba, logged.last + 1, prev_mac=logged.rows[-1].mac)
    dba.execute(
        "UPDATE audit_head SET last_seq = :seq, last_mac = "
        "(SELECT mac FROM audit_events WHERE seq = :seq)",
        seq=logged.last + 1,
    )
    await verify.broken("modified", logged.last + 1)


# Reordered events --------------------------------------------------------------------------


@pytest.mark.parametrize(("distance", "predecessor_now_at"), [(1, 1), (4, 3)])
async def test_swapped_events_are_reported_reordered(
    logged: Logged, dba: Dba, verify: Verify, distance: int, predecessor_now_at: int
) -> None:
    first = logged.seq(action="token.mint")
    dba.execute(
        "UPDATE audit_events SET seq = -1 WHERE seq = :a; "
        "UPDATE audit_events SET seq = :a WHERE seq = :b; "
        "UPDATE audit_events SET seq = :b WHERE seq = -1",
        a=first,
        b=first + distance,
    )
    report = await verify.broken("reordered", first)
    now_at = first + predecessor_now_at
    assert report["problem"]["detail"] == (
        f"this event was written after the event now at seq {now_at}"
    )


# The head ----------------------------------------------------------------------------------


async def test_head_moved_back_is_reported_modified(
    logged: Logged, dba: Dba, verify: Verify
) -> None:
    dba.execute("UPDATE audit_head SET last_seq = last_seq - 1")
    report = await verify.broken("modified", logged.last - 1)
    assert report["problem"]["detail"] == "the chain head was altered"


async def test_head_deleted_is_reported_modified(logged: Logged, dba: Dba, verify: Verify) -> None:
    dba.execute("DELETE FROM audit_head")
    report = await verify.broken("modified", logged.last)
    assert report["problem"]["detail"] == "the chain head is missing"


async def test_head_and_newest_events_cut_together_are_reported(
    logged: Logged, dba: Dba, verify: Verify
) -> None:
    keep = logged.rows[-4]
    dba.execute(
        "DELETE FROM audit_events WHERE seq > :seq; "
        "UPDATE audit_head SET last_seq = :seq, last_mac = :mac",
        seq=keep.seq,
        mac=keep.mac,
    )
    await verify.broken("modified", keep.seq)


# A head kept outside the broker -------------------------------------------------------------


def head_of(report: dict[str, Any]) -> str:
    """``SEQ:MAC`` of a verify report's head, as an investigator keeps it."""
    return f"{report['head']['seq']}:{report['head']['mac']}"


async def test_earlier_head_still_in_the_chain_verifies(
    env: BrokerEnv, logged: Logged, verify: Verify
) -> None:
    kept = head_of(await verify.api())
    await make_traffic(env, "later")
    response = await env.http.get(VERIFY, params={"expect_head": kept}, headers=env.auditor())
    report = response.json()
    assert report["ok"] is True
    assert report["earlier_head"]["found"] == "in_chain"
    assert report["head"]["seq"] > logged.last
    result = verify.cli("--expect-head", kept)
    assert result.returncode == 0, result.stdout
    assert f"earlier head seq {logged.last}: still in the chain" in result.stdout.splitlines()


async def test_log_replaced_after_an_earlier_head_is_reported(
    env: BrokerEnv, logged: Logged, dba: Dba, verify: Verify
) -> None:
    kept = head_of(await verify.api())
    # A wipe of log and head: on its own, the log now looks like a new install.
    dba.execute("DELETE FROM audit_events; DELETE FROM audit_head")
    await make_traffic(env, "after-wipe")
    assert (await verify.api())["ok"] is True
    short = (await env.http.get(VERIFY, params={"expect_head": kept}, headers=env.auditor())).json()
    assert (short["problem"]["kind"], short["problem"]["seq"]) == (
        "missing",
        short["head"]["seq"] + 1,
    )

    for name in ("again", "and-again", "once-more"):
        if short["head"]["seq"] > logged.last:
            break
        await make_traffic(env, name)
        short = await verify.api()
    assert short["head"]["seq"] > logged.last, "the new log did not grow past the old head"
    response = await env.http.get(VERIFY, params={"expect_head": kept}, headers=env.auditor())
    report = response.json()
    assert (report["ok"], report["problem"]["kind"]) == (False, "modified")
    assert report["problem"]["seq"] == logged.last
    assert "replaced" in report["problem"]["detail"]
    result = verify.cli("--expect-head", kept)
    assert result.returncode == 1
    assert result.stdout.startswith(f"audit log BROKEN at seq {logged.last}: modified (")


async def test_earlier_head_pruned_since_is_reported_as_not_compared(
    env: BrokerEnv, logged: Logged, verify: Verify
) -> None:
    kept = head_of(await verify.api())
    await make_traffic(env, "later")
    cut = {"before": datetime.now(UTC).isoformat()}
    await make_traffic(env, "latest")
    assert (await env.http.post(f"{V1}/audit/prune", headers=env.admin(), json=cut)).is_success
    response = await env.http.get(VERIFY, params={"expect_head": kept}, headers=env.auditor())
    assert response.json()["earlier_head"]["found"] == "pruned"
    assert "earlier head seq" in verify.cli("--expect-head", kept).stdout


@pytest.mark.parametrize("kept", ["12", "x:" + "0" * 64, "12:" + "g" * 64, "12:abc"])
async def test_malformed_earlier_head_is_refused(env: BrokerEnv, verify: Verify, kept: str) -> None:
    response = await env.http.get(VERIFY, params={"expect_head": kept}, headers=env.auditor())
    assert response.status_code == 400
    assert "SEQ:MAC" in response.json()["message"]
    assert verify.cli("--expect-head", kept).returncode == 2


# Incomplete events -------------------------------------------------------------------------


@pytest.fixture
def audit_service(env: BrokerEnv) -> AuditService:
    """The audit service of the env's process (same writer, same keyring)."""
    context = env.context
    return AuditService(context.sessions, context.audit_writer, context.keyring, context.database)


async def test_pending_event_without_completion_is_shown_pending_and_counted(
    env: BrokerEnv, logged: Logged, audit_service: AuditService, verify: Verify
) -> None:
    # What a crash between forwarding and recording the outcome leaves behind.
    begun = await audit_service.begin(
        new_event(
            request_id="crashed-call",
            kind="proxy",
            action="proxy",
            decision="allow",
            method="GET",
            path=COURSE,
        )
    )
    [pending] = await env.audit(state="pending")
    assert (pending["seq"], pending["request_id"]) == (begun.seq, "crashed-call")
    assert (pending["state"], pending["completion_seq"], pending["status"]) == (
        "pending",
        None,
        None,
    )
    newest = (await env.audit(limit=1))[0]
    assert (newest["seq"], newest["state"]) == (begun.seq, "pending")

    report = await verify.intact()
    assert report["incomplete"] == {"count": 1, "oldest": [begun.seq]}
    summary = verify.cli().stdout.splitlines()
    assert f"incomplete: 1 pending events never completed (oldest seqs {begun.seq})" in summary


async def test_completed_call_is_shown_complete_with_its_completion_seq(
    env: BrokerEnv, logged: Logged
) -> None:
    [call] = await env.audit(kind="proxy", path_prefix=ASSIGNMENTS)
    completion = logged.seq(action="proxy.complete", request_id=call["request_id"])
    assert (call["state"], call["completion_seq"], call["status"]) == ("complete", completion, 200)
    assert await env.audit(state="pending") == []


# Key rotation ------------------------------------------------------------------------------


async def test_key_rotation_keeps_older_events_verifiable_and_losing_the_old_key_is_reported(
    env: BrokerEnv, logged: Logged, tmp_path: Path
) -> None:
    key_file = tmp_path / "broker.key"
    write_key_file(key_file, env.context.keyring)
    file_env = {
        **local_env(env.context.settings.database_url, env.context.keyring),
        "BROKER_KEY_FILE": str(key_file),
    }
    del file_env["BROKER_KEYS"]
    rotated = run_broker(["keys", "rotate"], file_env)
    assert rotated.returncode == 0, rotated.stderr
    keyring = load_key_file(key_file)
    assert (keyring.primary_id, sorted(keyring.keys)) == ("k2", ["k1", "k2"])

    # The broker restarted with the new primary; traffic goes on, signed with k2.
    async with served(env, keyring) as http:
        client_id, secret = await client(http, env, "after-rotation")
        token = await mint(http, client_id, secret)
        assert (await http.get(COURSE, headers=bearer(token))).status_code == 200
        created = await http.post(
            f"{V1}/admin-keys", headers=env.admin(), json={"name": "k2-auditor", "role": "auditor"}
        )
        assert created.status_code == 201
        report = await Verify(env, http).api()
        assert (report["ok"], report["keys"]) == (True, ["k1", "k2"])
    result = run_broker(["audit", "verify"], file_env)
    assert result.returncode == 0, result.stdout
    assert "signed with keys k1, k2" in result.stdout

    # Without k1, the events it signed cannot be checked: the first one is reported.
    k2_only = Keyring(primary_id="k2", keys={"k2": keyring.keys["k2"]})
    async with served(env, k2_only) as http:
        report = await Verify(env, http).api(key=created.json()["key"])
        assert report["ok"] is False
        assert (report["problem"]["kind"], report["problem"]["seq"]) == ("unknown_key", 1)
    lost = run_broker(["audit", "verify"], {**file_env, "BROKER_KEYS": keys_setting(k2_only)})
    assert lost.returncode == 1
    assert lost.stdout.startswith("audit log BROKEN at seq 1: unknown_key (")


@asynccontextmanager
async def served(env: BrokerEnv, keyring: Keyring) -> AsyncIterator[httpx.AsyncClient]:
    """The broker restarted on the same database with another keyring, driven over ASGI."""
    context = ProcessContext.from_settings(env.context.settings, keyring=keyring)
    transport = httpx.ASGITransport(app=create_app(context=context))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
            yield http
    finally:
        await context.aclose()


async def client(http: httpx.AsyncClient, env: BrokerEnv, name: str) -> tuple[str, str]:
    """Create a client as the env's admin; returns its id and secret."""
    response = await http.post(
        f"{V1}/clients",
        headers=env.admin(),
        json={"name": name, "credential": "worker", "scopes": ["url:GET|/api/v1/courses/:id"]},
    )
    assert response.status_code == 201, response.text
    return response.json()["client_id"], response.json()["client_secret"]


async def mint(http: httpx.AsyncClient, client_id: str, secret: str) -> str:
    """A proxy token for the client."""
    response = await http.post(
        f"{V1}/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret)
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


# Retention ---------------------------------------------------------------------------------


@dataclass
class Pruned:
    """Traffic on both sides of a cut."""

    cut: datetime
    older: list[Row[Any]]
    newer: list[Row[Any]]


@pytest.fixture
async def around_cut(env: BrokerEnv, dba: Dba) -> Pruned:
    await make_traffic(env, "before-cut")
    cut = datetime.now(UTC)
    await make_traffic(env, "after-cut")
    rows = dba.events()
    older = [row for row in rows if stored_time(row.time) < cut.replace(tzinfo=None)]
    return Pruned(cut, older, rows[len(older) :])


def stored_time(value: Any) -> datetime:
    """A time column read with plain SQL: a datetime (PostgreSQL) or text (SQLite), naive UTC."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


async def test_cli_prune_removes_older_events_behind_a_checkpoint_and_the_log_verifies(
    env: BrokerEnv, dba: Dba, around_cut: Pruned, verify: Verify
) -> None:
    through = around_cut.older[-1].seq
    result = run_broker(
        ["audit", "prune", "--yes", "--before", around_cut.cut.isoformat()], verify.cli_env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"pruned {len(around_cut.older)} events older than {around_cut.cut.isoformat()} "
        f"(through seq {through}; 0 incomplete)"
    )
    assert lines[1].startswith(
        f"checkpoint: events through seq {through} pruned ({len(around_cut.older)} events"
    )
    remaining = dba.events()
    assert [row.seq for row in remaining[: len(around_cut.newer)]] == [
        r.seq for r in around_cut.newer
    ]
    [prune] = remaining[len(around_cut.newer) :]
    assert (prune.action, prune.actor_key_id, prune.decision) == ("audit.prune", None, "allow")
    assert lines[2] == f"recorded as audit event {prune.seq} (audit.prune)"

    report = await verify.intact()
    assert report["checkpoint"]["through_seq"] == through
    assert report["checkpoint"]["events_pruned"] == len(around_cut.older)
    assert report["checked"] == len(around_cut.newer) + 1
    assert report["first_seq"] == through + 1
    summary = verify.cli().stdout
    assert f"checkpoint: events through seq {through} pruned" in summary


async def test_api_prune_is_admin_only_and_audited_with_what_it_removed(
    env: BrokerEnv, dba: Dba, around_cut: Pruned, verify: Verify
) -> None:
    body = {"before": around_cut.cut.isoformat()}
    refused = await env.http.post(f"{V1}/audit/prune", headers=env.auditor(), json=body)
    assert refused.status_code == 403
    response = await env.http.post(f"{V1}/audit/prune", headers=env.admin(), json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    through = around_cut.older[-1].seq
    assert (result["pruned"], result["through_seq"]) == (len(around_cut.older), through)
    assert result["checkpoint"]["through_seq"] == through

    [event] = await env.audit(action="audit.prune")
    assert event["seq"] == result["seq"]
    assert event["request_id"] == response.headers["x-request-id"]
    assert event["actor_key_id"] is not None
    assert event["details"]["changes"]["pruned"] == len(around_cut.older)
    assert event["details"]["changes"]["through_seq"] == through
    assert dba.scalar("SELECT min(seq) FROM audit_events") == through + 1
    assert (await verify.intact())["checkpoint"]["through_seq"] == through


async def test_second_prune_extends_the_checkpoint_and_the_log_still_verifies(
    env: BrokerEnv, around_cut: Pruned, verify: Verify
) -> None:
    first = {"before": around_cut.cut.isoformat()}
    assert (await env.http.post(f"{V1}/audit/prune", headers=env.admin(), json=first)).is_success
    await make_traffic(env, "later")
    second = {"before": datetime.now(UTC).isoformat()}
    response = await env.http.post(f"{V1}/audit/prune", headers=env.admin(), json=second)
    assert response.status_code == 200, response.text
    report = await verify.intact()
    assert report["checkpoint"]["through_seq"] == response.json()["through_seq"]
    assert report["checked"] == 1  # only the second prune's own event is left


async def test_prune_refuses_when_the_events_to_remove_do_not_verify(
    env: BrokerEnv, dba: Dba, around_cut: Pruned, verify: Verify
) -> None:
    tampered = around_cut.older[3].seq
    dba.execute("UPDATE audit_events SET request_id = 'rewritten' WHERE seq = :seq", seq=tampered)
    count = len(dba.events())

    result = run_broker(
        ["audit", "prune", "--yes", "--before", around_cut.cut.isoformat()], verify.cli_env
    )
    assert result.returncode == 1
    assert f"refusing to prune: event {tampered} is modified" in result.stderr
    response = await env.http.post(
        f"{V1}/audit/prune", headers=env.admin(), json={"before": around_cut.cut.isoformat()}
    )
    assert response.status_code == 409
    assert response.json()["error"] == "audit_chain_broken"

    assert dba.scalar("SELECT count(*) FROM audit_checkpoints") == 0
    refusals = await env.audit(action="audit.prune", decision="deny")
    assert [e["reason"] for e in refusals] == ["audit_chain_broken", "audit_chain_broken"]
    assert len(dba.events()) == count + 2
    await verify.broken("modified", tampered)


async def test_prune_refuses_a_date_in_the_future(env: BrokerEnv, verify: Verify) -> None:
    response = await env.http.post(
        f"{V1}/audit/prune", headers=env.admin(), json={"before": "2999-01-01T00:00:00Z"}
    )
    assert response.status_code == 422
    result = run_broker(["audit", "prune", "--yes", "--before", "2999-01-01"], verify.cli_env)
    assert result.returncode == 1
    assert "before: must not be in the future" in result.stderr


async def test_deleted_checkpoint_shows_the_pruned_events_as_missing(
    env: BrokerEnv, dba: Dba, around_cut: Pruned, verify: Verify
) -> None:
    body = {"before": around_cut.cut.isoformat()}
    assert (await env.http.post(f"{V1}/audit/prune", headers=env.admin(), json=body)).is_success
    dba.execute("DELETE FROM audit_checkpoints")
    report = await verify.broken("missing", 1)
    through = around_cut.older[-1].seq
    assert report["problem"]["detail"] == f"events 1 to {through} are not in the log"


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit_checkpoints SET events_pruned = events_pruned - 1",
        "UPDATE audit_checkpoints SET through_seq = through_seq + 1",
    ],
)
async def test_altered_checkpoint_is_reported_modified(
    env: BrokerEnv, dba: Dba, around_cut: Pruned, verify: Verify, sql: str
) -> None:
    body = {"before": around_cut.cut.isoformat()}
    assert (await env.http.post(f"{V1}/audit/prune", headers=env.admin(), json=body)).is_success
    dba.execute(sql)
    stored = dba.scalar("SELECT through_seq FROM audit_checkpoints")
    report = await verify.broken("modified", stored)
    assert report["problem"]["detail"] == (
        f"the retention checkpoint through seq {stored} does not match its MAC (altered or forged)"
    )


async def test_verify_reports_configuration_errors_with_exit_2(
    env: BrokerEnv, tmp_path: Path, verify: Verify
) -> None:
    no_keys = {**verify.cli_env, "BROKER_KEY_FILE": str(tmp_path / "missing.key")}
    del no_keys["BROKER_KEYS"]
    missing = run_broker(["audit", "verify"], no_keys)
    assert missing.returncode == 2
    assert "BROKER_KEY_FILE" in missing.stderr
    bad_url = run_broker(
        ["audit", "verify"], {**verify.cli_env, "BROKER_DATABASE_URL": "mysql://x/y"}
    )
    assert (bad_url.returncode, "BROKER_DATABASE_URL" in bad_url.stderr) == (2, True)
    no_schema = run_broker(
        ["audit", "verify"],
        {**verify.cli_env, "BROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}"},
    )
    assert no_schema.returncode == 2
    assert no_schema.stderr.startswith("error: cannot read the audit log: ")


async def test_cli_prune_dry_run_says_what_would_go_and_changes_nothing(
    env: BrokerEnv, dba: Dba, around_cut: Pruned, verify: Verify
) -> None:
    before = [row.seq for row in dba.events()]
    through = around_cut.older[-1].seq
    cut = around_cut.cut.isoformat()

    result = run_broker(["audit", "prune", "--dry-run", "--before", cut], verify.cli_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"dry run: would prune {len(around_cut.older)} events older than {cut} "
        f"(through seq {through}; 0 incomplete); they verify. Nothing was changed.\n"
    )
    as_json = run_broker(["audit", "prune", "--dry-run", "--json", "--before", cut], verify.cli_env)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert (report["dry_run"], report["seq"], report["checkpoint"]) == (True, None, None)
    assert (report["pruned"], report["through_seq"]) == (len(around_cut.older), through)
    assert [row.seq for row in dba.events()] == before
    assert dba.scalar("SELECT count(*) FROM audit_checkpoints") == 0

    pruned = run_broker(["audit", "prune", "--yes", "--json", "--before", cut], verify.cli_env)
    assert json.loads(pruned.stdout)["pruned"] == report["pruned"]


async def test_cli_prune_without_yes_off_a_terminal_is_refused_and_changes_nothing(
    dba: Dba, around_cut: Pruned, verify: Verify
) -> None:
    before = [row.seq for row in dba.events()]
    result = run_broker(
        ["audit", "prune", "--before", around_cut.cut.isoformat()], verify.cli_env, stdin=""
    )
    assert result.returncode == 1
    assert "refusing to prune without --yes" in result.stderr
    assert [row.seq for row in dba.events()] == before


async def test_prune_dry_run_of_a_tampered_part_is_refused_and_records_nothing(
    env: BrokerEnv, dba: Dba, around_cut: Pruned
) -> None:
    tampered = around_cut.older[2].seq
    dba.execute("UPDATE audit_events SET request_id = 'rewritten' WHERE seq = :seq", seq=tampered)
    count = len(dba.events())
    body = {"before": around_cut.cut.isoformat(), "dry_run": True}
    response = await env.http.post(f"{V1}/audit/prune", headers=env.admin(), json=body)
    assert response.status_code == 409
    assert f"event {tampered} is modified" in response.json()["message"]
    assert len(dba.events()) == count


async def test_api_prune_dry_run_reports_the_real_counts_and_keeps_every_event(
    env: BrokerEnv, dba: Dba, around_cut: Pruned
) -> None:
    before = [row.seq for row in dba.events()]
    body = {"before": around_cut.cut.isoformat(), "dry_run": True}
    response = await env.http.post(f"{V1}/audit/prune", headers=env.admin(), json=body)
    assert response.status_code == 200, response.text
    dry = response.json()
    assert (dry["dry_run"], dry["seq"], dry["pruned"]) == (True, None, len(around_cut.older))
    assert [row.seq for row in dba.events()] == before
    real = await env.http.post(
        f"{V1}/audit/prune", headers=env.admin(), json={"before": body["before"]}
    )
    assert (real.json()["pruned"], real.json()["dry_run"]) == (dry["pruned"], False)


async def test_cli_prune_on_a_terminal_asks_naming_how_many_events_would_go(
    dba: Dba, around_cut: Pruned, verify: Verify
) -> None:
    import os  # noqa: PLC0415
    import pty  # noqa: PLC0415
    import subprocess as sp  # noqa: PLC0415

    from tests.support.audit import BROKER  # noqa: PLC0415

    cut = around_cut.cut.isoformat()

    def answer(reply: bytes) -> subprocess.CompletedProcess[str]:
        controller, terminal = pty.openpty()
        try:
            os.write(controller, reply)
            return sp.run(
                [*BROKER, "audit", "prune", "--before", cut],
                env=verify.cli_env,
                stdin=terminal,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        finally:
            os.close(terminal)
            os.close(controller)

    before = [row.seq for row in dba.events()]
    declined = answer(b"n\n")
    assert declined.returncode == 1
    question = f"Permanently remove {len(around_cut.older)} audit events older than {cut}?"
    assert question in declined.stderr
    assert [row.seq for row in dba.events()] == before
    accepted = answer(b"y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.startswith(f"pruned {len(around_cut.older)} events older than {cut}")
