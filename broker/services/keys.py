"""Key rotation: re-encrypt every stored worker token under the keyring's primary key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select

from broker.requestid import current_request_id
from broker.services.audit import add_events, admin_event
from broker.services.tokens import WORKER_TOKEN_PURPOSE
from broker.storage.models import WorkerCredential, utcnow

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.keyring import Keyring


async def reencrypt_credentials(
    sessions: async_sessionmaker[AsyncSession], keyring: Keyring
) -> int:
    """Re-encrypt worker tokens not yet under the primary key; returns how many changed.

    One transaction: either every credential moves to the new key or none does, so an
    interrupted rotation can simply be run again.
    """
    changed = 0
    async with sessions.begin() as session:
        credentials = await session.scalars(
            select(WorkerCredential).where(WorkerCredential.token_key_id != keyring.primary_id)
        )
        for credential in credentials:
            plaintext = keyring.decrypt(
                credential.token_key_id,
                credential.token_ciphertext,
                purpose=WORKER_TOKEN_PURPOSE,
                record_id=credential.id,
            )
            credential.token_key_id, credential.token_ciphertext = keyring.encrypt(
                plaintext, purpose=WORKER_TOKEN_PURPOSE, record_id=credential.id
            )
            credential.updated_at = utcnow()
            changed += 1
        await add_events(
            session,
            keyring,
            admin_event(
                request_id=current_request_id(),
                action="keys.rotate",
                actor_key_id=None,
                details={"primary_key_id": keyring.primary_id, "credentials_reencrypted": changed},
            ),
        )
    return changed
