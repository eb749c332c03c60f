"""``broker demo``: the whole product on one machine with no configuration."""

from __future__ import annotations

import asyncio
import contextlib
import re
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
from broker.core.worker_oauth import CALLBACK_PATH
from broker.services.canvas_identity import verifying_forwarder
from broker.services.management import ManagementService
from broker.services.revocation import CacheEpoch
from broker.services.worker_oauth import WorkerOAuthService
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
    oauth_client_id: str
    oauth_client_secret: str
    authorization_url: str


@dataclass(frozen=True)
class DemoKey:
    """The simulator's developer key the demo's OAuth credential is authorised through."""

    client_id: str
    secret: str


def _err(text: str) -> None:
    print(text, file=sys.stderr)  # noqa: T201


async def _provision(
    settings: Settings, keyring: Keyring, sim_url: str, worker_token: str, key: DemoKey
) -> DemoSetup:
    database = Database(settings.async_database_url, pool=False)
    forwarder = verifying_forwarder(settings)
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
        # The same grant through a developer key: Canvas (the simulator) enforces its scopes
        # too, and the access token is renewed hourly (docs/interfaces.md#oauth-worker-credentials).
        await service.create_oauth_credential(
            actor,
            upstream="demo-canvas",
            name="demo-oauth-worker",
            developer_key_id=key.client_id,
            developer_key_secret=key.secret,
            key_scopes=DEMO_SCOPES,
            notes="authorised once through the simulator's consent page",
        )
        oauth_client, oauth_secret = await service.create_client(
            actor,
            name="grade-export-oauth",
            credential="demo-oauth-worker",
            scopes=DEMO_SCOPES,
            constraints=DEMO_CONSTRAINTS,
        )
        authorizing = WorkerOAuthService(database.sessions, keyring, CacheEpoch(), forwarder)
        started = await authorizing.start(None, "demo-oauth-worker", settings.public_base or "")
        if secret is None or oauth_secret is None:  # pragma: no cover - always given one
            raise RuntimeError("a demo client was created without a secret")
    finally:
        await forwarder.aclose()
        await database.aclose()
    return DemoSetup(
        broker_url=settings.public_base or "",
        client_id=client.id,
        client_secret=secret,
        auditor_key=auditor_key,
        admin_key=admin_key,
        oauth_client_id=oauth_client.id,
        oauth_client_secret=oauth_secret,
        authorization_url=started.url,
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

    An OAuth worker credential too: the simulator's developer key, whose scopes Canvas itself
    enforces behind the broker's check. Authorise it once, as the worker user would: open

      {setup.authorization_url}

    in a browser and press Authorize (the link works once, for ten minutes; for a new one:
    BROKER_ADMIN_KEY={setup.admin_key} {broker} credentials authorize demo-oauth-worker).
    Then client 'grade-export-oauth' calls through it, its access token renewed by the broker:

      BROKER_CLIENT_ID={setup.oauth_client_id} BROKER_CLIENT_SECRET={setup.oauth_client_secret} \
        {broker} token

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
    steps.update(_check_oauth(setup, sim))
    for step, ok in steps.items():
        _err(f"  [{'ok' if ok else 'FAILED'}] {step}")
    return 0 if all(steps.values()) else 1


def _check_oauth(setup: DemoSetup, sim: SimServer) -> dict[str, bool]:
    """Authorise the OAuth credential as a browser would, then call through it."""
    u = setup.broker_url
    with httpx.Client(timeout=10) as browser:
        page = browser.get(setup.authorization_url)
        found = re.search(r'name="request_id" value="([^"]+)"', page.text)
        consent = browser.post(
            f"{sim.base_url}/login/oauth2/accept",
            data={"request_id": found.group(1) if found else "", "user_id": "1", "authorize": "1"},
        )
        callback = browser.get(consent.headers.get("location", f"{u}/none"))
        minted = browser.post(
            f"{u}/broker/v1/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=(setup.oauth_client_id, setup.oauth_client_secret),
        )
        token = minted.json().get("access_token", "")
        sim.state.received.clear()
        allowed = browser.get(
            f"{u}/api/v1/courses/1201/assignments?per_page=3",
            headers={"Authorization": f"Bearer {token}"},
        )
    sent = sim.state.received[-1].header("authorization") if sim.state.received else None
    return {
        "OAuth credential authorised once in the consent page": callback.status_code == 200,  # noqa: PLR2004
        "its call forwarded with Canvas's short-lived access token": allowed.status_code == 200  # noqa: PLR2004
        and sent is not None
        and sent.removeprefix("Bearer ") not in sim.state.tokens,  # not the manual token
    }


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
        registered = sim.state.add_developer_key(
            secret=secrets.token_urlsafe(32),
            redirect_uris=[f"{settings.public_base}{CALLBACK_PATH}"],
            scopes=DEMO_SCOPES,
            require_scopes=True,
            name="broker demo",
        )
        key = DemoKey(registered.client_id, registered.secret)
        setup = asyncio.run(_provision(settings, keyring, sim.base_url, worker_token, key))
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
