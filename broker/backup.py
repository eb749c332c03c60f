"""``broker backup``: a consistent copy of a live SQLite database (docs/deployment.md#backups).

SQLite's online backup API (``sqlite3.Connection.backup``) copies the database page by page
and restarts whenever another connection writes in between, so the copy is one consistent
snapshot even while ``broker serve`` keeps writing; a plain file copy of a WAL-mode database
is not. PostgreSQL has its own tool for this, ``pg_dump``, which the command points to.
"""

from __future__ import annotations

import contextlib
import shlex
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import make_url

from broker.storage.database import sqlite_path

if TYPE_CHECKING:
    from pathlib import Path


class BackupError(Exception):
    """The backup could not be made; the message says why and what to do."""


@dataclass(frozen=True)
class BackupResult:
    """What was copied where."""

    source: Path
    destination: Path
    size: int


def pg_dump_command(database_url: str, destination: Path) -> str:
    """The ``pg_dump`` command for a PostgreSQL URL; the password is left to PGPASSWORD."""
    url = make_url(database_url)
    parts = ["pg_dump", "--format=custom", f"--file={destination}"]
    if url.host:
        parts.append(f"--host={url.host}")
    if url.port:
        parts.append(f"--port={url.port}")
    if url.username:
        parts.append(f"--username={url.username}")
    parts.append(url.database or "")
    return shlex.join(parts)


def backup_sqlite(database_url: str, destination: Path) -> BackupResult:
    """Copy the SQLite database of ``database_url`` to ``destination`` (which must not exist).

    The copy is written beside ``destination`` first and renamed into place once complete and
    checked, so a failed backup never leaves a partial file under the requested name.
    """
    source = sqlite_path(database_url)
    if source is None:
        raise BackupError("BROKER_DATABASE_URL is not a SQLite file database")
    if not source.is_file():
        raise BackupError(
            f"no database at {source.resolve()} (BROKER_DATABASE_URL); "
            "run from the broker's directory or set BROKER_DATABASE_URL"
        )
    if destination.exists():
        raise BackupError(f"{destination} already exists; choose a new file name")
    if not destination.parent.is_dir():
        raise BackupError(f"directory {destination.parent} does not exist")
    partial = destination.with_name(f".{destination.name}.partial")
    try:
        # Read-only URI: the backup can never change the live database.
        with (
            contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as live,
            contextlib.closing(sqlite3.connect(partial)) as copy,
        ):
            live.backup(copy)
            (result,) = copy.execute("PRAGMA integrity_check").fetchone()
            if result != "ok":
                raise BackupError(f"the copy does not pass integrity_check: {result}")
        partial.replace(destination)
    except sqlite3.Error as exc:
        raise BackupError(f"could not back up {source}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return BackupResult(source, destination, destination.stat().st_size)
