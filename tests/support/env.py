"""A provisioned broker for tests: upstream → simulator, worker credential, client, keys."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.services.audit import AuditService
from broker.services.management import Actor, ManagementService
from broker.sim.throttle import CanvasThrottle

if TYPE_CHECKING:
    from collections.abc import Sequence

    import httpx

    from broker.context import ProcessContext
    from broker.sim.server import SimServer

WORKER_TOKEN = "sim-worker-token-7f3a9c2e"
AUDIT_HUB = os.environ.get("BROKER_TEST_AUDIT_HUB") == "1"
"""Whether each test's broker sends its audit events to an audit hub (see ``conftest``)."""
LOCAL = Actor(key_id=None, role="admin")
DEFAULT_SCOPES = (
    "url:GET|/api/v1/courses/:id",
    "url:GET|/api/v1/courses/:course_id/assignments",
    "url:POST|/api/v1/courses/:course_id/assignments",
    "url:GET|/api/v1/users/:user_id",
    "url:GET|/api/v1/files/:file_id/download",
)


@dataclass
class BrokerEnv:
    """Everything a test needs to drive the broker over HTTP and inspect the simulator."""

    context: ProcessContext
    http: httpx.AsyncClient
    sim: SimServer
    admin_key: str = ""
    auditor_key: str = ""
    created: dict[str, Any] = field(default_factory=dict)

    @property
    def management(self) -> ManagementService:
        """Direct access to the management service (setup shortcuts)."""
        return ManagementService(self.context.sessions, self.context.keyring, self.context.settings)

    @property
    def received(self) -> list[str]:
        """Paths (with query) the simulator received, in order."""
        return [r.target for r in self.sim.state.received]

    def admin(self) -> dict[str, str]:
        """Headers for the admin key."""
        return {"Authorization": f"Bearer {self.admin_key}"}

    def auditor(self) -> dict[str, str]:
        """Headers for the auditor key."""
        return {"Authorization": f"Bearer {self.auditor_key}"}

    async def provision(self) -> None:
        """Create admin and auditor keys, the upstream and the worker credential."""
        service = self.management
        _key, self.admin_key = await service.create_admin_key(
            LOCAL, name="test-admin", role="admin"
        )
        _key, self.auditor_key = await service.create_admin_key(
            LOCAL, name="test-auditor", role="auditor"
        )
        await service.create_upstream(LOCAL, name="sim", base_url=self.sim.base_url)
        await service.create_credential(LOCAL, upstream="sim", name="worker", token=WORKER_TOKEN)
        # Storing the credential asked the simulator who the token is; tests start from zero.
        self.sim.state.received.clear()

    async def client(
        self,
        name: str = "job",
        scopes: Sequence[str] = DEFAULT_SCOPES,
        constraints: dict[str, list[str]] | None = None,
        **options: Any,
    ) -> tuple[str, str]:
        """Create a client through the API; returns ``(client_id, client_secret)``."""
        response = await self.http.post(
            "/broker/v1/clients",
            headers=self.admin(),
            json={
                "name": name,
                "credential": "worker",
                "scopes": list(scopes),
                "constraints": constraints or {},
                **options,
            },
        )
        assert response.status_code == 201, response.text
        body = response.json()
        return body["client_id"], body["client_secret"]

    async def token(self, client_id: str, secret: str, **form: str) -> str:
        """Mint a proxy token with client_secret_basic."""
        response = await self.http.post(
            "/broker/v1/oauth/token",
            data={"grant_type": "client_credentials", **form},
            auth=(client_id, secret),
        )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    async def client_token(self, name: str = "job", **client_options: Any) -> str:
        """Create a client and mint a token for it."""
        client_id, secret = await self.client(name, **client_options)
        return await self.token(client_id, secret)

    async def audit(self, **params: Any) -> list[dict[str, Any]]:
        """Audit events (newest first) read with the auditor key."""
        response = await self.http.get("/broker/v1/audit", params=params, headers=self.auditor())
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()["events"]
        return events

    async def verify_audit(self) -> dict[str, Any]:
        """Commit what the audit writer holds, then verify the whole chain (as a report)."""
        context = self.context
        audit = AuditService(
            context.sessions,
            context.audit_writer,
            context.keyring,
            context.database,
        )
        await audit.flush()
        report = await asyncio.to_thread(audit.verify)
        return report.as_dict()


def costless_throttle() -> CanvasThrottle:
    """Canvas's throttle with calls that cost nothing, for tests of load rather than of it.

    The bucket then holds only the up-front cost of the calls in flight (docs/simulator.md).
    """
    return CanvasThrottle(default_cost=0.0, costs=())


def bearer(token: str) -> dict[str, str]:
    """Authorization header for a proxy token."""
    return {"Authorization": f"Bearer {token}"}
