"""How the command line renders API answers (``broker.cli_output``)."""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING

from rich.console import Console

from broker import cli_output

if TYPE_CHECKING:
    import pytest


def _drawn(value: object) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(cli_output.table(value))
    return out.getvalue()


def test_control_characters_from_audit_text_never_reach_the_terminal() -> None:
    event = {"seq": 1, "path": "/api/v1/\x1b]0;owned\x07x", "user_agent": "a\x9bb\rc"}
    drawn = _drawn({"events": [event], "next_cursor": None})
    assert "\x1b" not in drawn
    assert "\x07" not in drawn
    assert "\\x1b]0;owned\\x07x" in drawn
    assert "\x9b" not in _drawn(event)
    assert "a\\x9bb\\rc" in _drawn(event)


def test_markup_in_values_is_printed_as_written() -> None:
    drawn = _drawn([{"id": "up_1", "name": "[bold red]x[/]", "base_url": "u", "enabled": True}])
    assert "[bold red]x[/]" in drawn


def test_a_list_of_resources_gets_the_columns_of_its_kind() -> None:
    rows = [
        {"id": "key_1", "name": "siem", "role": "auditor", "created_at": "t", "revoked_at": None}
        | {"created_by": None}
    ]
    header = _drawn(rows).splitlines()[1]
    assert [c.strip() for c in header.split("┃")[1:-1]] == list(cli_output.COLUMNS["key"])


def test_constraints_and_scopes_read_as_written_on_the_command_line() -> None:
    drawn = _drawn(
        {"scopes": ["url:GET|/a", "url:GET|/b"], "constraints": {"course_id": ["1", "2"]}}
    )
    assert "course_id=1,2" in drawn
    assert "url:GET|/a  " in drawn.splitlines()[0] + "  "
    assert "url:GET|/b" in drawn.splitlines()[1]
    multiline = _drawn([{"id": "x", "scopes": ["a\nb"]}])
    assert "a\\nb" in multiline


def test_an_unknown_shape_falls_back_to_every_field() -> None:
    header = _drawn([{"revoked": 3}]).splitlines()[1]
    assert "revoked" in header


def test_json_mode_prints_the_value_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    value = {"events": [{"seq": 1, "path": "/x"}], "next_cursor": "abc"}
    cli_output.render(value, as_json=True)
    assert json.loads(capsys.readouterr().out) == value


def test_a_flat_mapping_reads_one_entry_per_line() -> None:
    drawn = _drawn({"hashes": {"k2": "hmac-sha256:ab", "k1": "hmac-sha256:cd"}})
    assert "k2: hmac-sha256:ab" in drawn.splitlines()[0]
    assert "k1: hmac-sha256:cd" in drawn.splitlines()[1]
