"""Process-wide state, built once in the application's lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.keyring import Keyring, KeyringReloader, load_keyring
from broker.services.audit_hub import RemoteAuditWriter
from broker.services.audit_writer import AuditWriter, EventWriter
from broker.services.issuer_keys import IssuerKeys
from broker.services.revocation import CacheEpoch
from broker.storage.database import Database
from broker.upstream import Forwarder, HttpForwarder

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from broker.config import Settings
    from broker.storage.database import Sessions


@dataclass(frozen=True)
class ProcessContext:
    """What every request handler shares.

    Settings, the database (its engines), keys (and what keeps them current after a key
    rotation), the upstream pool, the audit writer, the revocation epoch and the cache of
    workload identity issuers' keys.
    """

    settings: Settings
    database: Database
    keyring: Keyring
    forwarder: Forwarder
    audit_writer: EventWriter
    epoch: CacheEpoch
    keys: KeyringReloader
    issuer_keys: IssuerKeys

    @property
    def engine(self) -> AsyncEngine:
        """The database's async engine."""
        return self.database.engine

    @property
    def sessions(self) -> Sessions:
        """Read and write sessions on the database."""
        return self.database.sessions

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        keyring: Keyring | None = None,
        forwarder: Forwarder | None = None,
    ) -> ProcessContext:
        """Build the context; raises ``ConfigurationError`` naming a bad setting.

        A keyring loaded here follows the key file (``KeyringReloader``), re-read whenever the
        revocation epoch moves; one passed in is used as it is.
        """
        settings.validated()
        database = Database(settings.async_database_url, timeout=settings.audit_timeout)
        if keyring is None:
            keyring = load_keyring(settings)
            keys = KeyringReloader.for_settings(keyring, settings)
        else:
            keys = KeyringReloader(keyring, None)
        return cls(
            settings=settings,
            database=database,
            keyring=keyring,
            audit_writer=(
                RemoteAuditWriter(
                    settings.audit_socket,
                    database=database,
                    keyring=keyring,
                    retained=settings.audit_retained_completions,
                )
                if settings.audit_socket is not None
                else AuditWriter(database, keyring, retained=settings.audit_retained_completions)
            ),
            epoch=CacheEpoch(settings.epoch_file, database=database, on_change=keys.reload),
            keys=keys,
            issuer_keys=IssuerKeys(settings),
            forwarder=forwarder
            or HttpForwarder(
                connect_timeout=settings.upstream_connect_timeout,
                read_timeout=settings.upstream_timeout,
                pool_size=settings.upstream_pool_size,
            ),
        )

    async def aclose(self) -> None:
        """Commit queued audit events, then release the upstream pool and the database."""
        await self.audit_writer.aclose()
        await self.epoch.aclose()
        await self.forwarder.aclose()
        await self.issuer_keys.aclose()
        await self.database.aclose()
