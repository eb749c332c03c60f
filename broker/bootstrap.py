"""Local set-up shared by ``broker init``, ``broker admin-key create`` and ``broker demo``."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

from broker.errors import ConfigurationError
from broker.keyring import Keyring, load_keyring, write_key_file
from broker.services.audit import chain_key
from broker.services.management import Actor, ManagementService
from broker.storage.audit_chain import seal_unchained
from broker.storage.database import (
    Database,
    check_database,
    sqlite_directory_problem,
    upgrade_schema,
)

if TYPE_CHECKING:
    from broker.config import Settings

LOCAL = Actor(key_id=None, role="admin")


def ensure_keyring(settings: Settings) -> Keyring:
    """The configured keyring; creates the key file (0600) if none is configured yet."""
    if not settings.keys and not settings.key_file.exists():
        write_key_file(settings.key_file, Keyring.generate())
        print(f"created key file {settings.key_file} (mode 0600); back it up", file=sys.stderr)  # noqa: T201
    return load_keyring(settings)


def migrate(settings: Settings, keyring: Keyring) -> int:
    """Create or upgrade the schema; seal audit events older than the chain into it.

    Returns how many events were sealed (only ever non-zero on the first upgrade past the
    revision that introduced the chain).
    """
    database = Database(settings.async_database_url)
    problem = sqlite_directory_problem(database.url)
    if problem is not None:
        raise ConfigurationError("BROKER_DATABASE_URL", problem)
    upgrade_schema(database.url)
    engine = database.blocking(write=True)
    try:
        with engine.begin() as connection:
            return seal_unchained(connection, chain_key(keyring))
    finally:
        engine.dispose()


async def _create_admin_key(
    settings: Settings, keyring: Keyring, *, name: str, role: str, only_if_none: bool
) -> str | None:
    database = Database(settings.async_database_url, pool=False)
    try:
        sessions = database.sessions
        service = ManagementService(sessions, keyring, settings)
        if only_if_none and await service.list_admin_keys():
            return None
        _key, value = await service.create_admin_key(LOCAL, name=name, role=role)
        return value
    finally:
        await database.aclose()


def rotate_keys(settings: Settings, *, new_key: bool = True) -> tuple[str, int]:
    """Re-encrypt every worker token under a new primary key.

    With a key file, a fresh key is added as primary (unless ``new_key`` is False); with
    ``BROKER_KEYS`` its first key is used as is. Returns the primary key id and how many
    credentials were re-encrypted.
    """
    from broker.services.keys import reencrypt_credentials  # noqa: PLC0415

    keyring = load_keyring(settings)
    # Before the key file changes: a rotation that cannot reach the database changes nothing.
    problem = check_database(settings.async_database_url)
    if problem is not None:
        raise ConfigurationError("BROKER_DATABASE_URL", problem)
    if new_key and not settings.keys:
        keyring = keyring.with_new_primary()
        write_key_file(settings.key_file, keyring)

    async def run() -> int:
        database = Database(settings.async_database_url, pool=False)
        try:
            return await reencrypt_credentials(database.sessions, keyring)
        finally:
            await database.aclose()

    return keyring.primary_id, asyncio.run(run())


def create_admin_key(
    settings: Settings, keyring: Keyring, *, name: str, role: str, only_if_none: bool = False
) -> str | None:
    """Create an admin key directly in the database (bootstrap and recovery)."""
    return asyncio.run(
        _create_admin_key(settings, keyring, name=name, role=role, only_if_none=only_if_none)
    )
