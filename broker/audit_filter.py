"""The audit review filters, defined once (docs/audit.md#review).

``AuditFilter`` is the one definition of every filter: its name, type, validation and
description, the query parameter (its alias) and the audit column it selects on. Everything
else derives from it, so a new filter is one field here:

- the API takes it as its query parameters (``broker.api.audit``, a FastAPI query model);
- the CLI builds one option per field, named after the query parameter, and sends the
  validated selection as those parameters (``broker.cli``);
- storage turns each set field into a condition on the column its ``Selects`` names
  (``broker.storage.audit_events``);
- a field with a closed set of values (``OneOf``, from ``broker.core.audit_values``) refuses
  any other: :meth:`AuditFilter.problem` names the field and the allowed values, which the
  API answers as ``400`` and the CLI as exit status 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Final

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from broker.core.audit_values import REASONS, REVIEWED_ACTIONS, Decision, Kind, State

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


class Match(StrEnum):
    """How a filter's value selects events by its column."""

    SINCE = "since"
    """The column is at or after the value."""
    UNTIL = "until"
    """The column is before the value."""
    EQUAL = "equal"
    """The column equals the value."""
    OUTCOME = "outcome"
    """The column of the call's completion, if there is one, else of the event, equals it."""
    PREFIX = "prefix"
    """The column starts with the value, literally (no wildcards); blank selects all."""
    CONTAINS = "contains"
    """The column contains the value, literally (no wildcards); blank selects all."""


@dataclass(frozen=True)
class Selects:
    """The audit column a filter looks at, and how."""

    column: str
    match: Match = Match.EQUAL


@dataclass(frozen=True)
class OneOf:
    """The only values a filter may take: those its column can hold."""

    values: frozenset[str]

    @classmethod
    def of(cls, values: Iterable[str]) -> OneOf:
        """The closed set ``values`` (an enumeration or a catalogue)."""
        return cls(frozenset(str(value) for value in values))


class AuditFilter(BaseModel):
    """Selection of audit events for review and export.

    Field names are what storage and the export's audit record call a filter; aliases are
    the query parameters and CLI options. Conditions on the outcome (``status``, ``state``,
    ``reason``) look at the completion of a pending event when there is one.
    """

    # Only the aliases are parameters: ``?client_id=`` is not a filter, as it never was.
    model_config = ConfigDict(frozen=True)

    since: Annotated[
        AwareDatetime | None,
        Selects("time", Match.SINCE),
        Field(description="events at or after this time"),
    ] = None
    until: Annotated[
        AwareDatetime | None,
        Selects("time", Match.UNTIL),
        Field(description="events before this time"),
    ] = None
    client_id: Annotated[
        str | None,
        Selects("client_id"),
        Field(alias="client", description="client id or name"),
    ] = None
    token_id: Annotated[
        str | None, Selects("token_id"), Field(alias="token", description="token id")
    ] = None
    credential_id: Annotated[
        str | None,
        Selects("credential_id"),
        Field(alias="credential", description="credential id or name"),
    ] = None
    upstream: Annotated[str | None, Selects("upstream"), Field(description="upstream name")] = None
    kind: Annotated[
        str | None, Selects("kind"), OneOf.of(Kind), Field(description="proxy, token or admin")
    ] = None
    action: Annotated[
        str | None,
        Selects("action"),
        OneOf.of(REVIEWED_ACTIONS),
        Field(description="e.g. token.mint, client.update"),
    ] = None
    decision: Annotated[
        str | None, Selects("decision"), OneOf.of(Decision), Field(description="allow or deny")
    ] = None
    reason: Annotated[
        str | None,
        Selects("reason", Match.OUTCOME),
        OneOf.of(REASONS),
        Field(description="e.g. scope_not_granted"),
    ] = None
    status: Annotated[
        int | None,
        Selects("status", Match.OUTCOME),
        Field(ge=100, le=599, description="HTTP status answered"),
    ] = None
    method: Annotated[str | None, Selects("method"), Field(description="request method")] = None
    path_prefix: Annotated[
        str | None,
        Selects("path", Match.PREFIX),
        Field(description="start of the request path, matched literally"),
    ] = None
    state: Annotated[
        str | None,
        Selects("state", Match.OUTCOME),
        OneOf.of(State),
        Field(description="complete or pending"),
    ] = None
    request_id: Annotated[
        str | None, Selects("request_id"), Field(description="X-Request-Id of the request")
    ] = None
    actor_key_id: Annotated[
        str | None,
        Selects("actor_key_id"),
        Field(alias="actor", description="admin key id that acted"),
    ] = None
    query_contains: Annotated[
        str | None,
        Selects("query", Match.CONTAINS),
        Field(
            description="text in the stored query string, e.g. a hash from `broker audit hash` "
            "or POST /audit/hash"
        ),
    ] = None

    def unknown_value(self) -> tuple[str, str] | None:
        """``(query parameter, what to do)`` for a value outside its filter's closed set.

        The value itself is not repeated (it may be anything a caller typed).
        """
        for name, allowed in ONE_OF.items():
            value = getattr(self, name)
            if value is not None and value not in allowed.values:
                listed = ", ".join(sorted(allowed.values))
                return parameter(name), f"not a value the audit log holds; use one of {listed}"
        return None

    def problem(self) -> str | None:
        """:meth:`unknown_value` as one line naming the parameter, or None."""
        unknown = self.unknown_value()
        return None if unknown is None else f"{unknown[0]}: {unknown[1]}"

    def set_filters(self) -> dict[str, str | int]:
        """The filters given, by field name (``datetime`` values as ISO text)."""
        return {
            name: value.isoformat() if isinstance(value, datetime) else value
            for name, value in self.model_dump(exclude_none=True).items()
        }

    def query_params(self) -> dict[str, str | int]:
        """The filters given, as the review and export endpoints' query parameters."""
        return {parameter(name): value for name, value in self.set_filters().items()}


def parameter(name: str) -> str:
    """The query parameter (and, dashed, the CLI option) of the filter field ``name``."""
    return AuditFilter.model_fields[name].alias or name


def _selectors() -> Mapping[str, Selects]:
    found: dict[str, Selects] = {}
    for name, info in AuditFilter.model_fields.items():
        [selects] = [m for m in info.metadata if isinstance(m, Selects)]
        found[name] = selects
    return found


SELECTS: Final = _selectors()
"""Each filter field's ``Selects``: what storage turns into a condition."""


ONE_OF: Final = {
    name: one_of
    for name, info in AuditFilter.model_fields.items()
    for one_of in info.metadata
    if isinstance(one_of, OneOf)
}
"""The filters with a closed set of values, and those values."""
