"""``broker demo``: the whole product on one machine with no configuration."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import uvicorn

from broker import bootstrap
from broker.app import create_app
from broker.config import Settings
from broker.services.management import ManagementService
from broker.serving import BackgroundServer, RequestTargetProtocol
from broker.sim.server import SimServer
from broker.sim.state import SimState
from broker.storage.database import Database

if TYPE_CHECKING:
    from collections.abc import Iterator

    from broker.keyring import Keyring

DEMO_SCOPES = [
    "url:GET|/api/v1/courses/:id",
    "url:GET|/api/v1/courses/:course_id/assignments",
]
DEMO_CONSTRAINTS = {"id": ["1201"], "course_id": ["1201"]}


@dataclass(frozen=True)
class DemoSetup:
    """Secrets created for the demo (printed once, as their creation output)."""

    broker_url: str
    client_id: str
    client_secret: str
    auditor_key: str
    admin_key: str


def _err(text: str) -> None:
    print(text, file=sys.stderr)  # noqa: T201


async def _provision(
    settings: Settings, keyring: Keyring, sim_url: str, worker_token: str
) -> DemoSetup:
    database = Database(settings.async_database_url, pool=False)
    try:
        service = ManagementService(database.sessions, keyring, settings)
        actor = bootstrap.LOCAL
        _admin, admin_key = await service.create_admin_key(actor, name="demo-admin", role="admin")
        _auditor, auditor_key = await service.create_admin_key(
            actor, name="demo-auditor", role="auditor"
        )
        await service.create_upstream(actor, name="demo-canvas", base_url=sim_url)
        await service.create_credential(
            actor,
            upstream="demo-canvas",
            name="demo-worker",
            token=worker_token,
            notes="worker user of the Canvas simulator",
        )
        client, secret = await service.create_client(
            actor,
            name="grade-export",
            credential="demo-worker",
            scopes=DEMO_SCOPES,
            constraints=DEMO_CONSTRAINTS,
        )
        if secret is None:  # pragma: no cover - a client_secret client always gets one
            raise RuntimeError("the demo client was created without a secret")
    finally:
        await database.aclose()
    return DemoSetup(
        broker_url=settings.public_base or "",
        client_id=client.id,
        client_secret=secret,
        auditor_key=auditor_key,
        admin_key=admin_key,
    )


def instructions(setup: DemoSetup) -> str:
    """The commands a newcomer pastes into another terminal."""
    u = setup.broker_url
    # The commands name the executables of this installation: after `./dev demo`, `broker`
    # is in .venv/bin, which is not on a newcomer's PATH.
    bindir = Path(sys.executable).parent
    broker = bindir / "broker" if (bindir / "broker").exists() else f"{sys.executable} -m broker"
    python = sys.executable
    return textwrap.dedent(f"""
    Canvas Token Broker demo is running at {u}
    A Canvas simulator stands in for Canvas; the broker holds its worker token, encrypted.
    Client 'grade-export' may only call:
      {DEMO_SCOPES[0]}
      {DEMO_SCOPES[1]}
    constrained to course 1201.

    Paste into another terminal:

      export BROKER_URL={u}
      export BROKER_CLIENT_ID={setup.client_id}
      export BROKER_CLIENT_SECRET={setup.client_secret}
      export AUDITOR_KEY={setup.auditor_key}

      # 1. a script exchanges its client credentials for a 15-minute proxy token
      export TOKEN=$({broker} token)
      #    (or: curl -s -u "$BROKER_CLIENT_ID:$BROKER_CLIENT_SECRET" \\
      #           -d grant_type=client_credentials $BROKER_URL/broker/v1/oauth/token)

      # 2. an allowed call: forwarded to Canvas with the worker token
      curl -s -H "Authorization: Bearer $TOKEN" \\
           "$BROKER_URL/api/v1/courses/1201/assignments?per_page=3"

      # 3. a refused call: course 1202 is outside the grant (403, never reaches Canvas)
      curl -s -H "Authorization: Bearer $TOKEN" "$BROKER_URL/api/v1/courses/1202/assignments"

      # 4. the security team reads both audit entries with a read-only auditor key
      curl -s -H "Authorization: Bearer $AUDITOR_KEY" \\
           "$BROKER_URL/broker/v1/audit?kind=proxy&limit=2"

    Or from Python with canvasapi, unchanged except for the base URL:

      {python} - <<'PY'
      import os
      from canvasapi import Canvas
      from canvasapi.exceptions import Forbidden
      canvas = Canvas(os.environ["BROKER_URL"], os.environ["TOKEN"])
      course = canvas.get_course(1201)
      print(course.name, [a.name for a in course.get_assignments()][:5], "...")
      try:
          canvas.get_course(1202)
      except Forbidden as exc:
          print("refused:", exc)
      PY

    Management API docs: {u}/broker/v1/docs   Admin key (demo only): {setup.admin_key}
    Press Ctrl-C to stop.
    """)


def _check(setup: DemoSetup, sim: SimServer) -> int:
    """Run the printed flow once and report; 0 if every step behaved."""
    u = setup.broker_url
    with httpx.Client(timeout=10) as http:
        minted = http.post(
            f"{u}/broker/v1/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=(setup.client_id, setup.client_secret),
        )
        token = minted.json().get("access_token", "")
        bearer = {"Authorization": f"Bearer {token}"}
        allowed = http.get(f"{u}/api/v1/courses/1201/assignments?per_page=3", headers=bearer)
        refused = http.get(f"{u}/api/v1/courses/1202/assignments", headers=bearer)
        audit = http.get(
            f"{u}/broker/v1/audit",
            params={"kind": "proxy", "limit": 2},
            headers={"Authorization": f"Bearer {setup.auditor_key}"},
        )
    events = audit.json().get("events", []) if audit.status_code == 200 else []  # noqa: PLR2004
    reached = [r.raw_path for r in sim.state.received]
    steps = {
        "token minted": minted.status_code == 200,  # noqa: PLR2004
        "allowed call forwarded (200)": allowed.status_code == 200,  # noqa: PLR2004
        "refused call answered 403": refused.status_code == 403,  # noqa: PLR2004
        "Canvas received only the allowed call": reached == ["/api/v1/courses/1201/assignments"],
        "audit shows both decisions": sorted(e["decision"] for e in events) == ["allow", "deny"],
    }
    for step, ok in steps.items():
        _err(f"  [{'ok' if ok else 'FAILED'}] {step}")
    return 0 if all(steps.values()) else 1


def run_demo(*, port: int, workdir: Path | None, check: bool) -> int:
    """Start the simulator and the broker; serve until Ctrl-C (or run the check and exit).

    Without ``workdir`` the database and key file live in a temporary directory that is
    removed when the demo ends, by Ctrl-C, SIGTERM or the end of ``--check`` alike (uvicorn
    turns both signals into a normal return, so the ``with`` block always unwinds). A given
    ``workdir`` is the admin's to keep.
    """
    if workdir is not None:
        return _run_demo(workdir, port=port, check=check)
    with _terminate_unwinds(), tempfile.TemporaryDirectory(prefix="broker-demo-") as temporary:
        try:
            return _run_demo(Path(temporary), port=port, check=check)
        finally:
            _err(f"removing the demo's temporary files ({temporary})")


@contextlib.contextmanager
def _terminate_unwinds() -> Iterator[None]:
    """Make SIGTERM unwind the stack like Ctrl-C, so cleanups run.

    uvicorn handles both signals while it serves and raises them again once it has stopped;
    SIGTERM's default action would then end the process without running ``finally`` blocks.
    """

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_demo(directory: Path, *, port: int, check: bool) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    database = directory / "demo.sqlite3"
    if database.exists():
        database.unlink()
    settings = Settings(
        database_url=f"sqlite:///{database}",
        key_file=directory / "demo.key",
        keys=None,
        host="127.0.0.1",
        port=port,
        public_url=f"http://127.0.0.1:{port}",
    ).validated()
    keyring = bootstrap.ensure_keyring(settings)
    bootstrap.migrate(settings, keyring)
    worker_token = "sim-worker-" + secrets.token_urlsafe(16)
    with SimServer(SimState(tokens={worker_token})) as sim:
        setup = asyncio.run(_provision(settings, keyring, sim.base_url, worker_token))
        # Storing the credential asked Canvas who the token is; the check counts from here.
        sim.state.received.clear()
        app = create_app(settings)
        if not check:
            _err(instructions(setup))
            config = uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                log_level="warning",
                http=RequestTargetProtocol,
                server_header=False,
                proxy_headers=False,
            )
            uvicorn.Server(config).run()
            return 0
        server = BackgroundServer(app, port=port, name="broker")
        try:
            server.start()
        except (RuntimeError, TimeoutError) as exc:
            _err(f"the broker did not start (is port {port} free?): {exc}")
            return 1
        try:
            _err(f"demo self-check against {setup.broker_url} (data in {directory}):")
            return _check(setup, sim)
        finally:
            server.stop()
