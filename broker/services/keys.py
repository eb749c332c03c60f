"""Key rotation: re-encrypt every stored worker token under the keyring's primary key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.requestid import current_request_id
from broker.services.audit import add_events, admin_event
from broker.services.tokens import WORKER_TOKEN_PURPOSE
from broker.services.worker_oauth import DEVELOPER_KEY_PURPOSE, REFRESH_TOKEN_PURPOSE
from broker.storage import credentials, oauth_grants, revocation_epoch
from broker.storage.credentials import SealedToken
from broker.storage.models import utcnow

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from broker.keyring import Keyring


async def reencrypt_credentials(
    sessions: async_sessionmaker[AsyncSession], keyring: Keyring
) -> int:
    """Re-encrypt worker tokens not yet under the primary key; returns how many changed.

    One transaction: either every credential moves to the new key or none does, so an
    interrupted rotation can simply be run again. It moves the revocation epoch too: every
    running process hears of it within a poll and reloads its keyring (the key file already
    holds the new key), so none is left with ciphertexts it cannot decrypt
    (docs/storage-and-keys.md#key-rotation).
    """
    async with sessions.begin() as session:
        stale = await credentials.sealed_not_under(session, keyring.primary_id)
        for credential_id, sealed in stale.items():
            plaintext = keyring.decrypt(
                sealed.key_id,
                sealed.ciphertext,
                purpose=WORKER_TOKEN_PURPOSE,
                record_id=credential_id,
            )
            resealed = SealedToken(
                *keyring.encrypt(plaintext, purpose=WORKER_TOKEN_PURPOSE, record_id=credential_id)
            )
            await credentials.reseal(session, credential_id, resealed, at=utcnow())
        # OAuth credentials' developer-key secrets and refresh tokens move with them.
        grants = await oauth_grants.sealed_not_under(session, keyring.primary_id)
        for credential_id, (secret, refresh) in grants.items():
            await oauth_grants.reseal(
                session,
                credential_id,
                _resealed(keyring, secret, DEVELOPER_KEY_PURPOSE, credential_id),
                None
                if refresh is None
                else _resealed(keyring, refresh, REFRESH_TOKEN_PURPOSE, credential_id),
            )
        await revocation_epoch.bump(session)
        await add_events(
            session,
            keyring,
            admin_event(
                request_id=current_request_id(),
                action="keys.rotate",
                actor_key_id=None,
                details={
                    "primary_key_id": keyring.primary_id,
                    "credentials_reencrypted": len(stale),
                    "oauth_grants_reencrypted": len(grants),
                },
            ),
        )
    return len(stale)


def _resealed(keyring: Keyring, sealed: SealedToken, purpose: str, record_id: str) -> SealedToken:
    plaintext = keyring.decrypt(
        sealed.key_id, sealed.ciphertext, purpose=purpose, record_id=record_id
    )
    return SealedToken(*keyring.encrypt(plaintext, purpose=purpose, record_id=record_id))
