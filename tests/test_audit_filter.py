"""The audit filters are defined once: the API, the CLI and storage all derive from it.

Contract: docs/audit.md#review.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import typer
from pydantic import ValidationError
from typer.core import TyperGroup, TyperOption

from broker.app import create_app
from broker.audit_filter import SELECTS, AuditFilter, parameter
from broker.cli import app as cli
from broker.config import Settings

FILTERS = list(AuditFilter.model_fields)
PARAMETERS = {parameter(name) for name in FILTERS}


def _query_parameters(path: str) -> set[str]:
    schema = create_app(Settings(database_url="sqlite:///never-opened.sqlite3")).openapi()
    operation: dict[str, Any] = schema["paths"][path]["get"]
    return {p["name"] for p in operation["parameters"] if p["in"] == "query"}


def _options(command: str) -> set[str]:
    group = typer.main.get_command(cli)
    assert isinstance(group, TyperGroup)
    audit = group.commands["audit"]
    assert isinstance(audit, TyperGroup)
    return {
        opt
        for param in audit.commands[command].params
        if isinstance(param, TyperOption)
        for opt in param.opts
    }


@pytest.mark.parametrize("path", ["/broker/v1/audit", "/broker/v1/audit/export"])
def test_every_filter_is_a_query_parameter_of_review_and_export(path: str) -> None:
    assert _query_parameters(path) >= PARAMETERS


@pytest.mark.parametrize("command", ["query", "export"])
def test_every_filter_is_an_option_of_the_audit_commands(command: str) -> None:
    options = {f"--{name.replace('_', '-')}" for name in PARAMETERS}
    assert options <= _options(command)


def test_every_filter_names_the_column_it_selects_on() -> None:
    assert set(SELECTS) == set(FILTERS)


def test_filters_are_given_by_their_parameter_names_only() -> None:
    assert AuditFilter.model_validate({"client": "cli_1"}).client_id == "cli_1"
    assert AuditFilter.model_validate({"client_id": "cli_1"}).client_id is None


def test_query_parameters_round_trip_through_the_filter() -> None:
    selection = AuditFilter.model_validate(
        {"since": datetime(2026, 1, 1, tzinfo=UTC), "actor": "key_1", "status": 403}
    )
    params = selection.query_params()
    assert params == {"since": "2026-01-01T00:00:00+00:00", "actor": "key_1", "status": 403}
    assert AuditFilter.model_validate(params) == selection


def test_set_filters_name_what_was_given_by_field() -> None:
    selection = AuditFilter.model_validate({"token": "tok_1", "path_prefix": "/api/v1"})
    assert selection.set_filters() == {"token_id": "tok_1", "path_prefix": "/api/v1"}


@pytest.mark.parametrize("status", [99, 600])
def test_status_outside_http_statuses_is_refused(status: int) -> None:
    with pytest.raises(ValidationError, match="status"):
        AuditFilter.model_validate({"status": status})


def test_time_without_offset_is_refused() -> None:
    with pytest.raises(ValidationError, match="since"):
        AuditFilter.model_validate({"since": "2026-01-01T00:00:00"})
