"""Finding a named resource's row by what admins type: its id or its unique name."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import select

from broker.errors import NotFoundError
from broker.storage.models import Client, Upstream, WorkerCredential

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.ext.asyncio import AsyncSession

Named = TypeVar("Named", Upstream, WorkerCredential, Client)


async def row_by_ref(session: AsyncSession, model: type[Named], ref: str, label: str) -> Named:
    """The row whose id or unique name is ``ref``, or ``NotFoundError`` naming ``label``.

    An id wins over a name equal to it, so a reference by id always means that resource.
    """
    row = await session.get(model, ref) or await session.scalar(
        select(model).where(model.name == ref)
    )
    if row is None:
        raise NotFoundError(f"no {label} {ref!r}")
    return row


async def rows_by_name(session: AsyncSession, model: type[Named]) -> list[Named]:
    """Every row of a named resource, by name."""
    return list(await session.scalars(select(model).order_by(model.name)))


def apply(row: object, changes: Mapping[str, object], allowed: frozenset[str]) -> None:
    """Set the columns ``changes`` names on ``row``; refuses any not in ``allowed``.

    ``allowed`` keeps secrets (hashes, ciphertexts) and identities out of reach of a generic
    update: those have functions of their own.
    """
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not an updatable column: {', '.join(sorted(unknown))}")
    for column, value in changes.items():
        setattr(row, column, value)
