"""How the ``broker`` command line shows what the API answered (docs/interfaces.md#command-line).

People get tables (rich); scripts get ``--json``, which prints the API's JSON unchanged. The
table a value becomes is chosen from its shape: a list of resources is one row per resource
with the columns that resource's kind (its id prefix) names, one resource is a field/value
table, an audit page is a table of events. A command added later that prints through
``render`` gets a table without naming columns.

Values printed to a terminal never carry control characters: an audit event holds text that
scripts sent (paths, user agents), and an escape sequence in it must not drive the admin's
terminal.
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, Self

from rich.console import Console
from rich.progress import (
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from collections.abc import Iterator

COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "up": ("id", "name", "base_url", "enabled"),
    "cred": ("id", "name", "upstream", "token_last4", "canvas_user_id", "enabled", "expires_at"),
    "cli": ("client_id", "name", "credential_id", "scopes", "constraints", "token_ttl", "enabled"),
    "tok": ("id", "client_id", "scopes", "expires_at", "revoked_at", "source_ip"),
    "key": ("id", "name", "role", "created_at", "revoked_at", "created_by"),
}
"""The columns of a list of resources, by the prefix of their ids."""

EVENT_COLUMNS: Final = (
    "seq",
    "time",
    "kind",
    "action",
    "decision",
    "reason",
    "status",
    "method",
    "path",
    "client_id",
)
"""The columns of an audit page (every field is in ``--json``)."""

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain(text: str) -> str:
    r"""``text`` with every control character shown as its escape (ESC as ``\x1b``)."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


def cell(value: Any) -> Text:  # noqa: ANN401 - any JSON value
    """One JSON value as table text: markup is not interpreted, control characters escaped."""
    if value is None:
        return Text("-", style="dim")
    if isinstance(value, bool):
        return Text("yes" if value else "no", style="green" if value else "red")
    # One line per item: the items' own control characters are escaped, not the line breaks.
    if isinstance(value, list):
        return Text("\n".join(plain(_compact(v)) for v in value) or "-")
    if isinstance(value, dict):
        return _mapping(value)
    return Text(plain(str(value)))


def _mapping(value: dict[str, Any]) -> Text:
    """Constraints as ``name=v1,v2`` lines, flat mappings as ``key: value`` lines, else JSON."""
    if all(isinstance(v, list) for v in value.values()):
        lines = [f"{k}={','.join(_compact(v) for v in vs)}" for k, vs in value.items()]
    elif all(isinstance(v, str | int | float) for v in value.values()):
        lines = [f"{k}: {v}" for k, v in value.items()]
    else:
        return Text(plain(json.dumps(value, sort_keys=True)))
    return Text("\n".join(plain(line) for line in lines) or "-")


def _compact(value: Any) -> str:  # noqa: ANN401 - any JSON value
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _kind(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """The columns for these rows: their kind's, else every field of the first row."""
    ident = str(rows[0].get("id", ""))
    prefix = ident.partition("_")[0] if "_" in ident else ""
    columns = COLUMNS.get(prefix)
    if columns is not None and all(set(columns) <= set(row) for row in rows):
        return columns
    return tuple(rows[0])


def table(value: Any) -> Table | Text:  # noqa: ANN401 - any JSON value
    """The table (or line) a value of the management or audit API becomes."""
    if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        return _rows(value, _kind(value))
    if value == []:
        return Text("(none)", style="dim")
    if not isinstance(value, dict):
        return cell(value)
    events = value.get("events")
    if isinstance(events, list) and set(value) <= {"events", "next_cursor"}:
        if not events:
            return Text("(no events)", style="dim")
        return _rows(events, tuple(c for c in EVENT_COLUMNS if c in events[0]))
    fields = Table(show_header=False, box=None, pad_edge=False)
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")
    for name, item in value.items():
        fields.add_row(Text(plain(str(name))), cell(item))
    return fields


def _rows(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> Table:
    result = Table(header_style="bold")
    for name in columns:
        result.add_column(name, overflow="fold")
    for row in rows:
        result.add_row(*(cell(row.get(name)) for name in columns))
    return result


def console(*, err: bool = False) -> Console:
    """A console on standard output (or error), wide enough for tables when piped."""
    stream = sys.stderr if err else sys.stdout
    # Piped output is not wrapped at 80 columns, so `| less -S` and `| grep` see whole rows.
    return Console(file=stream, width=None if stream.isatty() else 200, highlight=False)


def render(value: Any, *, as_json: bool, err: bool = False) -> None:  # noqa: ANN401
    """Print an API value: its JSON unchanged with ``as_json``, else as a table."""
    if as_json:
        stream = sys.stderr if err else sys.stdout
        stream.write(json.dumps(value, indent=2) + "\n")
        stream.flush()
        return
    console(err=err).print(table(value))


def next_page_hint(value: Any) -> str | None:  # noqa: ANN401 - any JSON value
    """For an audit page with more events: how to get the next one."""
    if isinstance(value, dict) and value.get("next_cursor"):
        return f"more events: add --cursor {value['next_cursor']}"
    return None


def interactive_stderr() -> bool:
    """Whether standard error is a terminal (progress is drawn only there)."""
    return sys.stderr.isatty()


@contextmanager
def spinner(message: str) -> Iterator[None]:
    """A spinner with elapsed time on standard error while a long step runs (terminal only)."""
    if not interactive_stderr():
        yield
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console(err=True),
        transient=True,
    ) as progress:
        progress.add_task(message, total=None)
        yield


class Transfer:
    """Bytes received so far, drawn on standard error when it is a terminal."""

    def __init__(self, description: str) -> None:
        self._progress: Progress | None = None
        self._task = None
        if interactive_stderr():
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                console=console(err=True),
                transient=True,
            )
            self._task = self._progress.add_task(description, total=None)

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, count: int) -> None:
        """``count`` more bytes arrived."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, count)
