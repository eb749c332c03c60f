"""The proxy's token lookup. Flushes at most; services own transactions.

Everything else storage reads or writes has a module per resource (``upstreams``,
``credentials``, ``clients``, ``proxy_tokens``, ``admin_keys``, ``rate_buckets``,
``revocation_epoch``, ``used_assertions``, ``audit_events``), each returning
``broker.domain`` records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select

from broker.storage.models import (
    Client,
    ProxyToken,
    Upstream,
    WorkerCredential,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True)
class TokenRecord:
    """A proxy token with everything the proxy needs to forward a call."""

    token: ProxyToken
    client: Client
    credential: WorkerCredential
    upstream: Upstream


async def find_token(session: AsyncSession, hashes: Sequence[str]) -> TokenRecord | None:
    """The token whose keyed hash is one of ``hashes``, joined to its chain of owners."""
    row = (
        await session.execute(
            select(ProxyToken, Client, WorkerCredential, Upstream)
            .join(Client, ProxyToken.client_id == Client.id)
            .join(WorkerCredential, Client.credential_id == WorkerCredential.id)
            .join(Upstream, WorkerCredential.upstream_id == Upstream.id)
            .where(ProxyToken.token_hash.in_(list(hashes)))
        )
    ).first()
    if row is None:
        return None
    token, client, credential, upstream = row
    return TokenRecord(token, client, credential, upstream)
