"""Canvas's own catalogue of developer-key scopes, shipped with the broker (docs/grants.md).

``canvas_scopes.txt`` (package data, provenance in its header) lists the 1,092 scope strings
Canvas offers on a developer key. A grant may name scopes outside it (Canvas adds endpoints,
and the list has no ``/api/quiz/v1`` routes), but :func:`unfamiliar_scopes` points them out
when a grant is saved, so that a typo such as ``/api/v1/course/:id`` is caught before go-live.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, Final

from broker.core.scopes import Grant

if TYPE_CHECKING:
    from broker.core.scopes import Scope

__all__ = ["canvas_scopes", "unfamiliar_scopes"]

_QUIZ_PREFIX: Final = "/api/quiz/v1/"


@cache
def canvas_scopes() -> tuple[str, ...]:
    """Every scope string of the catalogue, in its order."""
    text = files("broker.core").joinpath("canvas_scopes.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.startswith("url:"))


@cache
def _catalogue() -> tuple[frozenset[tuple[str, str]], Grant]:
    grant = Grant.compile(canvas_scopes())
    shapes = frozenset((scope.method, scope.shape) for scope in grant.scopes)
    return shapes, grant


def unfamiliar_scopes(grant: Grant) -> list[str]:
    """A warning for each scope of ``grant`` that names no endpoint Canvas's catalogue lists.

    A scope is familiar when it is one of the catalogue's routes (parameter names aside), or a
    literal path that one of them matches (``url:GET|/api/v1/courses/1201``).
    """
    shapes, catalogue = _catalogue()
    return [
        _warning(scope)
        for scope in grant.scopes
        if (scope.method, scope.shape) not in shapes
        and not (scope.literal and catalogue.check(scope.method, scope.path).allowed)
    ]


def _warning(scope: Scope) -> str:
    if scope.path.startswith(_QUIZ_PREFIX):
        return (
            f"scope {scope.raw!r} is not in the broker's copy of Canvas's scope list, which "
            "has no /api/quiz/v1 routes: check it against Canvas's New Quizzes API"
        )
    return (
        f"scope {scope.raw!r} names no endpoint in Canvas's scope list: check it for a typo "
        "(Canvas may have added the endpoint since the list was taken)"
    )
